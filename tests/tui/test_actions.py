"""Every action that changes something shows its plan and runs only after its word is typed; ``--readonly``
hides them all. (The same paths against real PostgreSQL: test_live_actions.py.)"""

from __future__ import annotations

from textual.widgets import Input, ProgressBar

from caracal_tui import actions
from caracal_tui.fake import FakeSource
from caracal_tui.screens.agents import AgentDetailScreen, AgentsScreen
from caracal_tui.screens.integrity import IntegrityScreen
from caracal_tui.screens.modals import ConfirmScreen, FormScreen, RunScreen
from caracal_tui.screens.operations import OperationsScreen
from tests.tui.helpers import column, make_app, screen_text, settle, table_rows, text_of


async def _confirm(pilot, word: str) -> None:  # type: ignore[no-untyped-def]
    await settle(pilot)
    assert isinstance(pilot.app.screen, ConfirmScreen), pilot.app.screen
    await pilot.press(*word, "enter")
    await settle(pilot)


async def test_suspend_shows_the_plan_refuses_a_wrong_word_and_runs_on_the_right_one(
    fake: FakeSource,
) -> None:
    app = make_app(fake, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("s")
        await pilot.pause()
        assert isinstance(app.screen, FormScreen)
        await pilot.press(*"runaway loop", "enter")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmScreen)
        text = screen_text(app)
        assert "Plan: Suspend agent support-bot" in text
        assert "1. Set agent support-bot" in text
        assert "Type suspend to run it" in text

        await pilot.press(*"yes", "enter")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        assert "type exactly 'suspend'" in screen_text(app)
        assert fake.runs == []

        await pilot.press("ctrl+u", *"suspend", "enter")
        await settle(pilot)
        assert isinstance(app.screen, RunScreen)
        assert app.screen.ok is True
        assert "✔ done: agent support-bot is suspended" in screen_text(app)
        assert app.screen.query_one(ProgressBar).percentage == 1.0
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, AgentsScreen)
        assert table_rows(app, "#agents")[0][1] == "■ suspended"
        assert [plan.request.action for plan in fake.runs] == ["agent.suspend"]
        assert fake.runs[0].request.param("reason") == "runaway loop"


async def test_escape_at_the_plan_changes_nothing(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("s", "enter")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, AgentsScreen)
        assert fake.runs == []
        assert table_rows(app, "#agents")[0][1] == "● active"


async def test_activate_a_suspended_agent(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("slash", *"suspended", "enter")
        await pilot.pause()
        await pilot.press("a", "enter")
        await _confirm(pilot, "activate")
        assert isinstance(app.screen, RunScreen) and app.screen.ok
        await pilot.press("escape")
        await settle(pilot)
        assert column(app, "#agents", 1) == ["■ suspended"]  # the other one


async def test_change_a_limit_from_the_agent_detail(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, AgentDetailScreen)
        await pilot.press("l")
        await pilot.pause()
        assert isinstance(app.screen, FormScreen)
        limit = app.screen.query_one("#field-limit", Input)
        assert limit.value == "1000.00"  # the current limit, to edit
        await pilot.press("ctrl+u", *"1500", "enter", *"more traffic", "enter")
        await settle(pilot)
        assert "$1,000.00 USD -> $1,500.00 USD" in screen_text(app)
        await _confirm(pilot, "change")
        assert isinstance(app.screen, RunScreen) and app.screen.ok
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, AgentDetailScreen)
        assert "$1,500" in table_rows(app, "#scopes")[0][4]


async def test_form_refuses_missing_required_values(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)
        await pilot.press("l", "ctrl+u", "enter", "enter")
        await pilot.pause()
        assert isinstance(app.screen, FormScreen)
        assert "required: New limit, Reason" in screen_text(app)
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, AgentDetailScreen)
        assert fake.runs == []


async def test_retry_and_purge_dead_letters(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="dlq")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("t")
        await _confirm(pilot, "retry")
        assert isinstance(app.screen, RunScreen) and app.screen.ok
        await pilot.press("enter")
        await settle(pilot)
        assert column(app, "#letters", 0)[0] == "102"

        await pilot.press("x")
        await settle(pilot)
        assert "[destructive]" in screen_text(app)
        await _confirm(pilot, "purge")
        await pilot.press("enter")
        await settle(pilot)
        assert column(app, "#letters", 0) == ["103", "104", "105", "106"]


async def test_operations_show_progress_and_stop_writes_raises_the_alert(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="operations")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("down", "down", "enter", *"-2h", "enter", "enter")
        await settle(pilot)
        assert "Replay metering events" in screen_text(app)
        await _confirm(pilot, "replay")
        run = app.screen
        assert isinstance(run, RunScreen) and run.ok
        text = screen_text(app)
        assert "✔ 3/3 Start the ledger writer" in text
        assert "replayed 4,812 events" in text
        await pilot.press("enter")
        await settle(pilot)

        assert "DENY-ALL" not in screen_text(app)
        operations = app.screen
        assert isinstance(operations, OperationsScreen)
        operations.table.move_cursor(row=4)
        assert operations.table.selected_key == "ops.stop-writes"
        await pilot.press("enter", *"incident 42", "enter")
        await _confirm(pilot, "stop-writes")
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, OperationsScreen)
        assert "DENY-ALL ON" in screen_text(app)
        assert "ON" in text_of(app, "#facts")


async def test_verify_a_batch_and_a_range(fake: FakeSource) -> None:
    app = make_app(FakeSource(tampered=True), initial_view="integrity")
    async with app.run_test(size=(100, 40)) as pilot:
        await settle(pilot)
        await pilot.press("v")
        await settle(pilot)
        result = text_of(app, "#result")
        assert "✔ PASSED" in result
        assert "1 batches, 412 events" in result

        await pilot.press("g", *"-24h", "enter", "enter")
        await settle(pilot)
        assert isinstance(app.screen, IntegrityScreen)
        result = text_of(app, "#result")
        assert "✖ FAILED" in result
        assert "First bad event" in result
        assert "column cost differs" in result


async def test_readonly_hides_every_change(fake: FakeSource) -> None:
    app = make_app(fake, readonly=True, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert "READ-ONLY" in screen_text(app).splitlines()[0]
        footer = screen_text(app).splitlines()[-1]
        assert "Suspend" not in footer and "Activate" not in footer
        await pilot.press("s")
        await pilot.press("a")
        await settle(pilot)
        assert isinstance(app.screen, AgentsScreen)
        names = [e.name for e in app.palette_entries(app.screen)]
        changing = {spec.palette_name for spec in actions.CATALOGUE if spec.changes}
        assert not changing & set(names)

        await pilot.press("6")
        await settle(pilot)
        assert "read-only: no operation can be run" in text_of(app, "#status")
        assert not app.screen.query_one("#operations").display
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, OperationsScreen)

        await pilot.press("5", "v")
        await settle(pilot)
        assert "PASSED" in text_of(app, "#result")  # reading is still allowed
        assert fake.runs == []
