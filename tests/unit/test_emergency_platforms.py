"""The exact command sequences of ``emergency stop-writes`` / ``resume-writes`` on systemd and Kubernetes:
the deny-all switch first, then the gateway and the ledger writer stopped (and started again in reverse)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from caracal_ops.platform.kubernetes import ANNOTATION, KubernetesPlatform
from caracal_ops.platform.systemd import SystemdPlatform
from caracal_ops.procedures import emergency
from caracal_ops.procedures.framework import MemoryAuditSink, execute
from caracald.runtime.config import load_config
from tests.unit.test_platforms import Recorder


class FakeDb:
    """Records the SQL and shares the call log with the platform's runner, to check the order."""

    url = "postgresql://fake/db"

    def __init__(self, log: list[Any], last_stopped: list[str] | None = None) -> None:
        self.log = log
        self.last_stopped = last_stopped

    @contextmanager
    def transaction(self) -> Iterator[FakeDb]:
        yield self

    read = transaction

    def execute(self, query: str, params: Any = None) -> FakeDb:
        if "gateway_switches" in query:
            self.log.append(["SQL", "deny_all", "on" if params[1] else "off"])
        self._query = query
        return self

    def fetchone(self) -> dict[str, Any] | None:
        if "audit_log" in self._query and self.last_stopped is not None:
            return {"details": {"result": {"stopped": self.last_stopped}}}
        return None


def _env(platform: Any, db: FakeDb) -> emergency.EmergencyEnv:
    return emergency.EmergencyEnv(
        config=load_config(environ={}),
        actor="ops@example.com",
        db=lambda: db,  # type: ignore[arg-type,return-value]
        platform=lambda: platform,
        audit=MemoryAuditSink,
        sleep=lambda seconds: None,
    )


def _mutations(calls: list[list[str]]) -> list[list[str]]:
    return [c for c in calls if not ({"show", "get"} & set(c))]


def test_systemd_stop_then_resume_writes() -> None:
    runner = Recorder([(["systemctl", "show"], "LoadState=loaded\nActiveState=active\nSubState=running\n")])
    db = FakeDb(runner.calls)
    env = _env(SystemdPlatform(runner=runner), db)
    audit = MemoryAuditSink()
    report = execute(emergency.plan_stop_writes(env, reason="drill"), actor="ops", audit=audit)
    assert report.result["stopped"] == ["gateway", "ledger-writer"]
    assert _mutations(runner.calls) == [
        ["SQL", "deny_all", "on"],
        ["systemctl", "--no-ask-password", "stop", "caracal-gateway.service"],
        ["systemctl", "--no-ask-password", "stop", "caracal-ledger-writer.service"],
    ]
    assert [r["action"] for r in audit.records] == [
        "emergency.stop-writes.started",
        "emergency.stop-writes.finished",
    ]

    runner.calls.clear()
    db.last_stopped = report.result["stopped"]
    execute(emergency.plan_resume_writes(env), actor="ops", audit=audit)
    assert _mutations(runner.calls) == [
        ["systemctl", "--no-ask-password", "start", "caracal-ledger-writer.service"],
        ["systemctl", "--no-ask-password", "start", "caracal-gateway.service"],
        ["SQL", "deny_all", "off"],
    ]


def test_kubernetes_stop_then_resume_writes_keeps_the_replica_counts() -> None:
    stopped: set[str] = set()

    def deployment(name: str) -> Any:
        def reply() -> str:
            replicas = 0 if name in stopped else 3
            annotations = {ANNOTATION: "3"} if name in stopped else {}
            return json.dumps(
                {
                    "metadata": {"annotations": annotations},
                    "spec": {"replicas": replicas},
                    "status": {"readyReplicas": replicas},
                }
            )

        return reply

    rules: list[Any] = []
    for name in ("caracal-gateway", "caracal-ledger-writer"):
        rules.append((["kubectl", "--namespace=caracal", "get", f"deployment/{name}"], deployment(name)))
        pods = ["kubectl", "--namespace=caracal", "get", "pods", "-l", f"app={name}"]
        rules.append(([*pods, "--output=name"], ""))
        rules.append(([*pods, "--output=json"], json.dumps({"items": []})))
    runner = Recorder(rules)
    db = FakeDb(runner.calls)
    platform = KubernetesPlatform(runner=runner, sleep=lambda s: None, wait_timeout=5)
    env = _env(platform, db)
    report = execute(emergency.plan_stop_writes(env, reason="drill"), actor="ops", audit=MemoryAuditSink())
    assert _mutations(runner.calls) == [
        ["SQL", "deny_all", "on"],
        [
            "kubectl",
            "--namespace=caracal",
            "annotate",
            "deployment/caracal-gateway",
            f"{ANNOTATION}=3",
            "--overwrite",
        ],
        ["kubectl", "--namespace=caracal", "scale", "deployment/caracal-gateway", "--replicas=0"],
        [
            "kubectl",
            "--namespace=caracal",
            "annotate",
            "deployment/caracal-ledger-writer",
            f"{ANNOTATION}=3",
            "--overwrite",
        ],
        ["kubectl", "--namespace=caracal", "scale", "deployment/caracal-ledger-writer", "--replicas=0"],
    ]
    stopped.update({"caracal-gateway", "caracal-ledger-writer"})
    runner.calls.clear()
    db.last_stopped = report.result["stopped"]
    execute(emergency.plan_resume_writes(env), actor="ops", audit=MemoryAuditSink())
    assert [c for c in _mutations(runner.calls) if "rollout" not in c] == [
        ["kubectl", "--namespace=caracal", "scale", "deployment/caracal-ledger-writer", "--replicas=3"],
        ["kubectl", "--namespace=caracal", "annotate", "deployment/caracal-ledger-writer", f"{ANNOTATION}-"],
        ["kubectl", "--namespace=caracal", "scale", "deployment/caracal-gateway", "--replicas=3"],
        ["kubectl", "--namespace=caracal", "annotate", "deployment/caracal-gateway", f"{ANNOTATION}-"],
        ["SQL", "deny_all", "off"],
    ]


def test_the_dry_run_plan_puts_the_switch_first() -> None:
    runner = Recorder()
    env = _env(SystemdPlatform(runner=runner), FakeDb(runner.calls))
    lines = emergency.plan_stop_writes(env, reason="x").lines()
    assert "deny-all switch on in PostgreSQL" in lines[1]
    assert "Stop gateway" in lines[3] and "Stop ledger-writer" in lines[4]
    assert runner.calls == []  # building the plan ran nothing
