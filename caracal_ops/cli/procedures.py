"""Running a procedure's plan from the CLI: dry run, typed confirmation, progress on stderr, audit.

Every command built on a :class:`~caracal_ops.procedures.framework.Plan` behaves the same way:

* a destructive plan only prints itself unless ``--execute`` is given (``--dry-run`` says so explicitly,
  and wins over ``--execute``);
* with ``--execute``, the operator types the plan's confirmation word unless ``--yes``;
* the steps are reported on stderr (``[2/5] Stop the consumers ... done: ...``), with a progress bar for
  long steps when stderr is a terminal, so stdout keeps only the command's result;
* the run is audited in the database's audit log as the acting user (``--actor``).
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from caracal_ops.cli.context import EXIT_FAILED, EXIT_UNAVAILABLE, CliState, fail, state
from caracal_ops.procedures.audit import DatabaseAuditSink
from caracal_ops.procedures.framework import (
    AuditSink,
    EventKind,
    Plan,
    ProcedureError,
    ProgressEvent,
    RunReport,
    execute,
)
from caracald.core.errors import StoreUnavailableError

EXECUTE_OPTION = typer.Option(
    False, "--execute", help="Do it. Without --execute a destructive procedure only prints its plan."
)
DRY_RUN_OPTION = typer.Option(
    False, "--dry-run", help="Only print the plan (the default for destructive procedures)."
)
YES_OPTION = typer.Option(False, "--yes", "-y", help="Do not ask for the typed confirmation.")


if TYPE_CHECKING:  # rich.progress loads when a bar is first shown
    from rich.progress import Progress, TaskID


class CliProgress:
    """Turns progress events into lines on stderr, and a rich progress bar for long steps on a terminal."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> CliProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop_bar()

    def _stop_bar(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False)

    def __call__(self, event: ProgressEvent) -> None:
        step = event.step
        if event.kind is EventKind.STEP_STARTED and step is not None:
            self._print(f"[{event.index}/{event.total}] {step.description}")
            if step.long_running and self.console.is_terminal:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                self._progress = Progress(
                    TextColumn("      {task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=self.console,
                    transient=True,
                )
                self._task = self._progress.add_task(step.key, total=None)
                self._progress.start()
        elif event.kind is EventKind.PROGRESS:
            if self._progress is not None and self._task is not None:
                self._progress.update(
                    self._task,
                    completed=event.done or 0,
                    total=event.of,
                    description=event.detail or (step.key if step else ""),
                )
        elif event.kind is EventKind.STEP_FINISHED:
            self._stop_bar()
            summary = f": {event.detail}" if event.detail else ""
            self._print(f"      done{summary} ({event.seconds or 0:.1f} s)")
        elif event.kind is EventKind.STEP_FAILED:
            self._stop_bar()
            self._print(f"      FAILED: {event.detail}")
        elif event.kind is EventKind.WARNING:
            self._print(f"Warning: {event.detail}")


def print_plan(plan: Plan, *, err: bool = False) -> None:
    for line in plan.lines():
        typer.echo(line, err=err)


def audit_sink(cli: CliState) -> DatabaseAuditSink:
    # the CLI's own database handle migrates the embedded store on first use; records use fresh connections
    return DatabaseAuditSink(lambda: cli.db.url, cli.who)


def confirm(plan: Plan) -> None:
    print_plan(plan, err=True)
    word = plan.confirm_word
    try:
        answer = typer.prompt(f"Type {word!r} to proceed", default="", show_default=False, err=True)
    except typer.Abort:
        raise fail("no confirmation given (pass --yes to run without one): nothing was changed") from None
    if answer.strip() != word:
        raise fail(f"confirmation {answer.strip()!r} does not match {word!r}: nothing was changed")


def run_plan(
    ctx: typer.Context,
    plan: Plan,
    *,
    execute_it: bool = True,
    dry_run: bool = False,
    yes: bool = False,
    audit_required: bool | None = None,
    audit: AuditSink | None = None,
) -> RunReport | None:
    """Dry-run, confirm and execute ``plan`` as the CLI does. Returns None when nothing ran."""
    cli = state(ctx)
    if dry_run or (plan.destructive and not execute_it):
        print_plan(plan)
        if plan.steps:
            typer.echo("Dry run: nothing was changed." + (" Add --execute to do it." if not dry_run else ""))
        return None
    if not plan.steps:
        print_plan(plan)
        typer.echo("Nothing to do.")
        return None
    if plan.destructive and not yes:
        confirm(plan)
    try:
        with CliProgress() as progress:
            report = execute(
                plan,
                actor=cli.who,
                audit=audit or audit_sink(cli),
                progress=progress,
                audit_required=audit_required,
            )
    except ProcedureError as exc:
        if isinstance(exc.__cause__, StoreUnavailableError):
            raise fail(exc.message, EXIT_UNAVAILABLE) from None
        raise
    if not report.ok:  # pragma: no cover - execute raises on failure
        raise typer.Exit(EXIT_FAILED)
    return report
