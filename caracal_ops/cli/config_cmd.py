"""``caracal config``: the effective configuration."""

from __future__ import annotations

import typer
import yaml

from caracal_ops.cli.context import state
from caracal_ops.cli.output import FORMAT_OPTION, OutputFormat, emit_json

app = typer.Typer(help="Configuration.", no_args_is_help=True)


@app.command("show")
def show(ctx: typer.Context, fmt: OutputFormat = FORMAT_OPTION) -> None:
    """Print the effective configuration, secrets redacted."""
    config = state(ctx).config
    data = config.redacted()
    if fmt is OutputFormat.JSON:
        emit_json({"source": config.source, **data})
        return
    typer.echo(f"# source: {config.source}{' (embedded PostgreSQL)' if config.embedded_mode else ''}")
    typer.echo(yaml.safe_dump(data, sort_keys=False).rstrip())
