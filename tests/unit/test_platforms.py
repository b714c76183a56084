"""The exact systemctl/journalctl and kubectl command sequences of the platforms.

A recording runner stands in for ``sh``: these are the platforms' pure logic (which commands, in which
order, with which arguments); the local platform is tested for real in tests/integration.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from caracal_ops.platform import ComponentState, platform_for
from caracal_ops.platform.commands import CommandError, CommandResult
from caracal_ops.platform.kubernetes import ANNOTATION, KubernetesPlatform
from caracal_ops.platform.local import LocalPlatform
from caracal_ops.platform.systemd import SystemdPlatform
from caracald.core.errors import NotFoundError, ValidationError
from caracald.runtime.config import load_config

Reply = str | CommandResult | CommandError


class Recorder:
    """Records every argv; answers from a list of (argv prefix, reply) rules, first match wins."""

    def __init__(self, rules: Sequence[tuple[Sequence[str], Reply | Callable[[], Reply]]] = ()) -> None:
        self.calls: list[list[str]] = []
        self.timeouts: list[float] = []
        self.rules = list(rules)

    def __call__(
        self, argv: Sequence[str], *, timeout: float, ok_codes: Sequence[int] = (0,)
    ) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        self.timeouts.append(timeout)
        for prefix, reply in self.rules:
            if argv[: len(prefix)] == list(prefix):
                answer = reply() if callable(reply) else reply
                if isinstance(answer, CommandError):
                    raise answer
                if isinstance(answer, CommandResult):
                    return answer
                return CommandResult(tuple(argv), 0, answer, "")
        return CommandResult(tuple(argv), 0, "", "")


# -- systemd ------------------------------------------------------------------------------------------


def test_systemd_start_stop_restart_and_scale() -> None:
    runner = Recorder()
    systemd = SystemdPlatform(runner=runner, timeout=45)
    assert systemd.start("gateway") == "caracal-gateway.service started"
    systemd.stop("caracal-ledger-writer")
    systemd.restart("metrics-aggregator.service")
    systemd.scale("audit-logger", 0)
    note = systemd.scale("audit-logger", 3)
    assert runner.calls == [
        ["systemctl", "--no-ask-password", "start", "caracal-gateway.service"],
        ["systemctl", "--no-ask-password", "stop", "caracal-ledger-writer.service"],
        ["systemctl", "--no-ask-password", "restart", "caracal-metrics-aggregator.service"],
        ["systemctl", "--no-ask-password", "stop", "caracal-audit-logger.service"],
        ["systemctl", "--no-ask-password", "start", "caracal-audit-logger.service"],
    ]
    assert "one instance per host" in note
    assert set(runner.timeouts) == {45}


def test_systemd_status_and_logs() -> None:
    runner = Recorder(
        [
            (
                ["systemctl", "show", "caracal-gateway.service"],
                "LoadState=loaded\nActiveState=active\nSubState=running\nMainPID=4242\n",
            ),
            (
                ["systemctl", "show", "caracal-audit-logger.service"],
                "LoadState=not-found\nActiveState=inactive\nSubState=dead\nMainPID=0\n",
            ),
            (
                ["systemctl", "show", "caracal-ledger-writer.service"],
                "LoadState=loaded\nActiveState=failed\nSubState=failed\nMainPID=0\n",
            ),
            (["journalctl"], "2024-01-15T10:30:00+0000 host caracald[1]: serving\n"),
        ]
    )
    systemd = SystemdPlatform(runner=runner)
    gateway = systemd.status("gateway")
    assert gateway.state is ComponentState.RUNNING
    assert (gateway.replicas, gateway.ready) == (1, 1)
    assert "pid 4242" in gateway.detail
    assert systemd.status("audit-logger").state is ComponentState.NOT_INSTALLED
    assert systemd.status("ledger-writer").state is ComponentState.FAILED
    assert "serving" in systemd.logs("gateway", lines=50)
    assert runner.calls == [
        [
            "systemctl",
            "show",
            "caracal-gateway.service",
            "--property=LoadState,ActiveState,SubState,MainPID",
            "--no-pager",
        ],
        [
            "systemctl",
            "show",
            "caracal-audit-logger.service",
            "--property=LoadState,ActiveState,SubState,MainPID",
            "--no-pager",
        ],
        [
            "systemctl",
            "show",
            "caracal-ledger-writer.service",
            "--property=LoadState,ActiveState,SubState,MainPID",
            "--no-pager",
        ],
        [
            "journalctl",
            "--unit=caracal-gateway.service",
            "--lines=50",
            "--no-pager",
            "--output=short-iso",
        ],
    ]


def test_unknown_components_and_negative_replicas_are_refused_before_any_command() -> None:
    runner = Recorder()
    systemd = SystemdPlatform(runner=runner)
    with pytest.raises(ValidationError, match="unknown component 'postgresql'"):
        systemd.start("postgresql")
    with pytest.raises(ValidationError, match="0 or more"):
        systemd.scale("gateway", -1)
    kube = KubernetesPlatform(runner=runner)
    with pytest.raises(ValidationError, match="0 or more"):
        kube.scale("gateway", -2)
    assert runner.calls == []


# -- kubernetes ---------------------------------------------------------------------------------------

KUBECTL = ["kubectl", "--context=prod-eu", "--namespace=caracal-prod"]


def _deployment(replicas: int, annotations: dict[str, str] | None = None, ready: int = 0) -> str:
    return json.dumps(
        {
            "metadata": {"name": "x", "annotations": annotations or {}},
            "spec": {"replicas": replicas},
            "status": {"readyReplicas": ready},
        }
    )


def _kube(runner: Recorder, **kwargs: float) -> KubernetesPlatform:
    return KubernetesPlatform(
        namespace="caracal-prod",
        context="prod-eu",
        runner=runner,
        timeout=30,
        wait_timeout=kwargs.get("wait_timeout", 120),
        poll_interval=0,
        sleep=lambda _s: None,
    )


def test_kubernetes_scale_waits_for_the_rollout_or_for_the_pods_to_go() -> None:
    pods = iter(
        [
            "pod/caracal-ledger-writer-abc\npod/caracal-ledger-writer-def\n",
            "pod/caracal-ledger-writer-abc\n",
            "",
        ]
    )
    runner = Recorder([([*KUBECTL, "get", "pods"], lambda: next(pods))])
    kube = _kube(runner)
    assert kube.scale("ledger-writer", 5) == "deployment/caracal-ledger-writer scaled to 5"
    kube.scale("ledger-writer", 0)
    assert runner.calls == [
        [*KUBECTL, "scale", "deployment/caracal-ledger-writer", "--replicas=5"],
        [*KUBECTL, "rollout", "status", "deployment/caracal-ledger-writer", "--timeout=120s"],
        [*KUBECTL, "scale", "deployment/caracal-ledger-writer", "--replicas=0"],
        [*KUBECTL, "get", "pods", "-l", "app=caracal-ledger-writer", "--output=name"],
        [*KUBECTL, "get", "pods", "-l", "app=caracal-ledger-writer", "--output=name"],
        [*KUBECTL, "get", "pods", "-l", "app=caracal-ledger-writer", "--output=name"],
    ]
    # the rollout wait gets its own timeout plus the command timeout
    assert runner.timeouts[1] == 150


def test_kubernetes_stop_remembers_the_replicas_and_start_restores_them() -> None:
    deployment = iter([_deployment(3), _deployment(0, {ANNOTATION: "3"})])
    runner = Recorder(
        [
            ([*KUBECTL, "get", "deployment/caracal-ledger-writer"], lambda: next(deployment)),
            ([*KUBECTL, "get", "pods"], ""),
        ]
    )
    kube = _kube(runner)
    assert kube.stop("ledger-writer") == "deployment/caracal-ledger-writer stopped (had 3 replicas)"
    assert kube.start("ledger-writer") == "deployment/caracal-ledger-writer started with 3 replicas"
    assert runner.calls == [
        [*KUBECTL, "get", "deployment/caracal-ledger-writer", "--output=json"],
        [*KUBECTL, "annotate", "deployment/caracal-ledger-writer", f"{ANNOTATION}=3", "--overwrite"],
        [*KUBECTL, "scale", "deployment/caracal-ledger-writer", "--replicas=0"],
        [*KUBECTL, "get", "pods", "-l", "app=caracal-ledger-writer", "--output=name"],
        [*KUBECTL, "get", "deployment/caracal-ledger-writer", "--output=json"],
        [*KUBECTL, "scale", "deployment/caracal-ledger-writer", "--replicas=3"],
        [*KUBECTL, "rollout", "status", "deployment/caracal-ledger-writer", "--timeout=120s"],
        [*KUBECTL, "annotate", "deployment/caracal-ledger-writer", f"{ANNOTATION}-"],
    ]


def test_kubernetes_start_without_memory_runs_one_and_leaves_a_running_deployment_alone() -> None:
    answers = iter([_deployment(0), _deployment(2, ready=2)])
    runner = Recorder([([*KUBECTL, "get", "deployment/caracal-gateway"], lambda: next(answers))])
    kube = _kube(runner)
    assert kube.start("gateway") == "deployment/caracal-gateway started with 1 replica"
    assert kube.start("gateway") == "deployment/caracal-gateway already runs 2 replicas"
    assert runner.calls == [
        [*KUBECTL, "get", "deployment/caracal-gateway", "--output=json"],
        [*KUBECTL, "scale", "deployment/caracal-gateway", "--replicas=1"],
        [*KUBECTL, "rollout", "status", "deployment/caracal-gateway", "--timeout=120s"],
        [*KUBECTL, "get", "deployment/caracal-gateway", "--output=json"],
    ]


def test_kubernetes_stop_of_a_stopped_deployment_only_waits() -> None:
    runner = Recorder(
        [
            ([*KUBECTL, "get", "deployment/caracal-audit-logger"], _deployment(0)),
            ([*KUBECTL, "get", "pods"], ""),
        ]
    )
    assert _kube(runner).stop("audit-logger") == "deployment/caracal-audit-logger stopped (was stopped)"
    assert runner.calls == [
        [*KUBECTL, "get", "deployment/caracal-audit-logger", "--output=json"],
        [*KUBECTL, "get", "pods", "-l", "app=caracal-audit-logger", "--output=name"],
    ]


def test_kubernetes_restart_logs_and_status() -> None:
    pods = {
        "items": [
            {"metadata": {"name": "caracal-gateway-1"}, "status": {"phase": "Running"}},
            {
                "metadata": {"name": "caracal-gateway-2"},
                "status": {
                    "phase": "Pending",
                    "containerStatuses": [{"state": {"waiting": {"reason": "ContainerCreating"}}}],
                },
            },
        ]
    }
    runner = Recorder(
        [
            ([*KUBECTL, "get", "deployment/caracal-gateway"], _deployment(2, ready=1)),
            ([*KUBECTL, "get", "pods"], json.dumps(pods)),
            ([*KUBECTL, "logs"], "line 1\nline 2\n"),
        ]
    )
    kube = _kube(runner)
    assert kube.restart("gateway") == "deployment/caracal-gateway restarted"
    assert kube.logs("gateway", lines=200) == "line 1\nline 2\n"
    status = kube.status("gateway")
    assert status.state is ComponentState.STARTING
    assert (status.replicas, status.ready) == (2, 1)
    assert "caracal-gateway-2 (Pending)" in status.detail
    assert runner.calls == [
        [*KUBECTL, "rollout", "restart", "deployment/caracal-gateway"],
        [*KUBECTL, "rollout", "status", "deployment/caracal-gateway", "--timeout=120s"],
        [*KUBECTL, "logs", "deployment/caracal-gateway", "--tail=200"],
        [*KUBECTL, "get", "deployment/caracal-gateway", "--output=json"],
        [*KUBECTL, "get", "pods", "-l", "app=caracal-gateway", "--output=json"],
    ]


def test_kubernetes_missing_deployment() -> None:
    missing = CommandError(
        "kubectl failed",
        CommandResult((), 1, "", 'Error from server (NotFound): deployments.apps "caracal-dlq" not found\n'),
    )
    runner = Recorder([([*KUBECTL, "get", "deployment/caracal-audit-logger"], missing)])
    kube = _kube(runner)
    assert kube.status("audit-logger").state is ComponentState.NOT_INSTALLED
    with pytest.raises(
        NotFoundError, match="deployment/caracal-audit-logger not found in namespace caracal-prod"
    ):
        kube.stop("audit-logger")
    # another failure is not mistaken for a missing deployment
    runner.rules = [
        (
            [*KUBECTL, "get"],
            CommandError(
                "`kubectl` failed (exit 1): Unauthorized", CommandResult((), 1, "", "error: Unauthorized\n")
            ),
        )
    ]
    with pytest.raises(CommandError, match="Unauthorized"):
        kube.status("gateway")


def test_kubernetes_gives_up_when_pods_stay() -> None:
    clock = iter(range(0, 1000, 50))
    runner = Recorder([([*KUBECTL, "get", "pods"], "pod/caracal-gateway-1\n")])
    kube = KubernetesPlatform(
        namespace="caracal-prod",
        context="prod-eu",
        runner=runner,
        wait_timeout=120,
        poll_interval=0,
        sleep=lambda _s: None,
        clock=lambda: float(next(clock)),
    )
    with pytest.raises(Exception, match="1 pod\\(s\\) of deployment/caracal-gateway still there after 120 s"):
        kube.scale("gateway", 0)


def test_kubernetes_without_context_names_only_the_namespace() -> None:
    runner = Recorder()
    KubernetesPlatform(runner=runner).restart("metrics-aggregator")
    assert runner.calls[0] == [
        "kubectl",
        "--namespace=caracal",
        "rollout",
        "restart",
        "deployment/caracal-metrics-aggregator",
    ]


# -- the factory --------------------------------------------------------------------------------------


def test_platform_for_reads_the_platform_section(tmp_path: Path) -> None:
    config_file = tmp_path / "caracal.yaml"
    config_file.write_text(
        "platform:\n  kind: kubernetes\n  namespace: caracal-prod\n  kubectl_context: prod-eu\n"
        "  command_timeout_seconds: 30\n  wait_timeout_seconds: 120\n"
    )
    runner = Recorder()
    kube = platform_for(load_config(config_file, environ={}), runner=runner)
    assert isinstance(kube, KubernetesPlatform)
    kube.restart("gateway")
    assert runner.calls[0][:3] == KUBECTL
    assert runner.calls[1][-1] == "--timeout=120s"

    config_file.write_text("platform:\n  kind: systemd\n")
    assert isinstance(platform_for(load_config(config_file, environ={}), runner=runner), SystemdPlatform)

    config_file.write_text(f"embedded:\n  data_dir: {tmp_path / 'data'}\n")
    local = platform_for(load_config(config_file, environ={}))
    assert isinstance(local, LocalPlatform)
    assert local.run_dir == tmp_path / "data" / "run"
    assert local.log_path("gateway") == tmp_path / "data" / "logs" / "gateway.log"


def test_backup_directory_defaults(tmp_path: Path) -> None:
    embedded = load_config(None, environ={"CARACAL_DATA_DIR": str(tmp_path)})
    assert (
        embedded.backup.resolved_dir(embedded=True, data_dir=embedded.embedded.data_dir)
        == tmp_path / "backups"
    )
    external = load_config(None, environ={"CARACAL_DATABASE_URL": "postgresql://db/caracal"})
    assert external.backup.resolved_dir(embedded=False, data_dir=tmp_path) == Path("/var/backups/caracal")
    assert external.backup.keep_days == 30
    assert external.platform.kind == "local"
    assert external.platform.namespace == "caracal"
    custom = load_config(
        None, environ={"CARACAL__BACKUP__DIR": str(tmp_path / "b"), "CARACAL__PLATFORM__KIND": "systemd"}
    )
    assert custom.backup.resolved_dir(embedded=True, data_dir=tmp_path) == tmp_path / "b"
    assert custom.platform.kind == "systemd"
