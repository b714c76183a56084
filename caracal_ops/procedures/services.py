"""Starting, stopping, restarting and scaling Caracal's daemons through a platform, as audited plans."""

from __future__ import annotations

from collections.abc import Sequence

from caracal_ops.platform.base import COMPONENTS, Platform, component_name
from caracal_ops.procedures.framework import Plan, StepContext
from caracald.core.errors import ValidationError


def select(platform: Platform, components: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the components to act on, in start order; those skipped because this platform cannot run them).

    Naming a component the platform cannot run is an error; by default every component it can run is
    chosen and the others are reported as skipped.
    """
    available = platform.components()
    if components:
        chosen = [component_name(c) for c in components]
        missing = [c for c in chosen if c not in available]
        if missing:
            raise ValidationError(
                f"{', '.join(missing)} cannot run on the {platform.kind} platform"
                + (f" (it runs: {', '.join(available)})" if available else "")
            )
        return [c for c in COMPONENTS if c in chosen], []
    return [c for c in COMPONENTS if c in available], [c for c in COMPONENTS if c not in available]


def _skipped_note(plan: Plan, platform: Platform, skipped: list[str]) -> None:
    if skipped:
        why = "this caracald has no such command" if platform.kind == "local" else "not available"
        plan.note(f"skipped {', '.join(skipped)}: {why}")


def plan_up(platform: Platform, components: Sequence[str] = ()) -> Plan:
    chosen, skipped = select(platform, components)
    plan = Plan("services.up", f"Start {', '.join(chosen) or 'nothing'} on the {platform.kind} platform",
                params={"components": chosen, "platform": platform.kind})  # fmt: skip
    _skipped_note(plan, platform, skipped)
    for component in chosen:

        def start(step: StepContext, component: str = component) -> str:
            return platform.start(component)

        plan.add(f"start-{component}", f"Start {component}", start)
    return plan


def plan_down(platform: Platform, components: Sequence[str] = ()) -> Plan:
    """Stop the gateway first (no new events), then the consumers."""
    chosen, _ = select(platform, components)
    plan = Plan(
        "services.down",
        f"Stop {', '.join(chosen) or 'nothing'} on the {platform.kind} platform",
        params={"components": chosen, "platform": platform.kind},
    )
    for component in chosen:

        def stop(step: StepContext, component: str = component) -> str:
            return platform.stop(component)

        plan.add(f"stop-{component}", f"Stop {component}", stop)
    return plan


def plan_restart(platform: Platform, components: Sequence[str] = ()) -> Plan:
    chosen, skipped = select(platform, components)
    plan = Plan(
        "services.restart",
        f"Restart {', '.join(chosen) or 'nothing'} on the {platform.kind} platform",
        params={"components": chosen, "platform": platform.kind},
    )
    _skipped_note(plan, platform, skipped)
    for component in chosen:

        def restart(step: StepContext, component: str = component) -> str:
            return platform.restart(component)

        plan.add(f"restart-{component}", f"Restart {component}", restart)
    return plan


def plan_scale(platform: Platform, component: str, replicas: int) -> Plan:
    (chosen,), _ = select(platform, [component])
    if replicas < 0:
        raise ValidationError(f"replicas must be 0 or more, not {replicas}")
    plan = Plan(
        "services.scale",
        f"Scale {chosen} to {replicas} on the {platform.kind} platform",
        params={"component": chosen, "replicas": replicas, "platform": platform.kind},
    )

    def scale(step: StepContext) -> str:
        return platform.scale(chosen, replicas)

    plan.add(f"scale-{chosen}", f"Scale {chosen} to {replicas} replica{'s' if replicas != 1 else ''}", scale)
    return plan
