"""Control of Caracal's daemons where they run: this machine, systemd units, or Kubernetes deployments.

``platform_for(config)`` picks the implementation from ``platform.kind``; every one offers the
:class:`~caracal_ops.platform.base.Platform` protocol (scale, restart, stop, start, status, logs).
"""

from __future__ import annotations

from collections.abc import Mapping

from caracal_ops.platform.base import (
    COMPONENTS,
    CONSUMERS,
    ComponentState,
    ComponentStatus,
    Platform,
    PlatformError,
    component_name,
)
from caracal_ops.platform.commands import CommandError, CommandResult, CommandRunner, run_command
from caracald.runtime.config import CaracalConfig

__all__ = [
    "COMPONENTS",
    "CONSUMERS",
    "CommandError",
    "CommandResult",
    "CommandRunner",
    "ComponentState",
    "ComponentStatus",
    "Platform",
    "PlatformError",
    "component_name",
    "platform_for",
    "run_command",
]


def platform_for(
    config: CaracalConfig, *, env: Mapping[str, str] | None = None, runner: CommandRunner | None = None
) -> Platform:
    """The platform ``config.platform.kind`` names. ``env`` is added to the local daemons' environment
    (the CLI passes its ``--config``/``--database-url``/``--data-dir`` on, so the daemons see the same
    settings); ``runner`` replaces the command runner of systemd and Kubernetes (tests)."""
    settings = config.platform
    if settings.kind == "systemd":
        from caracal_ops.platform.systemd import SystemdPlatform

        return SystemdPlatform(runner=runner or run_command, timeout=settings.command_timeout_seconds)
    if settings.kind == "kubernetes":
        from caracal_ops.platform.kubernetes import KubernetesPlatform

        return KubernetesPlatform(
            namespace=settings.namespace,
            context=settings.kubectl_context,
            runner=runner or run_command,
            timeout=settings.command_timeout_seconds,
            wait_timeout=settings.wait_timeout_seconds,
        )
    from caracal_ops.platform.local import LocalPlatform

    data_dir = config.embedded.data_dir.expanduser()
    return LocalPlatform(
        run_dir=data_dir / "run",
        log_dir=data_dir / "logs",
        commands=settings.commands,
        env=env,
        stop_timeout=settings.stop_timeout_seconds,
    )
