"""``/`` filters a list as you type; ``enter`` keeps the filter, ``esc`` clears it."""

from __future__ import annotations

from textual.widgets import DataTable, Input

from caracal_tui.fake import FakeSource
from tests.tui.helpers import column, make_app, settle, table_rows, text_of


async def test_agents_filter_narrows_as_you_type_and_escape_clears(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert len(table_rows(app, "#agents")) == 24
        await pilot.press("slash")
        assert isinstance(app.focused, Input)
        await pilot.press(*"support-bot")
        await pilot.pause()
        assert column(app, "#agents", 0) == ["support-bot", "support-bot-2"]
        assert text_of(app, "#status").startswith("2 of 24 agents")

        await pilot.press("escape")
        await pilot.pause()
        assert len(table_rows(app, "#agents")) == 24
        assert isinstance(app.focused, DataTable)


async def test_filter_matches_status_and_every_word(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("slash", *"suspended")
        await pilot.pause()
        assert set(column(app, "#agents", 1)) == {"■ suspended"}
        await pilot.press("ctrl+u", *"monthly research")
        await pilot.pause()
        names = set(column(app, "#agents", 0))
        snapshot = app.screen.snapshot  # type: ignore[attr-defined]
        expected = {
            a.name
            for a in snapshot.agents
            if any(b.window == "monthly" for b in a.budgets) and "research" in f"{a.name} {a.owner}"
        }
        assert names == expected and len(names) >= 2


async def test_enter_keeps_the_filter_and_returns_to_the_list(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("slash", *"translator", "enter")
        await pilot.pause()
        assert isinstance(app.focused, DataTable)
        assert column(app, "#agents", 0) == ["translator", "translator-2"]
        # a refresh keeps the filter
        await pilot.press("r")
        await settle(pilot)
        assert column(app, "#agents", 0) == ["translator", "translator-2"]
        # and the selection works on the filtered list
        await pilot.press("down", "enter")
        await settle(pilot)
        assert app.screen.agent_name == "translator-2"  # type: ignore[attr-defined]


async def test_dead_letters_filter_by_error(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="dlq")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("slash", *"decodeerror")
        await pilot.pause()
        assert column(app, "#letters", 3) == ["DecodeError", "DecodeError"]
        assert "2 of 6 pending" in text_of(app, "#status")


async def test_ledger_filter_by_type(fake: FakeSource) -> None:
    app = make_app(fake, initial_view="ledger")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("slash", *"denial")
        await pilot.pause()
        kinds = set(column(app, "#ledger", 1))
        assert kinds == {"denial"}


async def test_integrity_filter_finds_failed_batches() -> None:
    app = make_app(FakeSource(tampered=True), initial_view="integrity")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("slash", *"failed")
        await pilot.pause()
        assert column(app, "#batches", 5) == ["✖ FAILED"]
