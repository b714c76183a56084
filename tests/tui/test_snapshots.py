"""Every screen's look, pinned at 80x24 (the smallest it must read well at) and at 160x48.

The fake source's clock is frozen, so the pictures do not move. After an intended change of look, update them
with ``pytest tests/tui/test_snapshots.py --snapshot-update`` and review the SVGs it rewrote."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import TabbedContent

from caracal_tui.fake import FakeSource
from tests.tui.helpers import make_app, settle

SIZES = {"80x24": (80, 24), "160x48": (160, 48)}

Steps = Callable[[Pilot[Any]], Awaitable[None]]


@dataclass(frozen=True)
class Case:
    view: str
    keys: tuple[str, ...] = ()
    source: Callable[[], FakeSource] = FakeSource
    readonly: bool = False
    steps: Steps | None = None


async def _history_tab(pilot: Pilot[Any]) -> None:
    pilot.app.screen.query_one(TabbedContent).active = "tab-history"


CASES: dict[str, Case] = {
    "overview": Case("overview"),
    "overview-degraded": Case(
        "overview", source=lambda: FakeSource(degraded=True, deny_all=True, tampered=True)
    ),
    "agents": Case("agents"),
    "agents-filtered": Case("agents", keys=("slash", *"monthly")),
    "agent-detail": Case("agents", keys=("down", "down", "down", "enter")),
    "agent-history": Case("agents", keys=("down", "enter"), steps=_history_tab),
    "ledger": Case("ledger"),
    "dlq": Case("dlq", keys=("down",)),
    "dlq-inspect": Case("dlq", keys=("down", "enter")),
    "integrity": Case("integrity", source=lambda: FakeSource(tampered=True)),
    "integrity-verified": Case(
        "integrity", keys=("g", *"-24h", "enter", "enter"), source=lambda: FakeSource(tampered=True)
    ),
    "operations": Case("operations"),
    "operations-readonly": Case("operations", readonly=True),
    "help": Case("agents", keys=("question_mark",)),
    "jump": Case("overview", keys=("colon", *"ag")),
    "form": Case("agents", keys=("down", "enter", "l")),
    "confirm": Case("dlq", keys=("x",)),
    "run-done": Case(
        "operations", keys=("down", "down", "enter", *"-1h", "enter", "enter", *"replay", "enter")
    ),
    "run-failed": Case("agents", keys=("s", "enter", *"suspend", "enter"), source=lambda: _failing_run()),
}


def _failing_run() -> FakeSource:
    source = FakeSource()
    source.fail["run"] = "PostgreSQL is unavailable: connection to server on socket failed"
    return source


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", list(CASES))
def test_screen(snap_compare: Any, name: str, size: str) -> None:
    case = CASES[name]
    app = make_app(case.source(), initial_view=case.view, readonly=case.readonly)

    async def run_before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        for key in case.keys:
            await pilot.press(key)
            await settle(pilot)
        if case.steps is not None:
            await case.steps(pilot)
        await settle(pilot)

    assert snap_compare(app, terminal_size=SIZES[size], run_before=run_before)
