"""``caracal status``: one line per component of the deployment; exit 1 when any is down."""

from __future__ import annotations

import typer

from caracal_ops.cli.context import EXIT_FAILED, state
from caracal_ops.cli.output import FORMAT_OPTION, OutputFormat, emit_json, emit_table
from caracal_ops.cli.services import platform
from caracal_ops.procedures import status as status_procedure
from caracal_ops.procedures.framework import utcnow


def status(ctx: typer.Context, fmt: OutputFormat = FORMAT_OPTION) -> None:
    """Check every component: PostgreSQL, Kafka, Redis, the gateway replicas, the daemons, consumer lag,
    the DLQ and the last Merkle batch. Exits 1 when any component is down."""
    cli = state(ctx)
    config = cli.config
    report = status_procedure.collect(config, lambda: cli.db, lambda: platform(cli), now=utcnow())
    if fmt is OutputFormat.JSON:
        emit_json(
            {
                "status": report.status,
                "checked_at": utcnow(),
                "components": [
                    {"component": c.component, "status": c.status, "detail": c.detail, **c.data}
                    for c in report.checks
                ],
            }
        )
    else:
        emit_table(
            ["component", "status", "detail"],
            [
                (c.component, c.status.upper() if c.status == "down" else c.status, c.detail)
                for c in report.checks
            ],
        )
        typer.echo(f"\nOverall: {report.status}")
    if report.down:
        raise typer.Exit(EXIT_FAILED)
