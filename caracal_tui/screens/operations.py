"""Operations: backups, snapshots, replay, key rotation and the emergency stop-writes switch. Each shows its
plan and runs only after a typed confirmation; one that this installation cannot do yet says why."""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from caracal_tui import actions, keymap
from caracal_tui.screens.base import ViewScreen
from caracal_tui.sources import OperationsSnapshot
from caracal_tui.widgets.bars import StatusLine
from caracal_tui.widgets.table import SnapshotTable


class OperationsScreen(ViewScreen):
    VIEW = "operations"
    SCOPE = "operations"
    TITLE_TEXT = "Operations"
    BINDINGS: ClassVar = keymap.bindings("operations")

    DEFAULT_CSS = """
    OperationsScreen #facts {
        height: auto;
        padding: 0 1;
        margin-bottom: 1;
    }
    """

    def __init__(self) -> None:
        super().__init__()
        self.snapshot: OperationsSnapshot | None = None

    def compose_body(self) -> ComposeResult:
        yield StatusLine("loading…", id="status")
        yield Static("", id="facts")
        yield SnapshotTable(id="operations")

    @property
    def table(self) -> SnapshotTable:
        return self.query_one("#operations", SnapshotTable)

    def setup_columns(self, wide: bool) -> None:
        self.table.set_columns(
            [
                ("name", "Operation", 22),
                ("state", "State", 15),
                ("what", "What it does, or why not", 90 if wide else 35),
            ]
        )
        if self.caracal.readonly:
            self.table.display = False

    def redraw(self) -> None:
        if self.snapshot is not None:
            self.show_operations(self.snapshot)

    def reload(self) -> None:
        self.loader.load("operations", self.source.operations)

    def show_operations(self, snapshot: OperationsSnapshot) -> None:
        self.snapshot = snapshot
        facts = Table.grid(padding=(0, 1))
        facts.add_column(style="bold", no_wrap=True)
        facts.add_column(overflow="ellipsis", no_wrap=True)
        for label, value in snapshot.facts:
            facts.add_row(label, value)
        self.query_one("#facts", Static).update(facts)
        status = self.query_one("#status", StatusLine)
        if self.caracal.readonly:
            status.show(Text("read-only: no operation can be run from this dashboard", style="bold"))
            self.mark_updated()
            return
        rows = []
        for capability in snapshot.capabilities:
            spec = actions.spec(capability.action)
            if capability.available:
                state = Text("● available", style="green")
                what = Text(spec.description)
            else:
                state = Text("○ not available", style="dim")
                what = Text(capability.reason, style="dim")
            rows.append((capability.action, (spec.title, state, what)))
        self.table.show_rows(rows)
        ready = sum(1 for c in snapshot.capabilities if c.available)
        status.show(
            Text.assemble(
                (f"{ready} of {len(snapshot.capabilities)} operations available", "bold"),
                " · enter: its plan; type its word to run it",
            )
        )
        self.mark_updated()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_run_selected()

    def action_run_selected(self) -> None:
        if self.caracal.readonly:
            return
        action = self.table.selected_key
        if action is not None:
            self.caracal.start_action(action, self)

    def focus_main(self) -> None:
        self.table.focus()
