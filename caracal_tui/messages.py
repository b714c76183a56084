"""Small messages the workers post to the screens: a snapshot arrived, a load failed, an action moved on.

Each carries immutable data only; a worker never touches a widget (it runs in a thread)."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from caracal_tui.sources import ActionPlan, ActionResult, Overview, Progress


@dataclass
class Loaded(Message):
    """A worker finished loading ``key`` (``data`` is the snapshot) in ``seconds``."""

    key: str
    data: object
    seconds: float
    cpu_seconds: float = 0.0  # of the worker thread: what the call cost, however busy the machine


@dataclass
class LoadFailed(Message):
    """A worker could not load ``key``: ``error`` is one line for the operator."""

    key: str
    error: str


@dataclass
class OverviewUpdated(Message):
    """A new overview: every screen shows its alerts (degraded mode, deny-all) at once."""

    overview: Overview


@dataclass
class ActionProgress(Message):
    token: str
    progress: Progress


@dataclass
class ActionDone(Message):
    token: str
    plan: ActionPlan
    result: ActionResult | None
    error: str | None


@dataclass
class Rendered(Message):
    """A view drew a snapshot (for timings: the benchmark and tests wait on it)."""

    view: str
    key: str
