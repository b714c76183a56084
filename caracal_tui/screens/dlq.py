"""DLQ triage: what the consumers could not apply, why, and the payload; retry or purge each."""

from __future__ import annotations

import json
from typing import ClassVar

from rich.console import Group, RenderableType
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label, Static

from caracal_tui import keymap
from caracal_tui.format import ago, count, full_stamp, stamp
from caracal_tui.screens.base import ViewScreen
from caracal_tui.sources import DeadLetterRow, DlqSnapshot, NotAvailable
from caracal_tui.widgets.bars import StatusLine
from caracal_tui.widgets.table import SnapshotTable


def _matches(letter: DeadLetterRow, text: str) -> bool:
    if not text:
        return True
    haystack = (
        f"{letter.dlq_id} {letter.group} {letter.topic} {letter.error_type} {letter.error_message}".lower()
    )
    return all(part in haystack for part in text.lower().split())


def payload_text(payload: bytes) -> RenderableType:
    """JSON indented when it is JSON, else text when it decodes, else hex."""
    try:
        decoded = payload.decode()
    except UnicodeDecodeError:
        return Text(payload[:2048].hex(" ", 2), style="dim")
    try:
        parsed = json.loads(decoded)
    except ValueError:
        return Text(decoded)
    return Syntax(json.dumps(parsed, indent=2, sort_keys=True), "json", theme="ansi_dark", word_wrap=True)


def letter_details(letter: DeadLetterRow, *, with_payload: bool) -> RenderableType:
    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("error", Text(f"{letter.error_type}: {letter.error_message}", style="red"))
    table.add_row("source", f"{letter.topic} partition {letter.partition} offset {letter.offset:,}")
    table.add_row("group", f"{letter.group} · tried {letter.retry_count + 1} times")
    table.add_row("failed", full_stamp(letter.failed_at))
    if letter.event_id is not None:
        table.add_row("event id", str(letter.event_id))
    if letter.key is not None:
        table.add_row("key", letter.key.decode(errors="replace"))
    if letter.headers:
        table.add_row("headers", ", ".join(f"{k}={v.decode(errors='replace')}" for k, v in letter.headers))
    if not with_payload:
        return table
    return Group(table, Text("payload", style="bold"), payload_text(letter.payload))


class LetterScreen(ModalScreen[None]):
    """One dead letter in full: error, origin, headers and the payload."""

    DEFAULT_CSS = """
    LetterScreen { align: center middle; background: $background 60%; }
    LetterScreen > Vertical {
        width: 100; max-width: 96%; height: auto; max-height: 96%;
        border: round $primary; background: $surface; padding: 0 1;
    }
    LetterScreen VerticalScroll { height: auto; max-height: 30; }
    LetterScreen .title { text-style: bold; margin-bottom: 1; }
    LetterScreen .hint { color: $text-muted; }
    """
    BINDINGS: ClassVar = [Binding("escape,enter,q", "close", "Close", show=False)]

    def __init__(self, letter: DeadLetterRow, *, readonly: bool) -> None:
        super().__init__()
        self.letter = letter
        self._readonly = readonly

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"Dead letter {self.letter.dlq_id}", classes="title")
            with VerticalScroll():
                yield Static(letter_details(self.letter, with_payload=True))
            hint = "esc closes" if self._readonly else "esc closes · t retry · x purge (from the list)"
            yield Label(hint, classes="hint")

    def action_close(self) -> None:
        self.dismiss(None)


class DlqScreen(ViewScreen):
    VIEW = "dlq"
    SCOPE = "dlq"
    TITLE_TEXT = "DLQ triage"
    FILTERABLE = True
    BINDINGS: ClassVar = keymap.bindings("dlq")

    DEFAULT_CSS = """
    DlqScreen #detail {
        height: 7;
        border-top: solid $primary-lighten-1;
        padding: 0 1;
        overflow-y: auto;
    }
    """

    def __init__(self) -> None:
        super().__init__()
        self.snapshot: DlqSnapshot | None = None

    def compose_body(self) -> ComposeResult:
        yield StatusLine("loading…", id="status")
        yield SnapshotTable(id="letters")
        yield Static("", id="detail")

    @property
    def table(self) -> SnapshotTable:
        return self.query_one("#letters", SnapshotTable)

    def setup_columns(self, wide: bool) -> None:
        self.table.set_columns(
            [
                ("id", "ID", 6),
                ("failed", "Failed", 11),
                ("source", "Source", 34 if wide else 15),
                ("type", "Error", 18 if wide else 14),
                ("message", "Message", 60 if wide else 21),
            ]
        )

    def redraw(self) -> None:
        if self.snapshot is not None:
            self.show_letters(self.snapshot)

    def reload(self) -> None:
        self.loader.load("letters", self.source.dead_letters)

    def _letters(self) -> tuple[DeadLetterRow, ...]:
        if self.snapshot is None or isinstance(self.snapshot.letters, NotAvailable):
            return ()
        return self.snapshot.letters

    def show_letters(self, snapshot: DlqSnapshot) -> None:
        self.snapshot = snapshot
        status = self.query_one("#status", StatusLine)
        if isinstance(snapshot.letters, NotAvailable):
            status.show(Text(f"not available: {snapshot.letters.reason}", style="dim italic"))
            self.table.show_rows([])
            self._show_detail()
            self.mark_updated()
            return
        wide = self.wide
        shown = [d for d in snapshot.letters if _matches(d, self.filter_text)]
        self.table.show_rows(
            [
                (
                    str(d.dlq_id),
                    (
                        str(d.dlq_id),
                        stamp(d.failed_at),
                        f"{d.topic}:{d.partition}@{d.offset}"
                        if wide
                        else f"{d.topic.removeprefix('caracal.')}",
                        Text(d.error_type, style="red"),
                        Text(d.error_message, no_wrap=True, overflow="ellipsis"),
                    ),
                )
                for d in shown
            ]
        )
        letters = snapshot.letters
        text = Text()
        if not letters:
            text.append("✔ no dead letters waiting", style="green")
        else:
            if self.filter_text:
                text.append(f"{count(len(shown))} of ")
            text.append(f"{count(len(letters))} pending", style="bold yellow")
            oldest = min(d.failed_at for d in letters)
            text.append(f" · oldest {ago(oldest, snapshot.taken_at)}")
            kinds = sorted({d.error_type for d in letters})
            text.append(" · " + ", ".join(kinds))
        status.show(text)
        self._show_detail()
        self.mark_updated()

    def selected(self) -> DeadLetterRow | None:
        key = self.table.selected_key
        return next((d for d in self._letters() if str(d.dlq_id) == key), None)

    def _show_detail(self) -> None:
        letter = self.selected()
        detail = self.query_one("#detail", Static)
        if letter is None:
            detail.update(Text("select a dead letter to see its error and origin", style="dim"))
        else:
            detail.update(letter_details(letter, with_payload=False))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        self._show_detail()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_inspect()

    def action_inspect(self) -> None:
        letter = self.selected()
        if letter is not None:
            self.app.push_screen(LetterScreen(letter, readonly=self.caracal.readonly))

    def apply_filter(self, text: str) -> None:
        if self.snapshot is not None:
            self.show_letters(self.snapshot)

    def focus_main(self) -> None:
        self.table.focus()

    def action_target(self, action: str) -> tuple[str, str] | None:
        letter = self.selected()
        if letter is None or not action.startswith("dlq."):
            return None
        return str(letter.dlq_id), f"dead letter {letter.dlq_id} ({letter.error_type})"
