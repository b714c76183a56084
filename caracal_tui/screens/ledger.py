"""Ledger: what an agent (or every agent) was charged, event by event, in a time range."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Input, Label

from caracal_tui import keymap
from caracal_tui.format import amount, count, describe, parse_when, stamp, tokens
from caracal_tui.screens.base import ViewScreen
from caracal_tui.sources import LedgerPage, LedgerQuery, LedgerRow
from caracal_tui.widgets.bars import StatusLine
from caracal_tui.widgets.inputs import TextInput
from caracal_tui.widgets.table import SnapshotTable

_TYPE_STYLE = {"denial": "red", "expiry": "yellow", "adjustment": "cyan", "reservation": "dim"}


def _matches(row: LedgerRow, text: str) -> bool:
    if not text:
        return True
    haystack = f"{row.event_type} {row.agent_name} {row.model or ''} {row.resource}".lower()
    return all(part in haystack for part in text.lower().split())


class LedgerScreen(ViewScreen):
    VIEW = "ledger"
    SCOPE = "ledger"
    TITLE_TEXT = "Ledger"
    FILTERABLE = True
    BINDINGS: ClassVar = keymap.bindings("ledger")

    DEFAULT_CSS = """
    LedgerScreen #query {
        height: 1;
        margin: 0 1;
    }
    LedgerScreen #query Label {
        width: auto;
        padding: 0 1 0 0;
        text-style: bold;
    }
    LedgerScreen #query Input {
        width: 1fr;
        margin-right: 1;
    }
    LedgerScreen #query #q-agent {
        width: 2fr;
    }
    """

    def __init__(self) -> None:
        super().__init__()
        self.page: LedgerPage | None = None

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="query"):
            yield Label("Agent")
            yield TextInput(placeholder="name or id (all)", compact=True, id="q-agent")
            yield Label("From")
            yield TextInput(value="-24h", compact=True, id="q-start")
            yield Label("To")
            yield TextInput(value="now", compact=True, id="q-end")
        yield StatusLine("loading…", id="status")
        yield SnapshotTable(id="ledger")

    @property
    def table(self) -> SnapshotTable:
        return self.query_one("#ledger", SnapshotTable)

    def setup_columns(self, wide: bool) -> None:
        if wide:
            self.table.set_columns(
                [
                    ("time", "Time", 11),
                    ("type", "Type", 11),
                    ("agent", "Agent", 24),
                    ("what", "Model / resource", 34),
                    ("in", "In tok", 7),
                    ("out", "Out tok", 7),
                    ("cost", "Cost", 12),
                    ("id", "Event", 10),
                    ("sealed", "Sealed", 7),
                ]
            )
        else:
            self.table.set_columns(
                [
                    ("time", "Time", 11),
                    ("type", "Type", 11),
                    ("agent", "Agent", 16),
                    ("what", "Model / resource", 20),
                    ("cost", "Cost", 10),
                ]
            )

    def redraw(self) -> None:
        if self.page is not None:
            self.show_page(self.page)

    def set_agent(self, agent: str) -> None:
        self.query_one("#q-agent", Input).value = agent
        self.reload()

    def _query(self) -> LedgerQuery:
        now = self.source.now()
        start = parse_when(self.query_one("#q-start", Input).value, now, what="start time")
        end = parse_when(self.query_one("#q-end", Input).value or "now", now, what="end time")
        return LedgerQuery(self.query_one("#q-agent", Input).value.strip(), start, end)

    def reload(self) -> None:
        try:
            query = self._query()
        except Exception as exc:
            self.report_error(describe(exc))
            return
        self.loader.load("page", lambda: self.source.ledger(query))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id and event.input.id.startswith("q-"):
            event.stop()
            self.reload()
            self.table.focus()
            return
        super().on_input_submitted(event)

    def action_edit_query(self) -> None:
        self.query_one("#q-agent", Input).focus()

    @staticmethod
    def _cells(row: LedgerRow, *, wide: bool) -> tuple[str | Text, ...]:
        kind = Text(row.event_type, style=_TYPE_STYLE.get(row.event_type, ""))
        what = row.model or row.resource
        cost = amount(row.cost, exact=True)
        if not wide:
            return (stamp(row.occurred_at), kind, row.agent_name, what, cost)
        sealed = "yes" if row.sealed else Text("waiting", style="dim")
        return (
            stamp(row.occurred_at),
            kind,
            row.agent_name,
            what,
            tokens(row.input_tokens),
            tokens(row.output_tokens),
            cost,
            str(row.event_id),
            sealed,
        )

    def show_page(self, page: LedgerPage) -> None:
        self.page = page
        wide = self.wide
        rows = [r for r in page.rows if _matches(r, self.filter_text)]
        self.table.show_rows([(str(r.event_id), self._cells(r, wide=wide)) for r in rows])
        query = page.query
        text = Text()
        text.append(page.agent_name or "every agent", style="bold")
        text.append(f" · {stamp(query.start)} to {stamp(query.end)} UTC · ")
        shown = (
            f"{count(len(rows))} of {count(len(page.rows))}" if self.filter_text else count(len(page.rows))
        )
        text.append(f"{shown}{'+' if page.truncated else ''} events")
        charged = page.charged
        text.append(
            " · charged " + (", ".join(amount(m, exact=True) for m in charged) if charged else "nothing")
        )
        self.query_one("#status", StatusLine).show(text)
        self.mark_updated()

    def apply_filter(self, text: str) -> None:
        if self.page is not None:
            self.show_page(self.page)

    def focus_main(self) -> None:
        self.table.focus()
