"""``caracal audit``: who changed what, when and why; and the check that nobody rewrote it."""

from __future__ import annotations

import typer

from caracal_ops.cli.context import EXIT_FAILED, state
from caracal_ops.cli.output import FORMAT_OPTION, OutputFormat, emit_block, emit_json, emit_table, timestamp
from caracald.admin import audit as audit_admin
from caracald.core.agents import parse_uuid
from caracald.core.timeparse import parse_timestamp

app = typer.Typer(help="The audit log of every administrative change.", no_args_is_help=True)


@app.command("query")
def query(
    ctx: typer.Context,
    start_time: str | None = typer.Option(None, "--start-time"),
    end_time: str | None = typer.Option(None, "--end-time"),
    event_type: str | None = typer.Option(
        None, "--event-type", help="Comma-separated types, e.g. policy_change,agent_lifecycle."
    ),
    agent_id: str | None = typer.Option(None, "--agent-id"),
    limit: int = typer.Option(1000, "--limit", min=1, max=100_000),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """List audit records, oldest first."""
    records = audit_admin.query(
        state(ctx).db,
        start=parse_timestamp(start_time, what="start time") if start_time else None,
        end=parse_timestamp(end_time, what="end time") if end_time else None,
        event_types=audit_admin.parse_event_types(event_type),
        agent_id=parse_uuid(agent_id, what="agent id") if agent_id else None,
        limit=limit,
    )
    if fmt is OutputFormat.JSON:
        emit_json(
            [
                {
                    "audit_id": r.audit_id,
                    "occurred_at": r.entry.occurred_at,
                    "actor": r.entry.actor,
                    "event_type": r.entry.event_type,
                    "action": r.entry.action,
                    "subject_id": r.entry.subject_id,
                    "agent_id": r.entry.agent_id,
                    "reason": r.entry.reason,
                    "details": r.entry.details,
                    "record_hash": r.record_hash,
                }
                for r in records
            ]
        )
        return
    emit_table(
        ["id", "time", "actor", "event type", "action", "subject", "reason"],
        [
            (
                r.audit_id,
                timestamp(r.entry.occurred_at),
                r.entry.actor,
                r.entry.event_type,
                r.entry.action,
                r.entry.subject_id or "-",
                r.entry.reason or "-",
            )
            for r in records
        ],
        empty="No audit records match.",
    )


@app.command("verify")
def verify(ctx: typer.Context, fmt: OutputFormat = FORMAT_OPTION) -> None:
    """Recompute the audit log's hash chain. Exits 1 if any record was changed, removed or reordered."""
    check = audit_admin.verify(state(ctx).db)
    if fmt is OutputFormat.JSON:
        emit_json(
            {
                "records": check.records,
                "integrity": "PASSED" if check.ok else "FAILED",
                "first_bad_id": check.first_bad_id,
                "problem": check.problem,
            }
        )
    else:
        fields: list[tuple[str, object]] = [
            ("Records Checked", f"{check.records:,}"),
            ("Integrity", "PASSED" if check.ok else "FAILED"),
            ("Tamper Detected", "No" if check.ok else "Yes"),
        ]
        if not check.ok:
            fields.append(("First Bad Record", f"{check.first_bad_id}: {check.problem}"))
        emit_block("Audit Chain Verification", fields)
    if not check.ok:
        raise typer.Exit(EXIT_FAILED)
