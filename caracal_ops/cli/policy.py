"""``caracal policy``: budget limits per agent and window, with their version history."""

from __future__ import annotations

from typing import Any

import typer

from caracal_ops.cli.context import state
from caracal_ops.cli.output import FORMAT_OPTION, OutputFormat, emit_block, emit_json, emit_table, timestamp
from caracald.admin import policies as policy_admin
from caracald.core.agents import parse_uuid
from caracald.core.policy import PolicyVersion

app = typer.Typer(help="Budget policies: spending limits per time window.", no_args_is_help=True)

CHANGE_REASON = typer.Option(..., "--change-reason", help="Why the budget changes (kept in the history).")


def policy_record(p: PolicyVersion) -> dict[str, Any]:
    terms = p.terms
    return {
        "policy_id": p.policy_id,
        "agent_id": p.agent_id,
        "version": p.version,
        "limit": terms.limit.decimal_string(),
        "currency": terms.limit.currency,
        "time_window": terms.window.window,
        "window_type": terms.window.window_type,
        "timezone": terms.window.timezone,
        "status": p.status,
        "change_reason": p.change_reason,
        "changed_by": p.changed_by,
        "created_at": p.created_at,
    }


def _fields(p: PolicyVersion) -> list[tuple[str, Any]]:
    window = p.terms.window
    fields: list[tuple[str, Any]] = [
        ("Policy ID", p.policy_id),
        ("Agent ID", p.agent_id),
        ("Limit", p.terms.limit.format()),
        ("Time Window", f"{window.window} ({window.window_type})"),
    ]
    if window.timezone != "UTC":
        fields.append(("Time Zone", window.timezone))
    fields += [("Status", p.status), ("Version", p.version)]
    return fields


def _emit(title: str, p: PolicyVersion, fmt: OutputFormat) -> None:
    if fmt is OutputFormat.JSON:
        emit_json(policy_record(p))
    else:
        emit_block(title, _fields(p))


@app.command("create")
def create(
    ctx: typer.Context,
    agent_id: str = typer.Option(..., "--agent-id", help="The agent the budget applies to."),
    limit: str = typer.Option(..., "--limit", help="Spending limit per window, e.g. 100.00."),
    currency: str = typer.Option("USD", "--currency", help="ISO 4217 currency code."),
    time_window: str = typer.Option("daily", "--time-window", help="hourly, daily, weekly or monthly."),
    window_type: str = typer.Option(
        "calendar", "--window-type", help="calendar (resets on the calendar) or rolling (a sliding window)."
    ),
    timezone: str = typer.Option("UTC", "--timezone", help="IANA time zone of calendar windows."),
    change_reason: str = CHANGE_REASON,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Create a budget policy for an agent."""
    agent = parse_uuid(agent_id, what="agent id")
    terms = policy_admin.parse_terms(limit, currency, time_window, window_type, timezone)
    version = policy_admin.create_policy(
        state(ctx).db, agent, terms, change_reason=change_reason, actor=state(ctx).who
    )
    _emit("Policy created successfully", version, fmt)


@app.command("update")
def update(
    ctx: typer.Context,
    policy_id: str = typer.Option(..., "--policy-id"),
    limit: str = typer.Option(..., "--limit", help="The new limit per window."),
    change_reason: str = CHANGE_REASON,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Change a policy's limit. This writes a new version; earlier versions stay in the history."""
    version = policy_admin.change_policy(
        state(ctx).db,
        parse_uuid(policy_id, what="policy id"),
        limit=limit,
        change_reason=change_reason,
        actor=state(ctx).who,
    )
    _emit("Policy updated successfully", version, fmt)


@app.command("deactivate")
def deactivate(
    ctx: typer.Context,
    policy_id: str = typer.Option(..., "--policy-id"),
    change_reason: str = CHANGE_REASON,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Stop enforcing a policy (recorded as a new, inactive version)."""
    version = policy_admin.deactivate_policy(
        state(ctx).db,
        parse_uuid(policy_id, what="policy id"),
        change_reason=change_reason,
        actor=state(ctx).who,
    )
    _emit("Policy deactivated", version, fmt)


def _rows(policies: list[PolicyVersion]) -> list[tuple[Any, ...]]:
    return [
        (
            p.policy_id,
            p.version,
            p.terms.limit.format(),
            f"{p.terms.window.window} ({p.terms.window.window_type})",
            p.terms.window.timezone,
            p.status,
        )
        for p in policies
    ]


@app.command("list")
def list_policies(
    ctx: typer.Context,
    agent_id: str = typer.Option(..., "--agent-id"),
    include_inactive: bool = typer.Option(False, "--all", help="Include inactive policies."),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """List an agent's policies (their current versions)."""
    policies = policy_admin.list_policies(
        state(ctx).db, parse_uuid(agent_id, what="agent id"), include_inactive=include_inactive
    )
    if fmt is OutputFormat.JSON:
        emit_json([policy_record(p) for p in policies])
        return
    emit_table(
        ["policy id", "version", "limit", "window", "time zone", "status"],
        _rows(policies),
        empty="No policies for this agent.",
    )


@app.command("history")
def history(
    ctx: typer.Context,
    agent_id: str = typer.Option(..., "--agent-id"),
    policy_id: str | None = typer.Option(None, "--policy-id", help="Only this policy's versions."),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Every version of an agent's policies: who changed what, when and why."""
    versions = policy_admin.policy_history(
        state(ctx).db,
        parse_uuid(agent_id, what="agent id"),
        parse_uuid(policy_id, what="policy id") if policy_id else None,
    )
    if fmt is OutputFormat.JSON:
        emit_json([policy_record(p) for p in versions])
        return
    emit_table(
        ["policy id", "version", "limit", "window", "status", "changed by", "changed at", "reason"],
        [
            (
                p.policy_id,
                p.version,
                p.terms.limit.format(),
                f"{p.terms.window.window} ({p.terms.window.window_type})",
                p.status,
                p.changed_by,
                timestamp(p.created_at),
                p.change_reason,
            )
            for p in versions
        ],
        empty="No policy history for this agent.",
    )
