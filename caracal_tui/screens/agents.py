"""Agents and budgets: every agent with its fullest budget as a bar; ``enter`` opens one agent: every policy
its requests must fit, its recent ledger events and its policy history."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import DataTable, TabbedContent, TabPane

from caracal_tui import keymap
from caracal_tui.format import amount, bar, compact, count, short_id, stamp, status_text, tokens
from caracal_tui.screens.base import ViewScreen
from caracal_tui.sources import AgentDetail, AgentRow, AgentsSnapshot, Budget
from caracal_tui.widgets.bars import StatusLine, TopBar
from caracal_tui.widgets.table import Cells, LazyCells, SnapshotTable

if TYPE_CHECKING:
    from caracal_tui.palette import Entry


def _worst(agent: AgentRow) -> Budget | None:
    return max(agent.budgets, key=lambda b: b.fraction, default=None)


def _spend(budget: Budget, *, wide: bool) -> str:
    if wide:
        return f"{amount(budget.settled)} / {amount(budget.limit)}"
    return f"{compact(budget.settled)}/{compact(budget.limit)}"


def _held(budget: Budget | None, holds: int) -> Text:
    if budget is None or holds == 0:
        return Text("-", style="dim")
    return Text(f"{amount(budget.held)} ({holds})")


def _cells(agent: AgentRow, *, wide: bool) -> Cells:
    """The agent's row: its fullest budget as a bar, in the narrow or the wide layout."""
    worst = _worst(agent)
    name = Text(agent.name, overflow="ellipsis", no_wrap=True)
    if worst is None:
        cells: list[Text | str] = [name]
        if wide:
            cells.append(agent.owner)
        cells += [
            status_text(agent.status),
            Text("none", style="dim"),
            Text("no policy", style="dim"),
            "-",
            "-",
        ]
        if wide:
            cells.append("-")
        return tuple(cells)
    window = worst.window + (f" +{len(agent.budgets) - 1}" if len(agent.budgets) > 1 else "")
    cells = [name]
    if wide:
        cells.append(agent.owner)
    cells += [
        status_text(agent.status),
        window,
        bar(worst.fraction, 10 if wide else 5),
        _spend(worst, wide=wide),
        _held(worst, agent.holds) if wide else Text(count(agent.holds) if agent.holds else "-"),
    ]
    if wide:
        cells.append(amount(worst.remaining))
    return tuple(cells)


def _wide_cells(agent: AgentRow) -> Cells:
    return _cells(agent, wide=True)


def _narrow_cells(agent: AgentRow) -> Cells:
    return _cells(agent, wide=False)


def matches(agent: AgentRow, text: str) -> bool:
    if not text:
        return True
    wanted = text.lower()
    haystack = f"{agent.name} {agent.owner} {agent.status} {agent.agent_id}".lower()
    haystack += " " + " ".join(b.window for b in agent.budgets)
    return all(part in haystack for part in wanted.split())


class AgentsScreen(ViewScreen):
    VIEW = "agents"
    SCOPE = "agents"
    TITLE_TEXT = "Agents and budgets"
    FILTERABLE = True
    BINDINGS: ClassVar = keymap.bindings("agents")

    def __init__(self) -> None:
        super().__init__()
        self.snapshot: AgentsSnapshot | None = None
        #: Per agent: its row key and cells as last shown, for the agent as it was then. Cells are made only
        #: for the rows drawn, and an unchanged agent keeps its row (the table then skips it).
        self._rows: dict[uuid.UUID, tuple[AgentRow, bool, str, LazyCells]] = {}

    def compose_body(self) -> ComposeResult:
        yield StatusLine("loading…", id="status")
        yield SnapshotTable(id="agents")

    @property
    def table(self) -> SnapshotTable:
        return self.query_one("#agents", SnapshotTable)

    def redraw(self) -> None:
        if self.snapshot is not None:
            self.show_agents(self.snapshot)

    def setup_columns(self, wide: bool) -> None:
        columns: list[tuple[str, str, int | None]] = [("name", "Agent", 26 if wide else 15)]
        if wide:
            columns.append(("owner", "Owner", 22))
        columns += [
            ("status", "Status", 11),
            ("window", "Window", 14 if wide else 10),
            ("used", "Used", 15 if wide else 10),
            ("spend", "Settled / limit" if wide else "Settled/limit", 24 if wide else 15),
            ("held", "Held (holds)" if wide else "Holds", 14 if wide else 5),
        ]
        if wide:
            columns.append(("remaining", "Remaining", 12))
        self.table.set_columns(columns)

    def reload(self) -> None:
        self.loader.load("agents", self.source.agents)

    def _row(
        self, agent: AgentRow, cache: dict[uuid.UUID, tuple[AgentRow, bool, str, LazyCells]]
    ) -> tuple[str, LazyCells]:
        found = self._rows.get(agent.agent_id)
        if found is not None and found[1] == self.wide and (found[0] is agent or found[0] == agent):
            cache[agent.agent_id] = found
            return found[2], found[3]
        key = found[2] if found is not None else str(agent.agent_id)
        cells = LazyCells(agent, _wide_cells if self.wide else _narrow_cells)
        cache[agent.agent_id] = (agent, self.wide, key, cells)
        return key, cells

    def show_agents(self, snapshot: AgentsSnapshot) -> None:
        self.snapshot = snapshot
        cache: dict[uuid.UUID, tuple[AgentRow, bool, str, LazyCells]] = {}
        wanted = self.filter_text
        shown = [a for a in snapshot.agents if matches(a, wanted)]
        self.table.show_rows([self._row(a, cache) for a in shown])
        self._rows = cache
        active = sum(1 for a in snapshot.agents if a.active)
        near = sum(1 for a in snapshot.agents if any(b.fraction >= 0.9 for b in a.budgets))
        text = Text()
        if self.filter_text:
            text.append(f"{count(len(shown))} of ", style="bold")
        text.append(f"{count(len(snapshot.agents))} agents", style="bold")
        text.append(f" · {count(active)} active · {count(len(snapshot.agents) - active)} suspended")
        text.append(" · ")
        text.append(f"{count(near)} at ≥90%", style="bold red" if near else "")
        text.append(f" · {count(snapshot.holds)} holds in flight")
        self.query_one("#status", StatusLine).show(text)
        self.mark_updated()

    def apply_filter(self, text: str) -> None:
        if self.snapshot is not None:
            self.show_agents(self.snapshot)

    def focus_main(self) -> None:
        self.table.focus()

    def selected(self) -> AgentRow | None:
        key = self.table.selected_key
        if key is None or self.snapshot is None:
            return None
        return next((a for a in self.snapshot.agents if str(a.agent_id) == key), None)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open()

    def action_open(self) -> None:
        agent = self.selected()
        if agent is not None:
            self.app.push_screen(AgentDetailScreen(agent.agent_id, agent.name))

    def action_target(self, action: str) -> tuple[str, str] | None:
        agent = self.selected()
        if agent is None or not action.startswith("agent."):
            return None
        return str(agent.agent_id), agent.name

    def palette_entries(self) -> list[Entry]:
        from caracal_tui.palette import Entry

        agent = self.selected()
        if agent is None:
            return []
        return [
            Entry(f"agents: open {agent.name}", "Its budgets, ledger and policy history", self.action_open)
        ]


class AgentDetailScreen(ViewScreen):
    VIEW = "agents"
    SCOPE = "agent"
    TITLE_TEXT = "Agent"

    BINDINGS: ClassVar = keymap.bindings("agent")

    DEFAULT_CSS = """
    AgentDetailScreen #scopes {
        height: auto;
        max-height: 7;
    }
    AgentDetailScreen TabbedContent {
        height: 1fr;
    }
    """

    def __init__(self, agent_id: uuid.UUID, name: str) -> None:
        super().__init__()
        self.agent_id = agent_id
        self.agent_name = name
        self.detail: AgentDetail | None = None

    def compose_body(self) -> ComposeResult:
        yield StatusLine(f"{self.agent_name} · loading…", id="status")
        yield SnapshotTable(id="scopes")
        with TabbedContent(id="tabs"):
            with TabPane("Recent ledger", id="tab-ledger"):
                yield SnapshotTable(id="recent")
            with TabPane("Policy history", id="tab-history"):
                yield SnapshotTable(id="history")

    def setup_columns(self, wide: bool) -> None:
        self.query_one("#scopes", SnapshotTable).set_columns(
            [
                ("policy", "Policy", 8),
                ("owner", "Of", 16 if wide else 8),
                ("window", "Window", 34 if wide else 8),
                ("used", "Used", 15 if wide else 10),
                ("spend", "Settled / limit" if wide else "Settled/limit", 24 if wide else 15),
                ("held", "Held (holds)" if wide else "Held", 14 if wide else 9),
            ]
        )
        self.query_one("#recent", SnapshotTable).set_columns(
            [
                ("time", "Time", 11),
                ("type", "Type", 11),
                ("model", "Model / resource", 40 if wide else 17),
                ("in", "In tok", 7),
                ("out", "Out tok", 7),
                ("cost", "Cost", 12 if wide else 10),
            ]
        )
        self.query_one("#history", SnapshotTable).set_columns(
            [
                ("when", "Changed", 11),
                ("policy", "Policy", 8),
                ("version", "v", 2),
                ("limit", "Limit", 12 if wide else 10),
                *([("status", "Status", 8)] if wide else []),
                ("by", "By", 24 if wide else 16),
                ("reason", "Reason", 50 if wide else 18),
            ]
        )

    def on_mount(self) -> None:
        self.query_one(TopBar).title = f"Agent {self.agent_name}"
        super().on_mount()

    def redraw(self) -> None:
        if self.detail is not None:
            self.show_detail(self.detail)

    def reload(self) -> None:
        self.loader.load("detail", lambda: self.source.agent_detail(self.agent_id))

    def show_detail(self, detail: AgentDetail) -> None:
        self.detail = detail
        agent = detail.agent
        self.agent_name = agent.name
        text = Text()
        text.append(agent.name, style="bold")
        text.append(" · ")
        text.append_text(status_text(agent.status))
        text.append(f" · {agent.owner}")
        if detail.parent_name:
            text.append(f" · under {detail.parent_name}")
        text.append(f" · {short_id(agent.agent_id)}", style="dim")
        self.query_one("#status", StatusLine).show(text)
        scopes = self.query_one("#scopes", SnapshotTable)
        wide = self.wide
        if detail.scopes:
            scopes.show_rows(
                [
                    (
                        str(b.policy_id),
                        (
                            short_id(b.policy_id),
                            "own" if b.owner_id == agent.agent_id else b.owner_name,
                            b.window_detail if wide else b.window,
                            bar(b.fraction, 10 if wide else 5),
                            _spend(b, wide=wide),
                            _held(b, b.holds),
                        ),
                    )
                    for b in detail.scopes
                ]
            )
        else:
            scopes.show_rows(
                [
                    (
                        "none",
                        (
                            "-",
                            "",
                            Text("no policy: the gateway refuses its paid calls", style="bold yellow"),
                            "",
                            "",
                            "",
                        ),
                    )
                ]
            )
        self.query_one("#recent", SnapshotTable).show_rows(
            [
                (
                    str(row.event_id),
                    (
                        stamp(row.occurred_at),
                        row.event_type,
                        row.model or row.resource,
                        tokens(row.input_tokens),
                        tokens(row.output_tokens),
                        amount(row.cost, exact=True),
                    ),
                )
                for row in detail.recent
            ]
        )
        self.query_one("#history", SnapshotTable).show_rows(
            [
                (
                    f"{v.policy_id}:{v.version}",
                    (
                        stamp(v.created_at),
                        short_id(v.policy_id),
                        str(v.version),
                        amount(v.limit) if wide or v.status == "active" else Text("inactive", style="dim"),
                        *([v.status] if wide else []),
                        v.changed_by,
                        v.change_reason,
                    ),
                )
                for v in reversed(detail.history)
            ]
        )
        self.mark_updated()

    def action_target(self, action: str) -> tuple[str, str] | None:
        if self.detail is None:
            return None
        if action.startswith("agent."):
            return str(self.agent_id), self.agent_name
        if action == "policy.change-limit":
            budget = self.selected_budget()
            if budget is None:
                return None
            label = f"{budget.window} policy {short_id(budget.policy_id)} of {budget.owner_name}"
            return str(budget.policy_id), label
        return None

    def selected_budget(self) -> Budget | None:
        if self.detail is None:
            return None
        key = self.query_one("#scopes", SnapshotTable).selected_key
        return next((b for b in self.detail.scopes if str(b.policy_id) == key), None)

    def form_defaults(self, action: str) -> dict[str, str]:
        budget = self.selected_budget()
        if action == "policy.change-limit" and budget is not None:
            return {"limit": budget.limit.decimal_string()}
        return {}

    def action_ledger(self) -> None:
        self.caracal.open_ledger_for(self.agent_name)
