"""Procedures: a plan of named steps, printed as a dry run or executed with progress and an audit trail.

A procedure is one function with typed inputs that inspects what it needs (read-only) and returns a
:class:`Plan`: its steps in order, each with a description, whether it is destructive, and the action that
does it. The same plan is what ``--dry-run`` prints and what :func:`execute` runs, so the operator reads
exactly what will happen::

    def restart_consumers(platform: Platform) -> Plan:
        plan = Plan("services.restart", "Restart the consumers")
        for component in CONSUMERS:
            def restart(step: StepContext, component: str = component) -> str:
                platform.restart(component)
                return f"{component} restarted"
            plan.add(f"restart-{component}", f"Restart {component}", restart)
        return plan

    report = execute(plan, actor="alice", audit=DatabaseAuditSink(url, "alice"), progress=print)

While it runs, :func:`execute`

* reports progress through one callback (:class:`ProgressEvent`): a step started, moved (``done`` of
  ``total``), finished or failed; the CLI draws a progress bar for long steps from it;
* writes audit records (``<procedure>.started``, ``.finished`` or ``.failed`` with the failing step), as
  ``ops_procedure`` events in the hash-chained audit log. A destructive plan does not start unless its
  start is recorded; other plans (a backup during an outage) go on with a warning;
* stops at the first failing step and raises :class:`ProcedureError`, which names the step and the state
  it left: the failing step's own ``on_failure`` text, what the step said (:class:`StepFailed`), and every
  condition an earlier step left outstanding (:meth:`StepContext.leave`) that no later step resolved, such
  as "consumers still stopped: run `caracal services up` to restart them".

Steps share values through ``StepContext.data``; what the procedure produced for the caller (a backup id)
goes into ``StepContext.result``, which is also recorded in the audit log.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Protocol

from caracald.core.errors import CaracalError


def utcnow() -> datetime:
    return datetime.now(UTC)


class StepFailed(Exception):
    """Raised by a step that knows what state its failure leaves (``state``), e.g.
    ``StepFailed("pg_restore: ...", state="the database is unchanged (the restore was rolled back)")``."""

    def __init__(self, cause: str, *, state: str | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.state = state


class ProcedureError(CaracalError):
    """A procedure stopped at a step: which one, why, and the state it left behind."""

    reason = "procedure_failed"

    def __init__(
        self,
        *,
        procedure: str,
        run_id: str,
        step_key: str,
        step_description: str,
        index: int,
        total: int,
        cause: str,
        state: list[str],
        completed: list[str],
    ) -> None:
        where = f"step {index} of {total} ({step_description})" if index else step_description
        message = f"{procedure} failed at {where}: {cause.rstrip('.')}"
        if state:
            message += ". State: " + "; ".join(state)
        super().__init__(message)
        self.procedure = procedure
        self.run_id = run_id
        self.step_key = step_key
        self.index = index
        self.cause = cause
        self.state = state
        self.completed = completed


StepAction = Callable[["StepContext"], "str | None"]


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a plan. ``action`` returns a one-line summary of what it did (or None)."""

    key: str
    description: str
    action: StepAction = field(repr=False, compare=False)
    destructive: bool = False
    #: The CLI shows a progress bar for it.
    long_running: bool = False
    #: The state a failure of this step leaves, when it is known in advance.
    on_failure: str | None = None


class Plan:
    """What a procedure will do, step by step. Printed by a dry run, run by :func:`execute`."""

    def __init__(
        self,
        procedure: str,
        title: str,
        *,
        params: Mapping[str, Any] | None = None,
        confirm_word: str | None = None,
    ) -> None:
        self.procedure = procedure
        self.title = title
        self.params: dict[str, Any] = dict(params or {})
        self.steps: list[Step] = []
        #: Things the operator should know before running it (shown with the plan, recorded in the audit).
        self.notes: list[str] = []
        #: What the operator must type to run a destructive plan (default: the procedure's verb).
        self.confirm_word = confirm_word or procedure.rsplit(".", 1)[-1]
        #: Called (last added first) when a step fails; each may return a sentence for the failure state.
        self.failure_handlers: list[Callable[[StepContext], str | None]] = []

    def add(
        self,
        key: str,
        description: str,
        action: StepAction,
        *,
        destructive: bool = False,
        long_running: bool = False,
        on_failure: str | None = None,
    ) -> Step:
        if any(s.key == key for s in self.steps):
            raise ValueError(f"step {key!r} is already in the plan")
        step = Step(key, description, action, destructive, long_running, on_failure)
        self.steps.append(step)
        return step

    def note(self, text: str) -> None:
        self.notes.append(text)

    def on_failure(self, handler: Callable[[StepContext], str | None]) -> None:
        """Clean up after a failed run (remove a partial file, record a verdict). ``handler`` gets the
        failing step's context; what it returns is added to the failure state."""
        self.failure_handlers.append(handler)

    @property
    def destructive(self) -> bool:
        return any(step.destructive for step in self.steps)

    def lines(self) -> list[str]:
        """The plan as text: the title, numbered steps (destructive ones marked), then the notes."""
        out = [f"Plan: {self.title}"]
        width = len(str(len(self.steps)))
        for index, step in enumerate(self.steps, 1):
            mark = "  [destructive]" if step.destructive else ""
            out.append(f"  {index:>{width}}. {step.description}{mark}")
        if not self.steps:
            out.append("  (nothing to do)")
        out.extend(f"Note: {note}" for note in self.notes)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "procedure": self.procedure,
            "title": self.title,
            "params": plain(self.params),
            "destructive": self.destructive,
            "steps": [
                {"key": s.key, "description": s.description, "destructive": s.destructive} for s in self.steps
            ],
            "notes": list(self.notes),
        }


class EventKind(StrEnum):
    STEP_STARTED = "step-started"
    PROGRESS = "progress"
    STEP_FINISHED = "step-finished"
    STEP_FAILED = "step-failed"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    kind: EventKind
    index: int  # 1-based number of the step (0 for a warning outside any step)
    total: int  # steps in the plan
    step: Step | None = None
    done: int | None = None
    of: int | None = None
    detail: str = ""
    seconds: float | None = None


ProgressCallback = Callable[[ProgressEvent], None]


class AuditSink(Protocol):
    """Where a procedure's audit records go (:class:`caracal_ops.procedures.audit.DatabaseAuditSink`)."""

    def record(
        self, *, action: str, at: datetime, subject_id: str, reason: str | None, details: dict[str, Any]
    ) -> None: ...


@dataclass
class MemoryAuditSink:
    """Keeps the records in a list (tests, and plans that must not touch a database)."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def record(
        self, *, action: str, at: datetime, subject_id: str, reason: str | None, details: dict[str, Any]
    ) -> None:
        self.records.append(
            {"action": action, "at": at, "subject_id": subject_id, "reason": reason, "details": details}
        )


class StepContext:
    """What a running step can use: shared data, progress, outstanding conditions, warnings."""

    def __init__(self, run: _Run, step: Step, index: int) -> None:
        self._run = run
        self.step = step
        self.index = index
        self.last_progress: tuple[int, int | None, str] | None = None

    @property
    def run_id(self) -> str:
        return self._run.run_id

    @property
    def actor(self) -> str:
        return self._run.actor

    @property
    def procedure(self) -> str:
        return self._run.plan.procedure

    @property
    def data(self) -> dict[str, Any]:
        """Values shared between the steps of one run."""
        return self._run.data

    @property
    def result(self) -> dict[str, Any]:
        """What the run produced for its caller; recorded in the ``.finished`` audit record."""
        return self._run.result

    def progress(self, done: int, total: int | None = None, detail: str = "") -> None:
        self.last_progress = (done, total, detail)
        self._run.emit(
            ProgressEvent(
                EventKind.PROGRESS,
                self.index,
                len(self._run.plan.steps),
                self.step,
                done=done,
                of=total,
                detail=detail,
            )
        )

    def leave(self, key: str, message: str) -> None:
        """Record a condition that holds until a later step resolves it (shown if the run fails)."""
        self._run.outstanding[key] = message

    def resolve(self, key: str) -> None:
        self._run.outstanding.pop(key, None)

    def warn(self, message: str) -> None:
        self._run.warn(message, index=self.index, step=self.step)

    def audit_log_replaced(self) -> None:
        """This step replaced the audit log (a restore): the run's start is recorded again after it."""
        self._run.audit_replaced = True


@dataclass
class StepReport:
    key: str
    description: str
    destructive: bool
    status: str  # "done", "failed" or "not run"
    summary: str | None = None
    seconds: float | None = None


@dataclass
class RunReport:
    run_id: str
    procedure: str
    title: str
    actor: str
    started_at: datetime
    finished_at: datetime | None
    steps: list[StepReport]
    result: dict[str, Any]
    warnings: list[str]

    @property
    def ok(self) -> bool:
        return all(s.status == "done" for s in self.steps)


@dataclass
class _Run:
    plan: Plan
    actor: str
    audit: AuditSink
    progress: ProgressCallback | None
    run_id: str
    started_at: datetime
    data: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    outstanding: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    audit_replaced: bool = False

    def emit(self, event: ProgressEvent) -> None:
        if self.progress is not None:
            self.progress(event)

    def warn(self, message: str, *, index: int = 0, step: Step | None = None) -> None:
        self.warnings.append(message)
        self.emit(ProgressEvent(EventKind.WARNING, index, len(self.plan.steps), step, detail=message))

    def record(self, action: str, *, details: dict[str, Any], reason: str | None = None) -> None:
        self.audit.record(
            action=f"{self.plan.procedure}.{action}",
            at=utcnow(),
            subject_id=self.run_id,
            reason=reason,
            details=plain(details),
        )

    def start_details(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "title": self.plan.title,
            "started_at": self.started_at,
            "params": self.plan.params,
            "steps": [{"key": s.key, "destructive": s.destructive} for s in self.plan.steps],
            "notes": self.plan.notes,
        }


def _cause(exc: BaseException) -> str:
    if isinstance(exc, StepFailed):
        return exc.cause
    if isinstance(exc, CaracalError):
        return exc.message
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def execute(
    plan: Plan,
    *,
    actor: str,
    audit: AuditSink,
    progress: ProgressCallback | None = None,
    audit_required: bool | None = None,
) -> RunReport:
    """Run the plan's steps in order. Raises :class:`ProcedureError` at the first failing step.

    ``audit_required`` (default: whether the plan is destructive) makes an unwritable start record fatal
    before any step runs; otherwise audit failures become warnings.
    """
    required = plan.destructive if audit_required is None else audit_required
    run = _Run(plan, actor, audit, progress, run_id=str(uuid.uuid4()), started_at=utcnow())
    total = len(plan.steps)
    reports = [StepReport(s.key, s.description, s.destructive, "not run") for s in plan.steps]

    def audit_or_warn(action: str, details: dict[str, Any], reason: str | None = None) -> bool:
        try:
            run.record(action, details=details, reason=reason)
        except Exception as exc:
            run.warn(f"audit record {plan.procedure}.{action} not written: {_cause(exc)}")
            return False
        return True

    try:
        run.record("started", details=run.start_details(), reason=plan.title)
    except Exception as exc:
        if required:
            raise ProcedureError(
                procedure=plan.procedure,
                run_id=run.run_id,
                step_key="audit",
                step_description="recording its start in the audit log",
                index=0,
                total=total,
                cause=_cause(exc),
                state=["nothing was done (a destructive procedure runs only when it is audited)"],
                completed=[],
            ) from exc
        run.warn(f"audit record {plan.procedure}.started not written: {_cause(exc)}")

    for index, step in enumerate(plan.steps, 1):
        run.emit(ProgressEvent(EventKind.STEP_STARTED, index, total, step))
        context = StepContext(run, step, index)
        began = time.monotonic()
        try:
            summary = step.action(context)
        except (Exception, KeyboardInterrupt) as exc:
            seconds = time.monotonic() - began
            reports[index - 1].status = "failed"
            reports[index - 1].seconds = seconds
            cause = _cause(exc)
            state = _failure_state(run, step, context, exc, reports)
            run.emit(ProgressEvent(EventKind.STEP_FAILED, index, total, step, detail=cause, seconds=seconds))
            if run.audit_replaced:
                audit_or_warn("started", {**run.start_details(), "re_recorded": True})
            audit_or_warn(
                "failed",
                {
                    **run.start_details(),
                    "failed_step": step.key,
                    "error": cause,
                    "state": state,
                    "step_reports": [_report_details(r) for r in reports],
                    "result": run.result,
                },
                reason=f"{plan.title}: failed at {step.key}",
            )
            raise ProcedureError(
                procedure=plan.procedure,
                run_id=run.run_id,
                step_key=step.key,
                step_description=step.description,
                index=index,
                total=total,
                cause=cause,
                state=state,
                completed=[r.key for r in reports if r.status == "done"],
            ) from exc
        seconds = time.monotonic() - began
        reports[index - 1].status = "done"
        reports[index - 1].summary = summary
        reports[index - 1].seconds = seconds
        if run.audit_replaced:
            # the step replaced the audit log: the start recorded before it is gone, record it again
            audit_or_warn(
                "started",
                {**run.start_details(), "re_recorded": True, "replaced_by_step": step.key},
                reason=plan.title,
            )
            run.audit_replaced = False
        run.emit(
            ProgressEvent(EventKind.STEP_FINISHED, index, total, step, detail=summary or "", seconds=seconds)
        )

    finished = utcnow()
    audit_or_warn(
        "finished",
        {
            **run.start_details(),
            "finished_at": finished,
            "step_reports": [_report_details(r) for r in reports],
            "result": run.result,
            "warnings": run.warnings,
        },
        reason=plan.title,
    )
    return RunReport(
        run_id=run.run_id,
        procedure=plan.procedure,
        title=plan.title,
        actor=actor,
        started_at=run.started_at,
        finished_at=finished,
        steps=reports,
        result=run.result,
        warnings=run.warnings,
    )


def _failure_state(
    run: _Run, step: Step, context: StepContext, exc: BaseException, reports: list[StepReport]
) -> list[str]:
    state: list[str] = []
    if isinstance(exc, StepFailed) and exc.state:
        state.append(exc.state)
    elif step.on_failure:
        state.append(step.on_failure)
    elif context.last_progress is not None:
        done, of, detail = context.last_progress
        state.append(
            f"it got to {done}" + (f" of {of}" if of is not None else "") + (f" {detail}" if detail else "")
        )
    state.extend(run.outstanding.values())
    for handler in reversed(run.plan.failure_handlers):
        try:
            said = handler(context)
        except Exception as handler_exc:
            state.append(f"clean-up failed: {_cause(handler_exc)}")
        else:
            if said:
                state.append(said)
    if not state:
        changed = [r.key for r in reports if r.status == "done" and r.destructive]
        if changed:
            state.append("completed before it: " + ", ".join(changed))
        elif step.destructive:
            state.append(f"{step.key} may have been partly applied")
        else:
            state.append("nothing was changed")
    return state


def _report_details(report: StepReport) -> dict[str, Any]:
    return {
        "key": report.key,
        "status": report.status,
        "summary": report.summary,
        "seconds": round(report.seconds, 3) if report.seconds is not None else None,
    }


def plain(value: Any) -> Any:
    """JSON-ready copy of ``value`` (datetimes, paths, decimals, enums and UUIDs as strings)."""
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, Path | Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    return value
