"""Failures show as one line and the screen stays usable: a load that fails keeps the last data, an action
that cannot be planned or fails while running says why, a capability that does not exist says so, and
even a bug never puts a traceback on the screen."""

from __future__ import annotations

from pathlib import Path

import pytest

from caracal_tui.fake import FakeSource
from caracal_tui.screens.agents import AgentsScreen
from caracal_tui.screens.modals import ConfirmScreen, RunScreen
from caracal_tui.screens.operations import OperationsScreen
from caracal_tui.screens.overview import OverviewScreen
from tests.tui.helpers import make_app, notices, screen_text, settle, table_rows, text_of


async def test_a_failed_load_says_why_and_keeps_the_last_data(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        fake.fail["agents"] = "PostgreSQL is unavailable: connection refused"
        await pilot.press("r")
        await settle(pilot)
        status = text_of(app, "#status")
        assert "✖ PostgreSQL is unavailable: connection refused" in status
        assert "(showing data from 12:00:00)" in status
        assert len(table_rows(app, "#agents")) == 24
        # still usable: navigate, filter, come back; and it recovers
        await pilot.press("slash", *"translator", "enter")
        await pilot.pause()
        assert len(table_rows(app, "#agents")) == 2
        del fake.fail["agents"]
        await pilot.press("r")
        await settle(pilot)
        assert "24 agents" in text_of(app, "#status")


async def test_a_view_that_never_loaded_shows_the_error(fake: FakeSource) -> None:
    fake.fail["overview"] = "cannot start the embedded PostgreSQL in /nowhere: permission denied"
    app = make_app(fake)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, OverviewScreen)
        assert "✖ cannot start the embedded PostgreSQL" in text_of(app, "#status")
        await pilot.press("4")
        await settle(pilot)
        assert len(table_rows(app, "#letters")) == 6


async def test_an_action_that_cannot_be_planned_says_why(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("a", "enter")  # activate an agent that is active
        await settle(pilot)
        assert isinstance(app.screen, AgentsScreen)
        assert "cannot activate agent: agent support-bot is already active" in notices(app)
        assert fake.runs == []


async def test_an_action_that_fails_while_running_shows_its_error_and_closes(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        fake.fail["run"] = "agent support-bot is locked by another change; nothing was changed"
        await pilot.press("s", "enter")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press(*"suspend", "enter")
        await settle(pilot)
        run = app.screen
        assert isinstance(run, RunScreen)
        assert run.ok is False
        assert "✖ FAILED: agent support-bot is locked by another change" in screen_text(app)
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, AgentsScreen)
        assert table_rows(app, "#agents")[0][1] == "● active"
        del fake.fail["run"]
        await pilot.press("s", "enter")
        await settle(pilot)
        await pilot.press(*"suspend", "enter")
        await settle(pilot)
        assert app.screen.ok is True  # type: ignore[attr-defined]


async def test_a_missing_capability_is_shown_disabled_with_its_reason() -> None:
    reason = "no backup procedure in this installation yet"
    source = FakeSource(unavailable={"ops.backup": reason})
    app = make_app(source, initial_view="operations")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        rows = table_rows(app, "#operations")
        assert rows[0][:2] == ["back up now", "○ not available"]
        assert rows[0][2] == reason
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, OperationsScreen)
        assert f"back up now is not available: {reason}" in notices(app)
        assert source.runs == []


async def test_a_bug_in_an_action_never_shows_a_traceback(
    fake: FakeSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(fake, tmp_path=tmp_path, strict=False, initial_view="agents")

    def broken(self: AgentsScreen) -> None:
        raise KeyError("boom")

    monkeypatch.setattr(AgentsScreen, "action_filter", broken)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("slash")
        await settle(pilot)
        assert notices(app) == [
            f"internal error: KeyError: 'boom' (details in {tmp_path / 'caracal-tui.log'})"
        ]
        assert "Traceback" not in screen_text(app)
        assert "KeyError: 'boom'" in (tmp_path / "caracal-tui.log").read_text()
        # the screen still works
        await pilot.press("4")
        await settle(pilot)
        assert len(table_rows(app, "#letters")) == 6


async def test_a_bug_while_drawing_is_reported_on_the_status_line(
    fake: FakeSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(fake, initial_view="agents")

    def broken(self: AgentsScreen, snapshot: object) -> None:
        raise ValueError("bad row")

    monkeypatch.setattr(AgentsScreen, "show_agents", broken)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert "could not show agents: ValueError: bad row" in text_of(app, "#status")
        await pilot.press("1")
        await settle(pilot)
        assert isinstance(app.screen, OverviewScreen)


def test_the_last_resort_handler_leaves_with_one_line(fake: FakeSource, tmp_path: Path) -> None:
    app = make_app(fake, tmp_path=tmp_path, strict=False)
    app._handle_exception(RuntimeError("unexpected"))
    assert app.return_code == 1
    assert [str(r) for r in app._exit_renderables] == [
        f"caracal-tui stopped on an internal error: RuntimeError: unexpected (details in {tmp_path / 'caracal-tui.log'})"
    ]
    assert "RuntimeError: unexpected" in (tmp_path / "caracal-tui.log").read_text()
