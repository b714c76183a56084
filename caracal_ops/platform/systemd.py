"""systemd: the ``caracal-<component>.service`` units, through ``systemctl`` and ``journalctl``.

One instance of each unit runs per host, so scaling to 0 stops the unit and scaling to any other count
starts it (add hosts to run more). Mutating calls pass ``--no-ask-password``: without the right to manage
the units, they fail at once instead of waiting for a password prompt nobody answers.
"""

from __future__ import annotations

from caracal_ops.platform.base import (
    COMPONENTS,
    ComponentState,
    ComponentStatus,
    check_replicas,
    component_name,
)
from caracal_ops.platform.commands import CommandResult, CommandRunner, run_command

_STATES = {
    "active": ComponentState.RUNNING,
    "reloading": ComponentState.RUNNING,
    "activating": ComponentState.STARTING,
    "deactivating": ComponentState.STOPPING,
    "inactive": ComponentState.STOPPED,
    "failed": ComponentState.FAILED,
}


def unit_name(component: str) -> str:
    return f"caracal-{component_name(component)}.service"


class SystemdPlatform:
    kind = "systemd"

    def __init__(self, *, runner: CommandRunner = run_command, timeout: float = 60) -> None:
        self._run = runner
        self._timeout = timeout

    def components(self) -> tuple[str, ...]:
        return COMPONENTS

    def _systemctl(self, verb: str, component: str) -> CommandResult:
        return self._run(
            ["systemctl", "--no-ask-password", verb, unit_name(component)], timeout=self._timeout
        )

    def start(self, component: str) -> str:
        self._systemctl("start", component)
        return f"{unit_name(component)} started"

    def stop(self, component: str) -> str:
        self._systemctl("stop", component)
        return f"{unit_name(component)} stopped"

    def restart(self, component: str) -> str:
        self._systemctl("restart", component)
        return f"{unit_name(component)} restarted"

    def scale(self, component: str, replicas: int) -> str:
        check_replicas(replicas)
        if replicas == 0:
            return self.stop(component)
        summary = self.start(component)
        if replicas > 1:
            summary += " (systemd runs one instance per host: add hosts to run more)"
        return summary

    def status(self, component: str) -> ComponentStatus:
        name = component_name(component)
        result = self._run(
            [
                "systemctl",
                "show",
                unit_name(name),
                "--property=LoadState,ActiveState,SubState,MainPID",
                "--no-pager",
            ],
            timeout=self._timeout,
        )
        props = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        if props.get("LoadState") == "not-found":
            return ComponentStatus(name, ComponentState.NOT_INSTALLED, detail=f"no unit {unit_name(name)}")
        active = props.get("ActiveState", "")
        state = _STATES.get(active, ComponentState.UNKNOWN)
        detail = f"{active} ({props.get('SubState', '?')})"
        pid = props.get("MainPID", "0")
        if pid not in ("", "0"):
            detail += f", pid {pid}"
        running = 1 if state in (ComponentState.RUNNING, ComponentState.STARTING) else 0
        return ComponentStatus(
            name, state, replicas=running, ready=1 if state is ComponentState.RUNNING else 0, detail=detail
        )

    def logs(self, component: str, lines: int = 100) -> str:
        result = self._run(
            [
                "journalctl",
                f"--unit={unit_name(component)}",
                f"--lines={lines}",
                "--no-pager",
                "--output=short-iso",
            ],
            timeout=self._timeout,
        )
        return result.stdout
