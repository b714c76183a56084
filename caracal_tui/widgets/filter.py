"""The ``/`` filter line of a list view: typing narrows the list at once; ``enter`` keeps the filter and
goes back to the list, ``esc`` clears it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Input, Label

from caracal_tui.widgets.inputs import TextInput


class FilterBar(Horizontal):
    DEFAULT_CSS = """
    FilterBar {
        dock: bottom;
        height: 1;
        display: none;
        background: $boost;
    }
    FilterBar.-shown {
        display: block;
    }
    FilterBar Label {
        width: auto;
        padding: 0 1;
        text-style: bold;
    }
    FilterBar Input {
        width: 1fr;
    }
    """

    def compose(self) -> ComposeResult:
        yield Label("/")
        yield TextInput(
            placeholder="filter (name, owner, status, error ...)", compact=True, id="filter-input"
        )

    @property
    def input(self) -> Input:
        return self.query_one("#filter-input", Input)

    @property
    def shown(self) -> bool:
        return self.has_class("-shown")

    @property
    def value(self) -> str:
        return self.input.value

    def open(self) -> None:
        self.add_class("-shown")
        self.input.focus()

    def close(self, *, clear: bool) -> None:
        if clear:
            self.input.value = ""
        if not self.input.value:
            self.remove_class("-shown")
