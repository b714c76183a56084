"""``caracal allowlist``: which resources (URLs) an agent may call."""

from __future__ import annotations

from typing import Any

import typer

from caracal_ops.cli.context import EXIT_FAILED, state
from caracal_ops.cli.output import FORMAT_OPTION, OutputFormat, emit_block, emit_json, emit_table, timestamp
from caracald.admin import allowlists as allowlist_admin
from caracald.core.agents import parse_uuid
from caracald.store.allowlists import AllowlistEntry

app = typer.Typer(help="Resource allowlists: the URLs an agent may call.", no_args_is_help=True)


def entry_record(e: AllowlistEntry) -> dict[str, Any]:
    return {
        "allowlist_id": e.allowlist_id,
        "agent_id": e.agent_id,
        "pattern": e.pattern,
        "pattern_type": e.pattern_type,
        "status": e.status,
        "created_by": e.created_by,
        "created_at": e.created_at,
        "deleted_at": e.deleted_at,
    }


def _fields(e: AllowlistEntry) -> list[tuple[str, Any]]:
    return [
        ("Allowlist ID", e.allowlist_id),
        ("Agent ID", e.agent_id),
        ("Pattern", e.pattern),
        ("Pattern Type", e.pattern_type),
        ("Status", e.status),
    ]


@app.command("create")
def create(
    ctx: typer.Context,
    agent_id: str = typer.Option(..., "--agent-id"),
    pattern: str = typer.Option(..., "--pattern", help="A regex or glob matched against the whole URL."),
    pattern_type: str = typer.Option("glob", "--pattern-type", help="regex or glob."),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Allow an agent to call the resources matching a pattern."""
    entry = allowlist_admin.create_entry(
        state(ctx).db, parse_uuid(agent_id, what="agent id"), pattern, pattern_type, actor=state(ctx).who
    )
    if fmt is OutputFormat.JSON:
        emit_json(entry_record(entry))
    else:
        emit_block("Allowlist created successfully", _fields(entry))


@app.command("list")
def list_entries(
    ctx: typer.Context,
    agent_id: str = typer.Option(..., "--agent-id"),
    include_deleted: bool = typer.Option(False, "--all", help="Include deleted entries."),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """List an agent's allowlist entries."""
    entries = allowlist_admin.list_entries(
        state(ctx).db, parse_uuid(agent_id, what="agent id"), include_deleted=include_deleted
    )
    if fmt is OutputFormat.JSON:
        emit_json([entry_record(e) for e in entries])
        return
    emit_table(
        ["allowlist id", "pattern", "type", "status", "created"],
        [(e.allowlist_id, e.pattern, e.pattern_type, e.status, timestamp(e.created_at)) for e in entries],
        empty="No allowlist entries: this agent may call nothing.",
    )


@app.command("test")
def check(
    ctx: typer.Context,
    agent_id: str = typer.Option(..., "--agent-id"),
    resource: str = typer.Option(..., "--resource", help="The full URL to check."),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Check whether an agent may call a URL. Exits 1 when it may not."""
    result = allowlist_admin.check_resource(state(ctx).db, parse_uuid(agent_id, what="agent id"), resource)
    if fmt is OutputFormat.JSON:
        emit_json(
            {
                "resource": result.resource,
                "allowed": result.allowed,
                "matched": entry_record(result.matched) if result.matched else None,
            }
        )
    else:
        fields: list[tuple[str, Any]] = [
            ("Resource", result.resource),
            ("Result", "ALLOWED" if result.allowed else "DENIED"),
        ]
        if result.matched:
            fields += [
                ("Matched Allowlist ID", result.matched.allowlist_id),
                ("Matched Pattern", f"{result.matched.pattern} ({result.matched.pattern_type})"),
            ]
        else:
            fields.append(("Reason", f"no match among {result.active_entries} active entries"))
        emit_block("Allowlist Test", fields)
    if not result.allowed:
        raise typer.Exit(EXIT_FAILED)


@app.command("delete")
def delete(ctx: typer.Context, allowlist_id: str = typer.Option(..., "--allowlist-id")) -> None:
    """Remove an allowlist entry (kept in the history as deleted)."""
    entry = allowlist_admin.delete_entry(
        state(ctx).db, parse_uuid(allowlist_id, what="allowlist id"), actor=state(ctx).who
    )
    emit_block("Allowlist entry deleted", _fields(entry))
