"""The procedure framework: plans, progress events, audit records, and what a failure says."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from caracal_ops.procedures.framework import (
    EventKind,
    MemoryAuditSink,
    Plan,
    ProcedureError,
    ProgressEvent,
    StepContext,
    StepFailed,
    execute,
)
from caracald.core.errors import StoreUnavailableError


def _restore_like(fail_at: str | None = None) -> Plan:
    plan = Plan("backup.restore", "Restore backup b-1", params={"backup_id": "b-1"}, confirm_word="caracal")
    plan.note("everything since the backup is replaced")

    def stop(step: StepContext) -> str:
        step.leave("stopped", "ledger-writer still stopped: run `caracal services up` to start it again")
        return "stopped ledger-writer"

    def restore(step: StepContext) -> str:
        for done in range(1, 6):
            step.progress(done, 5, "tables")
            if fail_at == "restore" and done == 3:
                raise RuntimeError("pg_restore: disk full")
        return "restored 5 tables"

    def start(step: StepContext) -> str:
        step.resolve("stopped")
        step.result["restored"] = True
        return "started ledger-writer"

    plan.add("stop", "Stop the consumers", stop)
    plan.add("restore", "Restore the dump", restore, destructive=True, long_running=True)
    plan.add("start", "Start what was stopped", start)
    return plan


def test_a_plan_prints_its_steps_and_marks_the_destructive_ones() -> None:
    plan = _restore_like()
    assert plan.destructive
    assert plan.confirm_word == "caracal"
    assert plan.lines() == [
        "Plan: Restore backup b-1",
        "  1. Stop the consumers",
        "  2. Restore the dump  [destructive]",
        "  3. Start what was stopped",
        "Note: everything since the backup is replaced",
    ]
    assert Plan("backup.prune", "x").confirm_word == "prune"
    assert plan.as_dict()["steps"][1] == {
        "key": "restore",
        "description": "Restore the dump",
        "destructive": True,
    }


def test_execute_reports_progress_and_audits_start_and_finish() -> None:
    events: list[ProgressEvent] = []
    audit = MemoryAuditSink()
    report = execute(_restore_like(), actor="alice", audit=audit, progress=events.append)
    assert report.ok
    assert [s.summary for s in report.steps] == [
        "stopped ledger-writer",
        "restored 5 tables",
        "started ledger-writer",
    ]
    assert report.result == {"restored": True}
    kinds = [(e.kind, e.index) for e in events if e.kind is not EventKind.PROGRESS]
    assert kinds == [
        (EventKind.STEP_STARTED, 1),
        (EventKind.STEP_FINISHED, 1),
        (EventKind.STEP_STARTED, 2),
        (EventKind.STEP_FINISHED, 2),
        (EventKind.STEP_STARTED, 3),
        (EventKind.STEP_FINISHED, 3),
    ]
    assert [(e.done, e.of) for e in events if e.kind is EventKind.PROGRESS] == [(i, 5) for i in range(1, 6)]
    assert [r["action"] for r in audit.records] == ["backup.restore.started", "backup.restore.finished"]
    assert all(r["subject_id"] == report.run_id for r in audit.records)
    finished = audit.records[1]["details"]
    assert finished["params"] == {"backup_id": "b-1"}
    assert [s["status"] for s in finished["step_reports"]] == ["done", "done", "done"]
    assert finished["result"] == {"restored": True}


def test_a_failure_names_the_step_and_the_state_it_left() -> None:
    audit = MemoryAuditSink()
    with pytest.raises(ProcedureError) as caught:
        execute(_restore_like(fail_at="restore"), actor="alice", audit=audit)
    error = caught.value
    assert error.step_key == "restore"
    assert error.completed == ["stop"]
    assert error.message == (
        "backup.restore failed at step 2 of 3 (Restore the dump): RuntimeError: pg_restore: disk full. "
        "State: it got to 3 of 5 tables; "
        "ledger-writer still stopped: run `caracal services up` to start it again"
    )
    assert [r["action"] for r in audit.records] == ["backup.restore.started", "backup.restore.failed"]
    failed = audit.records[1]["details"]
    assert failed["failed_step"] == "restore"
    assert failed["error"] == "RuntimeError: pg_restore: disk full"
    assert [s["status"] for s in failed["step_reports"]] == ["done", "failed", "not run"]


def test_step_failed_and_failure_handlers_say_what_is_left() -> None:
    plan = Plan("backup.create", "Back up")
    plan.on_failure(lambda step: "the partial export was removed")

    def boom(step: StepContext) -> None:
        raise StepFailed("broker gone", state="topic a exported, topic b not")

    plan.add("export", "Export", boom)
    with pytest.raises(ProcedureError) as caught:
        execute(plan, actor="bob", audit=MemoryAuditSink())
    assert caught.value.message.endswith(
        "(Export): broker gone. State: topic a exported, topic b not; the partial export was removed"
    )

    quiet = Plan("x.check", "Check")
    quiet.add("check", "Check", lambda step: (_ for _ in ()).throw(ValueError("bad")))
    with pytest.raises(ProcedureError) as caught:
        execute(quiet, actor="bob", audit=MemoryAuditSink())
    assert caught.value.message.endswith("ValueError: bad. State: nothing was changed")


class _DownSink:
    def __init__(self) -> None:
        self.calls = 0

    def record(
        self, *, action: str, at: datetime, subject_id: str, reason: str | None, details: dict[str, Any]
    ) -> None:
        self.calls += 1
        raise StoreUnavailableError("PostgreSQL is unavailable: connection refused")


def test_a_destructive_plan_does_not_start_unaudited() -> None:
    ran: list[str] = []
    plan = Plan("backup.prune", "Prune")
    plan.add("delete", "Delete", lambda step: ran.append("delete") or None, destructive=True)
    with pytest.raises(
        ProcedureError, match="nothing was done \\(a destructive procedure runs only when it is audited\\)"
    ):
        execute(plan, actor="carol", audit=_DownSink())
    assert ran == []


def test_other_plans_go_on_with_a_warning_when_the_audit_log_is_down() -> None:
    events: list[ProgressEvent] = []
    plan = Plan("backup.create", "Back up Kafka")
    plan.add("export", "Export", lambda step: "42 records")
    report = execute(plan, actor="carol", audit=_DownSink(), progress=events.append)
    assert report.ok
    assert len(report.warnings) == 2  # start and finish records
    assert "audit record backup.create.started not written: PostgreSQL is unavailable" in report.warnings[0]
    assert [e.kind for e in events].count(EventKind.WARNING) == 2


def test_a_step_that_replaces_the_audit_log_gets_the_start_recorded_again() -> None:
    audit = MemoryAuditSink()
    plan = Plan("backup.restore", "Restore")

    def restore(step: StepContext) -> str:
        audit.records.clear()  # what a restore does to the audit log
        step.audit_log_replaced()
        return "restored"

    plan.add("restore", "Restore", restore, destructive=True)
    execute(plan, actor="dave", audit=audit)
    assert [r["action"] for r in audit.records] == ["backup.restore.started", "backup.restore.finished"]
    assert audit.records[0]["details"]["re_recorded"] is True


def test_duplicate_step_keys_are_a_bug() -> None:
    plan = Plan("x.y", "X")
    plan.add("a", "A", lambda step: None)
    with pytest.raises(ValueError, match="already in the plan"):
        plan.add("a", "A again", lambda step: None)
