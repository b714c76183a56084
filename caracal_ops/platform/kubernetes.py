"""Kubernetes: the ``caracal-<component>`` deployments (label ``app=caracal-<component>``), through kubectl.

``stop`` remembers the replica count in the annotation ``caracal.ops/replicas-before-stop`` before
scaling to 0, and ``start`` scales back to it (1 when there is none), so ``caracal services down`` then
``up`` gives back the same deployment, and a procedure that stopped the consumers restores what ran.
Stopping waits until the pods are gone (a terminating consumer may still write); starting and restarting
wait for the rollout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from caracal_ops.platform.base import (
    COMPONENTS,
    ComponentState,
    ComponentStatus,
    PlatformError,
    check_replicas,
    component_name,
)
from caracal_ops.platform.commands import CommandError, CommandResult, CommandRunner, run_command
from caracald.core.errors import NotFoundError

ANNOTATION = "caracal.ops/replicas-before-stop"


def deployment_name(component: str) -> str:
    return f"caracal-{component_name(component)}"


class KubernetesPlatform:
    kind = "kubernetes"

    def __init__(
        self,
        *,
        namespace: str = "caracal",
        context: str | None = None,
        runner: CommandRunner = run_command,
        timeout: float = 60,
        wait_timeout: float = 300,
        poll_interval: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.namespace = namespace
        self.context = context
        self._run = runner
        self._timeout = timeout
        self._wait_timeout = wait_timeout
        self._poll = poll_interval
        self._sleep = sleep
        self._clock = clock

    def components(self) -> tuple[str, ...]:
        return COMPONENTS

    def _kubectl(self, *args: str, timeout: float | None = None) -> CommandResult:
        argv = ["kubectl"]
        if self.context:
            argv.append(f"--context={self.context}")
        argv.append(f"--namespace={self.namespace}")
        argv.extend(args)
        return self._run(argv, timeout=timeout or self._timeout)

    def _deployment(self, component: str) -> dict[str, Any] | None:
        try:
            result = self._kubectl("get", f"deployment/{deployment_name(component)}", "--output=json")
        except CommandError as exc:
            if exc.result is not None and "NotFound" in exc.result.stderr:
                return None
            raise
        found: dict[str, Any] = json.loads(result.stdout)
        return found

    def _require(self, component: str) -> dict[str, Any]:
        found = self._deployment(component)
        if found is None:
            raise NotFoundError(
                f"deployment/{deployment_name(component)} not found in namespace {self.namespace}"
            )
        return found

    def _rollout_status(self, name: str) -> None:
        wait = int(self._wait_timeout)
        self._kubectl(
            "rollout", "status", f"deployment/{name}", f"--timeout={wait}s", timeout=wait + self._timeout
        )

    def _wait_pods_gone(self, name: str) -> None:
        deadline = self._clock() + self._wait_timeout
        while True:
            pods = self._kubectl("get", "pods", "-l", f"app={name}", "--output=name").stdout.split()
            if not pods:
                return
            if self._clock() >= deadline:
                raise PlatformError(
                    f"{len(pods)} pod(s) of deployment/{name} still there after {self._wait_timeout:g} s: "
                    + ", ".join(pods)
                )
            self._sleep(self._poll)

    def scale(self, component: str, replicas: int) -> str:
        check_replicas(replicas)
        name = deployment_name(component)
        self._kubectl("scale", f"deployment/{name}", f"--replicas={replicas}")
        if replicas == 0:
            self._wait_pods_gone(name)
        else:
            self._rollout_status(name)
        return f"deployment/{name} scaled to {replicas}"

    def stop(self, component: str) -> str:
        name = deployment_name(component)
        current = int(self._require(component).get("spec", {}).get("replicas", 1) or 0)
        if current > 0:
            self._kubectl("annotate", f"deployment/{name}", f"{ANNOTATION}={current}", "--overwrite")
            self._kubectl("scale", f"deployment/{name}", "--replicas=0")
        self._wait_pods_gone(name)
        return f"deployment/{name} stopped" + (f" (had {current} replicas)" if current else " (was stopped)")

    def start(self, component: str) -> str:
        name = deployment_name(component)
        found = self._require(component)
        current = int(found.get("spec", {}).get("replicas", 0) or 0)
        if current > 0:
            return f"deployment/{name} already runs {current} replicas"
        remembered = (found.get("metadata", {}).get("annotations") or {}).get(ANNOTATION, "")
        replicas = int(remembered) if str(remembered).isdigit() and int(remembered) > 0 else 1
        self._kubectl("scale", f"deployment/{name}", f"--replicas={replicas}")
        self._rollout_status(name)
        if remembered:
            self._kubectl("annotate", f"deployment/{name}", f"{ANNOTATION}-")
        return f"deployment/{name} started with {replicas} replica{'s' if replicas != 1 else ''}"

    def restart(self, component: str) -> str:
        name = deployment_name(component)
        self._kubectl("rollout", "restart", f"deployment/{name}")
        self._rollout_status(name)
        return f"deployment/{name} restarted"

    def status(self, component: str) -> ComponentStatus:
        short = component_name(component)
        name = deployment_name(short)
        found = self._deployment(short)
        if found is None:
            return ComponentStatus(
                short, ComponentState.NOT_INSTALLED, detail=f"no deployment/{name} in {self.namespace}"
            )
        desired = int(found.get("spec", {}).get("replicas", 0) or 0)
        ready = int(found.get("status", {}).get("readyReplicas", 0) or 0)
        pods = json.loads(
            self._kubectl("get", "pods", "-l", f"app={name}", "--output=json").stdout or "{}"
        ).get("items", [])
        waiting = [
            (cs.get("state", {}).get("waiting") or {}).get("reason", "")
            for pod in pods
            for cs in pod.get("status", {}).get("containerStatuses", []) or []
        ]
        if desired == 0:
            state = ComponentState.STOPPING if pods else ComponentState.STOPPED
        elif ready >= desired:
            state = ComponentState.RUNNING
        elif ready == 0 and any(
            r in ("CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull") for r in waiting
        ):
            state = ComponentState.FAILED
        else:
            state = ComponentState.STARTING
        described = [
            f"{pod.get('metadata', {}).get('name', '?')} ({pod.get('status', {}).get('phase', '?')})"
            for pod in pods
        ]
        detail = f"{ready}/{desired} ready" + (f"; pods: {', '.join(described)}" if described else "")
        return ComponentStatus(short, state, replicas=desired, ready=ready, detail=detail)

    def logs(self, component: str, lines: int = 100) -> str:
        return self._kubectl("logs", f"deployment/{deployment_name(component)}", f"--tail={lines}").stdout
