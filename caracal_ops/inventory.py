"""Read-only views of what Caracal holds, for front ends (the TUI) that must not reach into the engine."""

from __future__ import annotations

from caracal_ops.cli.context import CliState
from caracald.admin import agents as agent_admin
from caracald.core.agents import Agent


def agents(state: CliState) -> list[Agent]:
    return agent_admin.list_agents(state.db)
