"""What every view shares: the bars around it, background loading, the ``/`` filter, and ``--readonly``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from textual import events
from textual.app import ComposeResult
from textual.dom import DOMNode
from textual.screen import Screen
from textual.widgets import Footer, Input

from caracal_tui import keymap
from caracal_tui.format import clock, describe
from caracal_tui.messages import Loaded, LoadFailed, Rendered
from caracal_tui.sources import DataSource
from caracal_tui.widgets.bars import AlertBanner, StatusLine, TopBar
from caracal_tui.widgets.filter import FilterBar
from caracal_tui.widgets.table import SnapshotTable

if TYPE_CHECKING:
    from caracal_tui.app import CaracalApp
    from caracal_tui.palette import Entry


class Loader:
    """Runs a source call in a worker thread and posts the result (or the error) back to its owner.

    A call for a key already in flight is not started twice: it runs once more when the first returns, so a
    refresh every second against a slow database never piles up threads."""

    def __init__(self, owner: DOMNode) -> None:
        self._screen = owner
        self._inflight: set[str] = set()
        self._again: dict[str, Callable[[], object]] = {}
        self._when_idle: list[Callable[[], object]] = []

    def busy(self, key: str) -> bool:
        return key in self._inflight

    @property
    def idle(self) -> bool:
        return not self._inflight and not self._again

    def load(self, key: str, call: Callable[[], object]) -> None:
        if key in self._inflight:
            self._again[key] = call
            return
        self._inflight.add(key)
        screen = self._screen

        def work() -> None:
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                data = call()
            except Exception as exc:
                screen.post_message(LoadFailed(key, describe(exc)))
            else:
                seconds = time.perf_counter() - started
                screen.post_message(Loaded(key, data, seconds, time.thread_time() - cpu))

        screen.run_worker(work, thread=True, group=f"load-{key}", exit_on_error=False)

    def done(self, key: str) -> None:
        self._inflight.discard(key)
        again = self._again.pop(key, None)
        if again is not None:
            self.load(key, again)
        if self.idle and self._when_idle:
            waiting, self._when_idle = self._when_idle, []
            for call in waiting:
                call()

    def when_idle(self, call: Callable[[], object]) -> None:
        """``call()`` once nothing is loading (now, if nothing is)."""
        if self.idle:
            call()
        else:
            self._when_idle.append(call)


#: From this many columns on, views show their wide layout (more columns, full ids and amounts).
WIDE = 120


class ViewScreen(Screen[None]):
    """A view of the dashboard. Subclasses compose their body, ``reload()`` their data and draw it in
    ``show_<key>(data)`` when it arrives; a failed load keeps the last data on screen and says why."""

    VIEW: ClassVar[str] = ""
    SCOPE: ClassVar[str] = ""
    TITLE_TEXT: ClassVar[str] = ""
    FILTERABLE: ClassVar[bool] = False
    AUTO_FOCUS = "SnapshotTable"

    def __init__(self) -> None:
        super().__init__()
        self.loader = Loader(self)
        self.updated_at: str = ""
        self.wide = False
        self.last_error: str | None = None

    # ------------------------------------------------------------------ plumbing

    @property
    def caracal(self) -> CaracalApp:
        from caracal_tui.app import CaracalApp

        app = self.app
        assert isinstance(app, CaracalApp)
        return app

    @property
    def source(self) -> DataSource:
        return self.caracal.source

    def compose(self) -> ComposeResult:
        bar = TopBar()
        bar.title = self.TITLE_TEXT
        yield bar
        yield AlertBanner()
        yield from self.compose_body()
        if self.FILTERABLE:
            yield FilterBar()
        yield Footer()

    def compose_body(self) -> ComposeResult:
        yield from ()

    def on_mount(self) -> None:
        self.wide = self.app.size.width >= WIDE
        self.setup_columns(self.wide)
        bar = self.query_one(TopBar)
        bar.source = self.caracal.source_label
        bar.readonly = self.caracal.readonly
        self.show_alerts()
        self.reload()

    def on_resize(self, event: events.Resize) -> None:
        wide = event.size.width >= WIDE
        if wide != self.wide:
            self.wide = wide
            self.setup_columns(wide)
            self.redraw()

    def setup_columns(self, wide: bool) -> None:
        """Lay out the view's tables for a narrow (80 columns) or a wide terminal."""

    def redraw(self) -> None:
        """Draw the last snapshot again (after the layout changed)."""

    def on_screen_resume(self) -> None:
        self.show_alerts()

    def show_alerts(self) -> None:
        self.query_one(AlertBanner).show_alerts(self.caracal.alerts)

    def reload(self) -> None:
        """Load this view's data again (in the background)."""

    def mark_updated(self, at_text: str | None = None) -> None:
        self.updated_at = at_text or clock(self.source.now())
        self.query_one(TopBar).updated = f"updated {self.updated_at}"

    def on_loaded(self, message: Loaded) -> None:
        message.stop()
        self.loader.done(message.key)
        self.last_error = None
        started, cpu = time.perf_counter(), time.thread_time()
        handler = getattr(self, f"show_{message.key.replace('-', '_')}", None)
        if handler is not None:
            try:
                handler(message.data)
            except Exception as exc:  # a bug in drawing: say so, keep the screen
                self.report_error(f"could not show {message.key}: {describe(exc)}")
                return
        drawn, drawn_cpu = time.perf_counter(), time.thread_time()

        def painted() -> None:
            self.caracal.record_timing(
                self.VIEW,
                message.key,
                message.seconds,
                drawn - started,
                message.cpu_seconds,
                drawn_cpu - cpu,
                time.perf_counter() - drawn,
                time.thread_time() - drawn_cpu,
            )

        # Recorded after the frame that shows the snapshot: tables lay their lines out only then.
        tables = [t for t in self.query(SnapshotTable) if t.unpainted and t.region.area]
        if tables:
            waiting = len(tables)

            def one_painted() -> None:
                nonlocal waiting
                waiting -= 1
                if not waiting:
                    painted()

            for table in tables:
                table.after_paint(one_painted)
        else:
            self.call_after_refresh(painted)
        self.post_message(Rendered(self.VIEW, message.key))

    def on_load_failed(self, message: LoadFailed) -> None:
        message.stop()
        self.loader.done(message.key)
        self.last_error = message.error
        handler = getattr(self, f"failed_{message.key.replace('-', '_')}", None)
        if handler is not None:
            handler(message.error)
        else:
            since = f" (showing data from {self.updated_at})" if self.updated_at else ""
            self.report_error(f"{message.error}{since}")
        self.post_message(Rendered(self.VIEW, message.key))

    def report_error(self, text: str) -> None:
        lines = self.query(StatusLine)
        if lines:
            lines.first().error(text)
        else:
            self.notify(text, severity="error", timeout=8)

    # ------------------------------------------------------------------ keys

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if self.caracal.readonly:
            bound = f"{action}({', '.join(repr(p) for p in parameters)})" if parameters else action
            if bound in keymap.changing_actions() or action in keymap.changing_actions():
                return False
            if action == "act" and parameters and self.caracal.action_changes(str(parameters[0])):
                return False
        return True

    def action_act(self, action: str) -> None:
        self.caracal.start_action(action, self)

    def action_filter(self) -> None:
        if self.FILTERABLE:
            self.query_one(FilterBar).open()

    def handle_back(self) -> bool:
        """``esc``: close the filter first (clearing it); True when that is what happened."""
        if not self.FILTERABLE:
            return False
        bar = self.query_one(FilterBar)
        if bar.shown:
            bar.close(clear=True)
            self.apply_filter("")
            self.focus_main()
            return True
        return False

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter-input":
            event.stop()
            self.apply_filter(event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter-input":
            event.stop()
            self.query_one(FilterBar).close(clear=False)
            self.focus_main()

    def apply_filter(self, text: str) -> None:
        """Show only what matches ``text`` (lists override this)."""

    def focus_main(self) -> None:
        """Focus the view's main widget (its list)."""

    @property
    def filter_text(self) -> str:
        if not self.FILTERABLE:
            return ""
        return self.query_one(FilterBar).value

    # ------------------------------------------------------------------ actions

    def action_target(self, action: str) -> tuple[str, str] | None:
        """``(target id, label)`` for an action that needs a selection here, or None when nothing fits."""
        return None

    def palette_entries(self) -> list[Entry]:
        """Extra palette entries for this view (beyond the global ones)."""
        return []

    def action_finished(self, action: str) -> None:
        """An action changed something: show it."""
        self.reload()
