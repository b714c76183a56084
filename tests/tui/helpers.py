"""Driving the dashboard in tests: make the app, wait until it has drawn, read what a view shows."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from caracal_tui.app import CaracalApp
from caracal_tui.sources import DataSource


def make_app(source: DataSource, *, tmp_path: Path | None = None, **kwargs: Any) -> CaracalApp:
    """An app that never refreshes on its own (tests say when) and raises what it would otherwise log."""
    kwargs.setdefault("refresh_seconds", 0)
    kwargs.setdefault("strict", True)
    kwargs.setdefault("blink", False)
    if tmp_path is not None:
        kwargs.setdefault("error_log", tmp_path / "caracal-tui.log")
    return CaracalApp(source, **kwargs)


async def settle(pilot: Pilot[Any], limit: float = 20.0) -> None:
    """Wait until every load has arrived and been drawn, and every worker (a running action) is done."""
    app = pilot.app
    assert isinstance(app, CaracalApp)
    deadline = time.monotonic() + limit
    while True:
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        if app.idle and not any(w.is_running for w in app.workers):
            await pilot.pause()
            return
        if time.monotonic() > deadline:
            raise AssertionError("the dashboard did not settle")
        await pilot.pause(0.02)


def plain(renderable: Any, width: int = 200) -> str:
    """What a widget's content reads as, without colour."""
    console = Console(width=width, record=True, color_system=None, legacy_windows=False, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def text_of(app: CaracalApp, selector: str) -> str:
    widget = app.screen.query_one(selector, Static)
    return plain(widget.content)


def table_rows(app: CaracalApp, selector: str) -> list[list[str]]:
    table = app.screen.query_one(selector, DataTable)
    rows = []
    for index in range(table.row_count):
        rows.append([plain(cell).strip() for cell in table.get_row_at(index)])
    return rows


def column(app: CaracalApp, selector: str, index: int) -> list[str]:
    return [row[index] for row in table_rows(app, selector)]


def screen_text(app: CaracalApp) -> str:
    """Everything on the screen, as text (from the same render a terminal gets)."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


def notices(app: CaracalApp) -> list[str]:
    """The notifications on screen (toasts wrap their text, so they are read from the app)."""
    return [n.message for n in app._notifications]
