"""``caracal-tui``: the live operations dashboard.

The app takes a :class:`~caracal_tui.sources.DataSource` (the live one over the ops toolkit, or the fake one
for tests and ``--demo``); each view loads its snapshot in a worker thread and redraws when it arrives, every
``--refresh`` seconds and on ``r``, so input never waits for the database. A failure shows as one line and the
screen keeps its last data; no traceback ever reaches the terminal (``CARACAL_DEBUG=1`` logs them to a file).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import tempfile
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import typer
from rich.text import Text
from textual.actions import ActionParseResult
from textual.app import App
from textual.dom import DOMNode
from textual.screen import Screen

from caracal_tui import actions, keymap
from caracal_tui.format import describe
from caracal_tui.messages import Loaded, LoadFailed, OverviewUpdated
from caracal_tui.palette import CaracalCommands, Entry
from caracal_tui.screens.agents import AgentsScreen
from caracal_tui.screens.base import Loader, ViewScreen
from caracal_tui.screens.dlq import DlqScreen
from caracal_tui.screens.integrity import IntegrityScreen
from caracal_tui.screens.ledger import LedgerScreen
from caracal_tui.screens.modals import ConfirmScreen, FormScreen, HelpScreen, JumpScreen, RunScreen
from caracal_tui.screens.operations import OperationsScreen
from caracal_tui.screens.overview import OverviewScreen
from caracal_tui.sources import ActionPlan, ActionRequest, Alert, DataSource, Overview

if TYPE_CHECKING:
    from textual.command import Provider


@dataclass(frozen=True, slots=True)
class Timing:
    view: str
    key: str
    fetch_seconds: float  # in the worker: the source's call
    render_seconds: float  # on the UI thread: drawing the snapshot
    fetch_cpu: float = 0.0  # the same in CPU time of the thread (what they cost on an idle machine)
    render_cpu: float = 0.0
    paint_seconds: float = 0.0  # on the UI thread, from drawing to the frame that shows it composed
    paint_cpu: float = 0.0


class CaracalApp(App[None]):
    TITLE = "Caracal"
    COMMANDS: ClassVar[set[type[Provider] | Callable[[], type[Provider]]]] = {CaracalCommands}
    BINDINGS: ClassVar = keymap.bindings("global")
    MODES: ClassVar = {
        "overview": OverviewScreen,
        "agents": AgentsScreen,
        "ledger": LedgerScreen,
        "dlq": DlqScreen,
        "integrity": IntegrityScreen,
        "operations": OperationsScreen,
    }
    CSS = """
    Screen {
        layout: vertical;
    }
    """

    def __init__(
        self,
        source: DataSource,
        *,
        readonly: bool = False,
        refresh_seconds: float = 2.0,
        initial_view: str = "overview",
        strict: bool = False,
        error_log: Path | None = None,
        blink: bool = True,
    ) -> None:
        super().__init__()
        self.source = source
        self.readonly = readonly
        self.refresh_seconds = refresh_seconds
        self.initial_view = initial_view
        #: Raise unexpected exceptions (tests) instead of logging them and carrying on.
        self.strict = strict
        #: Text cursors blink (off for tests and screenshots).
        self.blink = blink
        self.error_log = error_log or Path(tempfile.gettempdir()) / f"caracal-tui-{os.getuid()}.log"
        self.alerts: tuple[Alert, ...] = ()
        self.timings: deque[Timing] = deque(maxlen=1000)
        self.loader = Loader(self)
        self._history: list[str] = []
        #: The collector's thresholds before the app tuned them (None: not tuned, see ``_tune_collector``).
        self._gc_thresholds: tuple[int, int, int] | None = None
        self._first_shown = False
        try:
            self.source_label = source.describe()
        except Exception as exc:
            self.source_label = f"source error: {describe(exc)}"

    # ------------------------------------------------------------------ life cycle

    def on_mount(self) -> None:
        self._tune_collector()
        self.switch_mode(self.initial_view)
        if self.refresh_seconds > 0:
            self.set_interval(self.refresh_seconds, self.refresh_now, name="refresh")

    def on_unmount(self) -> None:
        if self._gc_thresholds is not None:
            gc.unfreeze()
            gc.set_threshold(*self._gc_thresholds)
            self._gc_thresholds = None
        try:
            self.source.close()
        except Exception as exc:
            self._log_exception(exc)

    def current_view(self) -> ViewScreen | None:
        for screen in reversed(self.screen_stack):
            if isinstance(screen, ViewScreen):
                return screen
        return None

    @property
    def idle(self) -> bool:
        """Nothing is loading (tests and the benchmark wait for this)."""
        views = [s for s in self.screen_stack if isinstance(s, ViewScreen)]
        return self.loader.idle and all(v.loader.idle for v in views)

    def refresh_now(self) -> None:
        """Reload the view on screen, and the alerts when that view is not the overview (which has them)."""
        view = self.current_view()
        if view is not None:
            view.reload()
        if view is None or view.VIEW != "overview":
            load_alerts = partial(self.loader.load, "alerts", self.source.overview)
            if view is None:
                load_alerts()
            else:
                # The view's data first: the alerts' probes (the store's health, the ledger's sealing) would
                # compete with its queries for the database and the interpreter, and the view is what the
                # operator reads.
                view.loader.when_idle(load_alerts)

    def on_loaded(self, message: Loaded) -> None:
        self.loader.done(message.key)
        if message.key == "alerts" and isinstance(message.data, Overview):
            self.set_alerts(message.data.alerts)

    def on_load_failed(self, message: LoadFailed) -> None:
        self.loader.done(message.key)

    def on_overview_updated(self, message: OverviewUpdated) -> None:
        self.set_alerts(message.overview.alerts)

    def set_alerts(self, alerts: tuple[Alert, ...]) -> None:
        if alerts == self.alerts:
            return
        self.alerts = alerts
        for screen in self.screen_stack:
            if isinstance(screen, ViewScreen):
                screen.show_alerts()

    def record_timing(
        self,
        view: str,
        key: str,
        fetch: float,
        render: float,
        fetch_cpu: float = 0.0,
        render_cpu: float = 0.0,
        paint: float = 0.0,
        paint_cpu: float = 0.0,
    ) -> None:
        """A snapshot was drawn and is on screen."""
        self.timings.append(Timing(view, key, fetch, render, fetch_cpu, render_cpu, paint, paint_cpu))
        if not self._first_shown:
            self._first_shown = True
            gc.freeze()  # the first snapshot's table, as the start-up's objects (see _tune_collector)

    def _tune_collector(self) -> None:
        """What is alive once the app runs (the modules, Textual's widgets and styles) and then once the first
        view shows (its table) stays alive: left to the collector, every full collection walks all of it again
        (150 ms with a thousand agents, every few refreshes), so it is set aside (frozen). And a refresh of a
        thousand agents makes some ten thousand objects, which at the default thresholds is a dozen young
        collections and a middle one per refresh: let more accumulate between collections (the same work,
        done less often)."""
        if self._gc_thresholds is None:
            self._gc_thresholds = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(20_000, 20, 10)

    # ------------------------------------------------------------------ navigation

    @property
    def view_id(self) -> str:
        return self.current_mode or self.initial_view

    def action_view(self, view_id: str) -> None:
        if view_id not in self.MODES or view_id == self.current_mode:
            return
        if self.current_mode:
            self._history.append(self.current_mode)
            del self._history[:-20]
        self.switch_mode(view_id)
        view = self.current_view()
        if view is not None and view.is_mounted:
            view.reload()

    def action_jump(self) -> None:
        def chosen(view_id: str | None) -> None:
            if view_id:
                self.action_view(view_id)

        self.push_screen(JumpScreen(), chosen)

    def action_help(self) -> None:
        view = self.current_view()
        scope = view.SCOPE if view is not None else "global"
        title = view.TITLE_TEXT if view is not None else "Caracal"
        self.push_screen(HelpScreen(scope, title, readonly=self.readonly))

    def action_refresh(self) -> None:
        self.refresh_now()

    async def action_back(self) -> None:
        screen = self.screen
        if isinstance(screen, ViewScreen) and screen.handle_back():
            return
        if len(self.screen_stack) > 1:
            self.pop_screen()
            view = self.current_view()
            if view is not None:
                view.reload()
            return
        if self._history:
            previous = self._history.pop()
            self.switch_mode(previous)

    def open_ledger_for(self, agent: str) -> None:
        self.action_view("ledger")
        self.call_after_refresh(self._set_ledger_agent, agent)

    def _set_ledger_agent(self, agent: str) -> None:
        view = self.current_view()
        if isinstance(view, LedgerScreen):
            view.set_agent(agent)

    # ------------------------------------------------------------------ actions

    def action_changes(self, action: str) -> bool:
        spec = actions.BY_ACTION.get(action)
        return spec is None or spec.changes

    def start_action(self, action: str, view: ViewScreen) -> None:
        """Form, then plan and typed confirmation (for a change), then run: every change goes this way."""
        spec = actions.BY_ACTION.get(action)
        if spec is None:
            self.notify(f"unknown action {action}", severity="error")
            return
        if spec.changes and self.readonly:
            self.notify(f"read-only: {spec.title} is not allowed", severity="warning")
            return
        try:
            capability = self.source.capability(action)
        except Exception as exc:
            self.notify(describe(exc), severity="error")
            return
        if not capability.available:
            self.notify(f"{spec.title} is not available: {capability.reason}", severity="warning", timeout=8)
            return
        target: tuple[str, str] | None = None
        if spec.target:
            target = view.action_target(action)
            if target is None:
                self.notify(f"select a {spec.target} first", severity="warning")
                return

        def with_values(values: dict[str, str] | None) -> None:
            if values is None:
                return
            request = ActionRequest(
                action,
                target[0] if target else "",
                target[1] if target else "",
                tuple(values.items()),
            )
            if spec.changes:
                self.run_worker(
                    self._plan_and_confirm(request, view), group="action-plan", exit_on_error=False
                )
            else:
                runner = getattr(view, "run_read_action", None)
                if runner is not None:
                    runner(request)

        if spec.fields:
            defaults_for = getattr(view, "form_defaults", None)
            defaults = defaults_for(action) if defaults_for is not None else {}
            self.push_screen(FormScreen(spec, target[1] if target else "", defaults), with_values)
        else:
            with_values({})

    async def _plan_and_confirm(self, request: ActionRequest, view: ViewScreen) -> None:
        try:
            plan = await asyncio.to_thread(self.source.plan, request)
        except Exception as exc:
            self.notify(
                f"cannot {actions.spec(request.action).title}: {describe(exc)}", severity="error", timeout=8
            )
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.push_screen(RunScreen(plan), lambda _ok: view.action_finished(request.action))
            else:
                self.notify("cancelled: nothing was changed")

        self.push_screen(ConfirmScreen(plan), confirmed)

    def action_completed(self, plan: ActionPlan, *, ok: bool, error: str | None) -> None:
        """A run ended (its screen shows the outcome): refresh the alerts, a switch may have changed."""
        self.loader.load("alerts", self.source.overview)
        if not ok and error:
            self._log_text(f"action {plan.request.action} failed: {error}")

    # ------------------------------------------------------------------ palette

    def palette_entries(self, screen: Screen[Any]) -> list[Entry]:
        entries = [
            Entry(
                f"view: {view.id}",
                f"{view.title} (key {view.key})",
                self._safe(partial(self.action_view, view.id)),
            )
            for view in keymap.VIEWS
        ]
        entries += [
            Entry("app: refresh", "Load the current view again (r)", self._safe(self.action_refresh)),
            Entry("app: help", "Every key of this view (?)", self._safe(self.action_help)),
            Entry("app: jump", "Go to a view by name (:)", self._safe(self.action_jump)),
            Entry("app: quit", "Leave the dashboard (q)", self._safe(self.exit)),
        ]
        view = screen if isinstance(screen, ViewScreen) else self.current_view()
        for spec in actions.CATALOGUE:
            if spec.changes and self.readonly:
                continue
            try:
                capability = self.source.capability(spec.action)
            except Exception as exc:
                self._log_exception(exc)
                continue
            if spec.target and (view is None or view.action_target(spec.action) is None):
                continue
            help_text = spec.description if capability.available else f"not available: {capability.reason}"
            if view is not None:
                entries.append(
                    Entry(
                        spec.palette_name,
                        help_text,
                        self._safe(partial(self.start_action, spec.action, view)),
                    )
                )
        if view is not None:
            entries += view.palette_entries()
        return entries

    def _safe(self, call: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                call()
            except Exception as exc:
                if self.strict:
                    raise
                self._report_internal(exc)

        return run

    # ------------------------------------------------------------------ errors

    async def run_action(
        self,
        action: str | ActionParseResult,
        default_namespace: DOMNode | None = None,
        namespaces: Mapping[str, DOMNode] | None = None,
    ) -> bool:
        try:
            return await super().run_action(action, default_namespace, namespaces)
        except Exception as exc:
            if self.strict:
                raise
            self._report_internal(exc)
            return True

    def _report_internal(self, exc: BaseException) -> None:
        self._log_exception(exc)
        self.notify(
            f"internal error: {describe(exc)} (details in {self.error_log})", severity="error", timeout=10
        )

    def _log_text(self, text: str) -> None:
        try:
            with self.error_log.open("a") as log:
                log.write(text.rstrip() + "\n")
        except OSError:
            pass

    def _log_exception(self, exc: BaseException) -> None:
        self._log_text("".join(traceback.format_exception(exc)))

    def _handle_exception(self, error: Exception) -> None:
        """The last resort: log the traceback to a file and leave with one line, never a traceback."""
        if self.strict:
            super()._handle_exception(error)
            return
        self._log_exception(error)
        self._return_code = 1
        if self._exception is None:
            self._exception = error
            self._exception_event.set()
        self._exit_renderables.append(
            Text(f"caracal-tui stopped on an internal error: {describe(error)} (details in {self.error_log})")
        )
        self._close_messages_no_wait()


VIEW_NAMES = ", ".join(v.id for v in keymap.VIEWS)


def main(
    config: Path | None = typer.Option(
        None,
        "--config",
        envvar="CARACAL_CONFIG",
        dir_okay=False,
        help="YAML configuration file (as for caracal).",
    ),
    database_url: str | None = typer.Option(
        None, "--database-url", help="PostgreSQL URL (also CARACAL_DATABASE_URL); default: the embedded one."
    ),
    data_dir: Path | None = typer.Option(
        None,
        "--data-dir",
        file_okay=False,
        help="Data folder of the embedded PostgreSQL (also CARACAL_DATA_DIR).",
    ),
    actor: str | None = typer.Option(
        None,
        "--actor",
        envvar="CARACAL_ACTOR",
        help="Who is acting, for the audit log (default: the OS user).",
    ),
    readonly: bool = typer.Option(False, "--readonly", help="Hide every action that changes something."),
    demo: bool = typer.Option(False, "--demo", help="Made-up data; nothing real is read or changed."),
    refresh: float = typer.Option(2.0, "--refresh", min=0.2, max=3600, help="Seconds between refreshes."),
    view: str = typer.Option("overview", "--view", help=f"The view to open: {VIEW_NAMES}."),
) -> None:
    """The live operations dashboard: health, budgets, ledger, dead letters, integrity and operations."""
    found = keymap.find_view(view)
    if found is None:
        typer.echo(f"Error: no view {view!r}: use one of {VIEW_NAMES}", err=True)
        raise typer.Exit(2)
    source: DataSource
    if demo:
        from caracal_tui.fake import FakeSource

        source = FakeSource(agents=60, clock=None, live=True)
    else:
        from caracal_ops.cli.context import CliState
        from caracal_tui.live import LiveSource

        source = LiveSource(
            CliState(config_path=config, database_url=database_url, data_dir=data_dir, actor=actor),
            readonly=readonly,
        )
    app = CaracalApp(source, readonly=readonly, refresh_seconds=refresh, initial_view=found.id)
    app.run()
    if app.return_code:
        sys.exit(app.return_code)


def run() -> None:
    typer.run(main)
