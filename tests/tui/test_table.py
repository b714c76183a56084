"""The snapshot table draws exactly what DataTable draws, only faster: compared line by line with DataTable's
own drawing in every view, layout and cursor state, and its shortcuts compared with Rich's own layout."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.padding import Padding
from rich.style import Style
from rich.text import Text
from textual.coordinate import Coordinate
from textual.strip import Strip
from textual.widgets import DataTable
from textual.widgets._data_table import default_cell_formatter

from caracal_tui.fake import FakeSource
from caracal_tui.widgets.table import LazyCells, SnapshotTable, _content_key, _one_line, _simple_line
from tests.tui.helpers import make_app, settle, table_rows

#: What SnapshotTable draws its own way; without them it is DataTable.
OWN_DRAWING = (
    "_render_cell",
    "_render_line_in_row",
    "_get_row_style",
    "_compute_row_renderables",
    "render_line",
    "render_lines",
    "_y_offsets",
)


@contextmanager
def as_datatable(table: SnapshotTable) -> Iterator[None]:
    """``table`` drawing with DataTable's own methods (instance attributes hide the class's)."""
    for name in OWN_DRAWING:
        attribute = getattr(DataTable, name)
        if isinstance(attribute, property):
            continue
        setattr(table, name, attribute.__get__(table))
    try:
        yield
    finally:
        for name in OWN_DRAWING:
            table.__dict__.pop(name, None)


def lines(table: SnapshotTable, *, datatable: bool) -> list[list[Any]]:
    table._clear_caches()
    table._pseudo_class_state = table.get_pseudo_class_state()
    if datatable:
        with as_datatable(table):
            drawn: list[Strip] = [DataTable.render_line(table, y) for y in range(table.size.height)]
    else:
        table._paint = {}
        try:
            drawn = [table.render_line(y) for y in range(table.size.height)]
        finally:
            table._paint = None
    return [list(strip) for strip in drawn]


VIEWS = {
    "agents": ("agents", ()),
    "agents-filtered": ("agents", ("slash", *"month")),
    "agent-detail": ("agents", ("down", "enter")),
    "ledger": ("ledger", ()),
    "dlq": ("dlq", ()),
    "integrity": ("integrity", ()),
    "operations": ("operations", ()),
}


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
@pytest.mark.parametrize("view", list(VIEWS))
async def test_every_line_is_the_one_datatable_draws(view: str, size: tuple[int, int]) -> None:
    initial, keys = VIEWS[view]
    source = FakeSource(agents=300, clock=None, live=True, tampered=True)
    app = make_app(source, initial_view=initial)
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        for key in keys:
            await pilot.press(key)
        await settle(pilot)
        tables = [t for t in app.screen.query(SnapshotTable) if t.region.area]
        assert tables
        for table in tables:
            for state in ("first", "cursor", "hover", "scrolled", "unfocused"):
                if state == "cursor":
                    table.move_cursor(row=min(3, max(table.row_count - 1, 0)))
                elif state == "hover":
                    table._show_hover_cursor = True
                    table.hover_coordinate = Coordinate(min(2, max(table.row_count - 1, 0)), 1)
                elif state == "scrolled" and table.row_count > table.size.height:
                    table.scroll_to(y=7, animate=False)
                elif state == "unfocused":
                    table.blur()
                await pilot.pause()
                # twice: the second drawing comes from what the first one kept
                for _ in range(2):
                    assert lines(table, datatable=False) == lines(table, datatable=True), (view, state)


styles = st.sampled_from(["", "dim", "bold red", "green", "on blue", Style(italic=True), Style.null()])
texts = st.text(st.characters(blacklist_categories=["Cs", "Cc"]), max_size=30) | st.sampled_from(
    [
        "",
        " ",
        "$1,234.56 / $5,000.00",
        "● active",
        "■ suspended",
        "█████░░░░░  48%",
        "漢字かな",
        "naïve",
        "a\tb",
    ]
)


@settings(max_examples=1000, deadline=None)
@given(plain=texts, style=styles, width=st.integers(min_value=2, max_value=40), padding=st.integers(0, 2))
def test_a_text_cell_is_laid_out_as_rich_lays_it_out(
    plain: str, style: str | Style, width: int, padding: int
) -> None:
    console = Console(width=200, legacy_windows=False)
    options = console.options.update_dimensions(width, 1).update(no_wrap=True)
    for cell in (Text(plain, style=style, end="", no_wrap=True), Text(plain, style=style)):
        ours = _simple_line(cell, width, padding, console.get_style)
        if ours is not None:
            assert ours == console.render_lines(Padding(cell, (0, padding)), options)[0]


@pytest.mark.parametrize(
    "cell",
    [
        "",
        "-",
        "$1,234.56 / $5,000.00",
        "team-3@example.com",
        "a  b ",
        "[bold]x[/]",
        ":smile: ok",
        "one\ntwo",
        "a\rb",
    ],
)
def test_a_string_cell_is_read_as_datatable_reads_it(cell: str) -> None:
    ours, theirs = _one_line(cell), default_cell_formatter(cell, wrap=False, height=1)
    assert isinstance(ours, Text)
    assert isinstance(theirs, Text)
    assert _content_key(ours) == _content_key(theirs)


async def test_lazy_rows_are_made_when_drawn_and_replaced_in_place() -> None:
    made: list[str] = []

    def cells(name: str) -> tuple[str, str]:
        made.append(name)
        return name, name.upper()

    app = make_app(FakeSource(), initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        table = SnapshotTable(id="lazy")
        await app.screen.mount(table)
        table.set_columns([("a", "A", 10), ("b", "B", 10)])
        rows = [(f"k{i}", LazyCells(f"row{i}", cells)) for i in range(200)]
        table.show_rows(rows)
        await pilot.pause()
        assert 0 < len(made) < 200  # only the rows on screen
        table.move_cursor(row=5)
        again = [rows[0], ("k1", LazyCells("changed", cells)), *rows[2:]]
        table.show_rows(again)
        await pilot.pause()
        assert table.selected_key == "k5"
        read = table_rows(app, "#lazy")
        assert read[1] == ["changed", "CHANGED"]
        assert read[150] == ["row150", "ROW150"]
