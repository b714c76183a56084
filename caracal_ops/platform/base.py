"""What every platform offers: scale, restart, stop, start, status and logs of Caracal's components."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from caracald.core.errors import CaracalError, ValidationError

#: Caracal's daemons, in the order they start (the gateway first; stop in reverse).
COMPONENTS: tuple[str, ...] = ("gateway", "ledger-writer", "metrics-aggregator", "audit-logger")
#: The daemons that consume the bus and write to PostgreSQL: stopped during a restore.
CONSUMERS: tuple[str, ...] = ("ledger-writer", "metrics-aggregator", "audit-logger")


class PlatformError(CaracalError):
    """A platform could not do what it was asked."""

    reason = "platform_error"


class ComponentState(StrEnum):
    RUNNING = "running"
    STARTING = "starting"  # desired replicas not all ready yet, or systemd "activating"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"  # exited on its own, or the unit failed
    NOT_INSTALLED = "not-installed"  # no unit, no deployment, no caracald command
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class ComponentStatus:
    component: str
    state: ComponentState
    #: Replicas asked for and replicas ready (None where the platform does not say).
    replicas: int | None = None
    ready: int | None = None
    detail: str = ""

    @property
    def running(self) -> bool:
        return self.state in (ComponentState.RUNNING, ComponentState.STARTING)


class Platform(Protocol):
    """Controls Caracal's daemons where they run. Mutating calls return a one-line summary."""

    kind: str

    def components(self) -> tuple[str, ...]:
        """The components this platform can run (the local one: those ``caracald`` has)."""
        ...

    def scale(self, component: str, replicas: int) -> str: ...

    def restart(self, component: str) -> str: ...

    def stop(self, component: str) -> str: ...

    def start(self, component: str) -> str: ...

    def status(self, component: str) -> ComponentStatus: ...

    def logs(self, component: str, lines: int = 100) -> str: ...


def component_name(name: str) -> str:
    """``gateway``, ``caracal-gateway`` or ``caracal-gateway.service`` -> ``gateway``."""
    short = name.strip().lower().removesuffix(".service").removeprefix("deployment/").removeprefix("caracal-")
    if short not in COMPONENTS:
        raise ValidationError(f"unknown component {name!r}: use one of {', '.join(COMPONENTS)}")
    return short


def check_replicas(replicas: int) -> None:
    if replicas < 0:
        raise ValidationError(f"replicas must be 0 or more, not {replicas}")
