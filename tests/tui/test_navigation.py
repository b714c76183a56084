"""Moving around: views by digit and by ``:`` name, drill-down and ``esc`` back, help generated from the
keymap, the command palette's "group: action" entries, and input that never waits for a refresh."""

from __future__ import annotations

import re
import time
from pathlib import Path

from textual.command import CommandPalette
from textual.widgets import DataTable, Input, TabbedContent

from caracal_tui import keymap
from caracal_tui.fake import FakeSource
from caracal_tui.screens.agents import AgentDetailScreen, AgentsScreen
from caracal_tui.screens.dlq import DlqScreen, LetterScreen
from caracal_tui.screens.integrity import IntegrityScreen
from caracal_tui.screens.ledger import LedgerScreen
from caracal_tui.screens.modals import HelpScreen, JumpScreen
from caracal_tui.screens.operations import OperationsScreen
from caracal_tui.screens.overview import OverviewScreen
from tests.tui.helpers import make_app, screen_text, settle, table_rows, text_of

VIEW_SCREENS = {
    "overview": OverviewScreen,
    "agents": AgentsScreen,
    "ledger": LedgerScreen,
    "dlq": DlqScreen,
    "integrity": IntegrityScreen,
    "operations": OperationsScreen,
}


async def test_starts_on_the_overview_and_digits_switch_views(fake: FakeSource) -> None:
    app = make_app(fake)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, OverviewScreen)
        assert "store" in text_of(app, "#components")
        for view in keymap.VIEWS:
            await pilot.press(view.key)
            await settle(pilot)
            assert isinstance(app.screen, VIEW_SCREENS[view.id]), view.id
            assert view.title in screen_text(app).splitlines()[0]


async def test_colon_jumps_by_name_alias_or_digit_and_refuses_unknown_names(fake: FakeSource) -> None:
    app = make_app(fake)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("colon")
        assert isinstance(app.screen, JumpScreen)
        await pilot.press(*"dlq", "enter")
        await settle(pilot)
        assert isinstance(app.screen, DlqScreen)

        await pilot.press("colon", *"ag", "enter")
        await settle(pilot)
        assert isinstance(app.screen, AgentsScreen)

        await pilot.press("colon", "5", "enter")
        await settle(pilot)
        assert isinstance(app.screen, IntegrityScreen)

        await pilot.press("colon", *"nowhere", "enter")
        await pilot.pause()
        assert isinstance(app.screen, JumpScreen)
        assert "no view 'nowhere'" in screen_text(app)
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, IntegrityScreen)


async def test_enter_drills_into_an_agent_and_escape_comes_back(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("down", "enter")
        await settle(pilot)
        assert isinstance(app.screen, AgentDetailScreen)
        assert app.screen.agent_name == "research-agent"
        assert "research-agent" in text_of(app, "#status")
        assert table_rows(app, "#scopes")[0][1] == "own"
        assert len(table_rows(app, "#recent")) > 0
        app.screen.query_one(TabbedContent).active = "tab-history"
        await pilot.pause()
        history = table_rows(app, "#history")
        assert [row[2] for row in history] == ["2", "1"]  # newest version first
        assert history[0][3] == "$50.00" and history[1][3] == "$25.00"

        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, AgentsScreen)
        # the cursor is still on the agent that was opened
        assert app.screen.selected() is not None
        assert app.screen.selected().name == "research-agent"  # type: ignore[union-attr]


async def test_escape_goes_back_to_the_previous_view(fake: FakeSource) -> None:
    app = make_app(fake)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("2")
        await settle(pilot)
        await pilot.press("4")
        await settle(pilot)
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, AgentsScreen)
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, OverviewScreen)


async def test_ledger_key_in_agent_detail_opens_the_ledger_for_that_agent(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)
        await pilot.press("L")
        await settle(pilot)
        assert isinstance(app.screen, LedgerScreen)
        assert app.screen.query_one("#q-agent", Input).value == "support-bot"
        agents = {row[2] for row in table_rows(app, "#ledger")}
        assert agents == {"support-bot"}


async def test_ledger_query_by_agent_and_time(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="ledger")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        everyone = table_rows(app, "#ledger")
        assert len({row[2] for row in everyone}) > 1
        await pilot.press("e")
        assert app.focused is app.screen.query_one("#q-agent", Input)
        await pilot.press(*"translator", "tab", "ctrl+u", *"-3h", "enter")
        await settle(pilot)
        rows = table_rows(app, "#ledger")
        assert rows and {row[2] for row in rows} == {"translator"}
        status = text_of(app, "#status")
        assert "translator" in status
        assert "03-14 09:00 to 03-14 12:00 UTC" in status
        assert isinstance(app.focused, DataTable)


async def test_help_is_generated_from_the_keymap(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="dlq")
    async with app.run_test(size=(100, 40)) as pilot:
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        text = screen_text(app)
        for key in [*keymap.keys_for("dlq"), *keymap.keys_for("global")]:
            assert key.description in text, key
        assert "Suspend" not in text  # another view's keys are not listed
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, DlqScreen)


async def test_palette_entries_are_named_group_action(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        entries = app.palette_entries(app.screen)
        names = [entry.name for entry in entries]
        assert all(re.fullmatch(r"[a-z]+: \S.*", name) for name in names), names
        assert "view: dlq" in names
        assert "agents: suspend agent" in names
        assert "operations: back up now" in names
        assert "dlq: retry dead letter" not in names  # needs a dead letter selected: not on this view

        await pilot.press("ctrl+p")
        await pilot.pause()
        assert isinstance(app.screen, CommandPalette)
        await pilot.press(*"view: integ")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, IntegrityScreen)


async def test_dead_letter_inspect_shows_the_payload_and_error(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="dlq")
    async with app.run_test(size=(100, 40)) as pilot:
        await settle(pilot)
        assert "UnknownAgent" in text_of(app, "#detail")
        await pilot.press("down")
        await pilot.pause()
        assert "DecodeError" in text_of(app, "#detail")
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, LetterScreen)
        text = screen_text(app)
        assert "Dead letter 102" in text
        assert "payload" in text
        assert "metering/v1" in text  # the headers
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, DlqScreen)


async def test_refresh_reloads_the_current_view(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        before = fake.calls["agents"]
        await pilot.press("r")
        await settle(pilot)
        assert fake.calls["agents"] == before + 1
        assert fake.calls.get("overview", 0) >= 1  # the alerts are refreshed with it


async def test_a_refresh_reads_the_alerts_once_the_view_has_its_data(fake: FakeSource) -> None:
    """The view's data first (the operator reads it; the alerts' probes would compete with its queries),
    the alerts straight after."""
    app = make_app(fake, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        before = fake.calls.get("overview", 0)
        fake.delay["agents"] = 0.3
        await pilot.press("r")
        await pilot.pause(0.1)
        assert fake.calls.get("overview", 0) == before  # the view is still loading
        await settle(pilot)
        assert fake.calls.get("overview", 0) == before + 1


async def test_timer_refreshes_in_the_background(tmp_path: Path) -> None:
    source = FakeSource()
    app = make_app(source, tmp_path=tmp_path, refresh_seconds=0.1, initial_view="dlq")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        first = source.calls["dead_letters"]
        await pilot.pause(0.5)
        assert source.calls["dead_letters"] > first


async def test_input_is_handled_while_a_slow_load_is_in_flight() -> None:
    source = FakeSource()
    source.delay["agents"] = 4.0
    app = make_app(source)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        started = time.monotonic()
        await pilot.press("2")
        await pilot.pause()
        agents = app.screen
        assert isinstance(agents, AgentsScreen)
        await pilot.press("colon")
        await pilot.pause()
        assert isinstance(app.screen, JumpScreen)
        # the prompt came up while the agents were still loading behind it
        assert agents.loader.busy("agents")
        assert time.monotonic() - started < 4.0
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, AgentsScreen)
        assert len(table_rows(app, "#agents")) == 24


async def test_refreshes_do_not_pile_up_behind_a_slow_source() -> None:
    source = FakeSource()
    app = make_app(source, initial_view="dlq")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        source.delay["dead_letters"] = 3.0
        calls = source.calls["dead_letters"]
        for _ in range(10):
            await pilot.press("r")
        await settle(pilot)
        # one in flight, one more afterwards: not ten
        assert source.calls["dead_letters"] - calls == 2
