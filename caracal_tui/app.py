"""The dashboard application. Its data comes from the ops toolkit, never from the daemons directly."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import typer
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Header, Static

from caracal_ops import inventory
from caracal_ops.cli.context import CliState
from caracald.core.errors import CaracalError


class CaracalDashboard(App[None]):
    """Agents at a glance; refreshed with ``r``."""

    TITLE = "Caracal"
    BINDINGS: ClassVar = [Binding("r", "refresh", "Refresh"), Binding("q", "quit", "Quit")]

    def __init__(self, cli_state: CliState) -> None:
        super().__init__()
        self._state = cli_state

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="status")
        yield DataTable(id="agents", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#agents", DataTable)
        table.add_columns("Agent ID", "Name", "Owner", "Status")
        self.action_refresh()

    def action_refresh(self) -> None:
        table = self.query_one("#agents", DataTable)
        status = self.query_one("#status", Static)
        try:
            agents = inventory.agents(self._state)
        except CaracalError as exc:
            status.update(f"[b red]ERROR[/]: {exc}")
            return
        table.clear()
        for agent in agents:
            table.add_row(str(agent.agent_id), agent.name, agent.owner, str(agent.status))
        status.update(f"{len(agents)} agents")

    def on_unmount(self) -> None:
        self._state.close()


def main(
    config: Path | None = typer.Option(None, "--config", envvar="CARACAL_CONFIG", dir_okay=False),
    database_url: str | None = typer.Option(None, "--database-url"),
) -> None:
    """Open the dashboard against the same store the ``caracal`` CLI uses."""
    CaracalDashboard(CliState(config_path=config, database_url=database_url)).run()


def run() -> None:
    typer.run(main)
