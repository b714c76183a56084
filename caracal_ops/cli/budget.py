"""``caracal budget``: where each budget stands, and rebuilding the shared counters from the ledger."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import typer

from caracal_ops.cli.context import CliState, state
from caracal_ops.cli.output import FORMAT_OPTION, OutputFormat, emit_json, emit_table, timestamp
from caracald.admin import budget as budget_admin
from caracald.admin.common import now
from caracald.budget.base import Scope, ScopeStatus
from caracald.core.agents import parse_uuid
from caracald.core.errors import ValidationError

app = typer.Typer(
    help="Budget counters: status per policy and window, rebuild from the ledger.", no_args_is_help=True
)


def _redis_url(cli: CliState) -> str:
    url = cli.config.redis.url
    if url is None:
        raise ValidationError("budget.backend is redis but no redis.url is configured")
    return url.get_secret_value()


async def _redis_status(cli: CliState, scopes: list[Scope]) -> list[ScopeStatus]:
    from caracald.budget.redis_backend import RedisBudget  # redis loads only for the commands that use it

    budget = RedisBudget.from_url(_redis_url(cli))
    try:
        return await budget.status(scopes, now())
    finally:
        await budget.close()


@app.command("status")
def status(
    ctx: typer.Context, agent_id: str = typer.Option(..., "--agent-id"), fmt: OutputFormat = FORMAT_OPTION
) -> None:
    """Limit, settled, held and remaining for every policy a request of this agent must fit."""
    cli = state(ctx)
    agent = parse_uuid(agent_id, what="agent id")
    scopes = budget_admin.scopes_for(cli.db, agent)
    if cli.config.budget.backend == "redis":
        statuses, source = asyncio.run(_redis_status(cli, scopes)), "redis"
    else:
        hold_ttl = timedelta(seconds=cli.config.gateway.hold_ttl_seconds)
        statuses, source = budget_admin.ledger_status(cli.db, scopes, now(), hold_ttl=hold_ttl), "ledger"
    names = budget_admin.agent_names(cli.db, [s.scope.agent_id for s in statuses])
    if fmt is OutputFormat.JSON:
        emit_json(
            {
                "agent_id": agent,
                "source": source,
                "policies": [
                    {
                        "policy_id": s.scope.policy_id,
                        "agent_id": s.scope.agent_id,
                        "agent": names[s.scope.agent_id],
                        "time_window": s.scope.window.window,
                        "window_type": s.scope.window.window_type,
                        "timezone": s.scope.window.timezone,
                        "window_start": s.bounds.start,
                        "window_end": s.bounds.end,
                        "currency": s.scope.limit.currency,
                        "limit": s.scope.limit.decimal_string(),
                        "settled": s.settled.decimal_string(),
                        "held": s.held.decimal_string(),
                        "holds": s.holds,
                        "remaining": s.remaining.decimal_string(),
                    }
                    for s in statuses
                ],
            }
        )
        return
    emit_table(
        ["policy id", "agent", "window", "since", "limit", "settled", "held", "remaining"],
        [
            (
                s.scope.policy_id,
                names[s.scope.agent_id],
                f"{s.scope.window.window} ({s.scope.window.window_type})",
                timestamp(s.bounds.start),
                s.scope.limit.format(),
                s.settled.format(exact=True),
                f"{s.held.format(exact=True)} ({s.holds})",
                s.remaining.format(exact=True),
            )
            for s in statuses
        ],
        empty="No active policy applies to this agent: the gateway will refuse its paid calls.",
    )


@app.command("rebuild")
def rebuild(ctx: typer.Context) -> None:
    """Recompute the shared (Redis) counters of every active policy from the ledger."""
    cli = state(ctx)
    if cli.config.budget.backend != "redis":
        typer.echo(
            "The embedded gateway keeps its counters in process and rebuilds them from the ledger "
            "whenever it starts: restart it to rebuild."
        )
        return
    scopes = budget_admin.all_scopes(cli.db)
    totals = budget_admin.ledger_totals(cli.db, scopes, now())

    async def apply() -> None:
        from caracald.budget.redis_backend import RedisBudget

        budget = RedisBudget.from_url(_redis_url(cli))
        try:
            await budget.rebuild(totals)
        finally:
            await budget.close()

    asyncio.run(apply())
    typer.echo(f"Rebuilt {len(totals)} counters of {len(scopes)} policies from the ledger.")
