"""``caracal agent``: register agents, suspend and reactivate them, rotate their keys."""

from __future__ import annotations

from typing import Any

import typer

from caracal_ops.cli.context import state
from caracal_ops.cli.output import FORMAT_OPTION, OutputFormat, emit_block, emit_json, emit_table, timestamp
from caracald.admin import agents as agent_admin
from caracald.admin.agents import NewCredential
from caracald.core.agents import Agent, AgentStatus, parse_uuid
from caracald.core.errors import ValidationError

app = typer.Typer(help="Register and manage AI agents.", no_args_is_help=True)

AGENT_ID = typer.Option(..., "--agent-id", help="The agent's id.", show_default=False)


def agent_record(agent: Agent) -> dict[str, Any]:
    return {
        "agent_id": agent.agent_id,
        "name": agent.name,
        "description": agent.description,
        "owner": agent.owner,
        "parent_id": agent.parent_id,
        "status": agent.status,
        "created_at": agent.created_at,
        "updated_at": agent.updated_at,
    }


def _agent_fields(agent: Agent) -> list[tuple[str, Any]]:
    fields: list[tuple[str, Any]] = [
        ("Agent ID", agent.agent_id),
        ("Name", agent.name),
        ("Owner", agent.owner),
        ("Status", agent.status),
    ]
    if agent.parent_id:
        fields.append(("Parent ID", agent.parent_id))
    return fields


def _emit_credential(title: str, issued: NewCredential, fmt: OutputFormat) -> None:
    if fmt is OutputFormat.JSON:
        emit_json({**agent_record(issued.agent), "api_key": issued.api_key})
    else:
        emit_block(title, [*_agent_fields(issued.agent), ("API Key", issued.api_key)])
    typer.echo("Keep the API key now: only a hash of it is stored, so it cannot be shown again.", err=True)


@app.command("create")
def create(
    ctx: typer.Context,
    name: str = typer.Option(..., "--name", help="Unique name: letters, digits, '.', '_' or '-'."),
    owner: str = typer.Option(..., "--owner", help="Who is responsible for the agent (an email address)."),
    description: str = typer.Option("", "--description", help="What the agent does."),
    parent_id: str | None = typer.Option(
        None,
        "--parent-id",
        help="Delegating parent agent: the child's budgets can never exceed the parent's.",
    ),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Register a new agent and issue its API key (printed once)."""
    parent = parse_uuid(parent_id, what="parent id") if parent_id else None
    issued = agent_admin.create_agent(
        state(ctx).db, name=name, owner=owner, description=description, parent_id=parent, actor=state(ctx).who
    )
    _emit_credential("Agent created successfully", issued, fmt)


@app.command("list")
def list_agents(
    ctx: typer.Context,
    status: str | None = typer.Option(
        None, "--status", help="Only agents with this status (active, suspended)."
    ),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """List agents."""
    wanted = None
    if status is not None:
        try:
            wanted = AgentStatus(status.lower())
        except ValueError:
            raise ValidationError(f"unknown status {status!r}: use active or suspended") from None
    agents = agent_admin.list_agents(state(ctx).db, status=wanted)
    if fmt is OutputFormat.JSON:
        emit_json([agent_record(a) for a in agents])
        return
    emit_table(
        ["agent id", "name", "owner", "status", "parent id", "created"],
        [
            (a.agent_id, a.name, a.owner, a.status, a.parent_id or "-", timestamp(a.created_at))
            for a in agents
        ],
        empty="No agents yet. Create one with: caracal agent create --name NAME --owner EMAIL",
    )


@app.command("get")
def get(ctx: typer.Context, agent_id: str = AGENT_ID, fmt: OutputFormat = FORMAT_OPTION) -> None:
    """Show one agent."""
    agent = agent_admin.get_agent(state(ctx).db, parse_uuid(agent_id, what="agent id"))
    if fmt is OutputFormat.JSON:
        emit_json(agent_record(agent))
        return
    emit_block(
        "Agent",
        [
            *_agent_fields(agent),
            ("Description", agent.description or "-"),
            ("Created At", timestamp(agent.created_at)),
            ("Updated At", timestamp(agent.updated_at)),
        ],
    )


def _set_status(ctx: typer.Context, agent_id: str, status: AgentStatus, reason: str | None) -> None:
    agent, changed = agent_admin.set_status(
        state(ctx).db, parse_uuid(agent_id, what="agent id"), status, actor=state(ctx).who, reason=reason
    )
    if changed:
        emit_block(
            f"Agent {'suspended' if status is AgentStatus.SUSPENDED else 'activated'}", _agent_fields(agent)
        )
    else:
        typer.echo(f"Agent {agent.agent_id} is already {status}; nothing changed.")


@app.command("suspend")
def suspend(
    ctx: typer.Context, agent_id: str = AGENT_ID, reason: str | None = typer.Option(None, "--reason")
) -> None:
    """Suspend an agent: the gateway refuses its calls until it is activated again."""
    _set_status(ctx, agent_id, AgentStatus.SUSPENDED, reason)


@app.command("activate")
def activate(
    ctx: typer.Context, agent_id: str = AGENT_ID, reason: str | None = typer.Option(None, "--reason")
) -> None:
    """Reactivate a suspended agent."""
    _set_status(ctx, agent_id, AgentStatus.ACTIVE, reason)


@app.command("rotate-key")
def rotate_key(
    ctx: typer.Context,
    agent_id: str = AGENT_ID,
    reason: str | None = typer.Option(None, "--reason"),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Replace the agent's API key. The old key stops working at once."""
    issued = agent_admin.rotate_key(
        state(ctx).db, parse_uuid(agent_id, what="agent id"), actor=state(ctx).who, reason=reason
    )
    _emit_credential("API key rotated", issued, fmt)
