"""Where the dashboard's data comes from: the :class:`DataSource` protocol and the snapshots it returns.

Every read returns an immutable snapshot (frozen dataclasses, tuples), built in a worker thread and handed to
the screens whole, so a screen never sees half an update and never blocks on I/O. A part a deployment does not
have (a capability not installed yet, Kafka lag in the embedded deployment) is a :class:`NotAvailable` with
the reason, shown as such: a source never invents data.

Two implementations: :class:`caracal_tui.live.LiveSource` (the ops toolkit, same configuration as the CLI)
and :class:`caracal_tui.fake.FakeSource` (tests, benchmarks and ``--demo``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Protocol

from caracald.core.errors import CaracalError
from caracald.core.money import Money


class ActionUnavailableError(CaracalError):
    """The action cannot be done here: the capability is missing, or the source is read-only."""

    reason = "not_available"


@dataclass(frozen=True, slots=True)
class NotAvailable:
    """A part of a snapshot this deployment cannot provide, and why."""

    reason: str


class Health(StrEnum):
    OK = "ok"
    WARN = "warn"
    DOWN = "down"
    OFF = "off"  # stopped on purpose, or not part of this deployment
    UNKNOWN = "unknown"


# --------------------------------------------------------------------------- overview


@dataclass(frozen=True, slots=True)
class Component:
    name: str
    health: Health
    state: str  # a few words: "running 2/2", "ok 3 ms", "stopped"
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Traffic:
    """The gateway's answers per second over the last refresh interval (None until two samples exist)."""

    requests_per_s: float | None
    denials_per_s: float | None
    holds_in_flight: int | None
    status: str  # the gateway's own: ok, degraded, unavailable

    @property
    def deny_ratio(self) -> float | None:
        if not self.requests_per_s or self.denials_per_s is None:
            return None
        return self.denials_per_s / self.requests_per_s


@dataclass(frozen=True, slots=True)
class Lag:
    group: str
    topic: str
    lag: int
    capped: bool = False


@dataclass(frozen=True, slots=True)
class DlqSummary:
    pending: int
    oldest: datetime | None


@dataclass(frozen=True, slots=True)
class BatchRow:
    batch_id: uuid.UUID
    first_seq: int
    last_seq: int
    event_count: int
    key_id: str
    created_at: datetime
    min_occurred_at: datetime
    max_occurred_at: datetime
    root_hex: str
    verification: str | None  # "passed", "failed" or None: never verified
    verified_at: datetime | None = None
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class MerkleSummary:
    latest: BatchRow | None
    batches: int
    pending_events: int
    oldest_pending: datetime | None


class AlertLevel(StrEnum):
    CRITICAL = "critical"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Alert:
    """Something an operator must see on every screen: degraded mode, deny-all, an unreachable store."""

    level: AlertLevel
    text: str


@dataclass(frozen=True, slots=True)
class Overview:
    taken_at: datetime
    deployment: str  # embedded, distributed or demo
    target: str  # what the source reads: "embedded PostgreSQL in ...", "PostgreSQL at ..."
    components: tuple[Component, ...]
    traffic: Traffic | NotAvailable
    lag: tuple[Lag, ...] | NotAvailable
    dlq: DlqSummary | NotAvailable
    merkle: MerkleSummary | NotAvailable
    alerts: tuple[Alert, ...] = ()


# --------------------------------------------------------------------------- agents and budgets


@dataclass(frozen=True, slots=True)
class Budget:
    """One policy's spend against its limit in the current window."""

    policy_id: uuid.UUID
    owner_id: uuid.UUID  # the agent whose policy it is
    owner_name: str
    window: str  # "daily", "rolling hourly"
    window_detail: str  # "calendar daily (Europe/Paris)"
    window_start: datetime
    window_end: datetime
    limit: Money
    settled: Money
    held: Money
    holds: int

    @property
    def used(self) -> Money:
        return self.settled + self.held

    @property
    def remaining(self) -> Money:
        return Money(self.limit.amount - self.settled.amount - self.held.amount, self.limit.currency)

    @property
    def fraction(self) -> float:
        """Settled plus held over the limit (may exceed 1). Computed on the amounts: a dashboard asks for it
        for every policy on every refresh."""
        limit = self.limit.amount
        if limit <= 0:
            return 1.0
        return float((self.settled.amount + self.held.amount) / limit)


@dataclass(frozen=True, slots=True)
class AgentRow:
    agent_id: uuid.UUID
    name: str
    owner: str
    status: str  # active or suspended
    parent_id: uuid.UUID | None
    budgets: tuple[Budget, ...]  # the agent's own active policies

    @property
    def active(self) -> bool:
        return self.status == "active"

    @property
    def holds(self) -> int:
        return sum(b.holds for b in self.budgets)


@dataclass(frozen=True, slots=True)
class AgentsSnapshot:
    taken_at: datetime
    agents: tuple[AgentRow, ...]
    budget_source: str  # ledger, redis or demo

    @property
    def holds(self) -> int:
        return sum(a.holds for a in self.agents)


@dataclass(frozen=True, slots=True)
class PolicyVersionRow:
    policy_id: uuid.UUID
    version: int
    limit: Money
    window: str
    status: str
    change_reason: str
    changed_by: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class LedgerRow:
    event_id: int
    occurred_at: datetime
    event_type: str
    agent_id: uuid.UUID
    agent_name: str
    resource: str
    model: str | None
    input_tokens: int | None
    output_tokens: int | None
    cost: Money
    sealed: bool


@dataclass(frozen=True, slots=True)
class AgentDetail:
    taken_at: datetime
    agent: AgentRow
    parent_name: str | None
    scopes: tuple[Budget, ...]  # every policy a request must fit: its own and its ancestors'
    history: tuple[PolicyVersionRow, ...]  # oldest first
    recent: tuple[LedgerRow, ...]  # newest first


# --------------------------------------------------------------------------- ledger


@dataclass(frozen=True, slots=True)
class LedgerQuery:
    agent: str  # an agent's name or id; empty: every agent
    start: datetime
    end: datetime
    limit: int = 500


@dataclass(frozen=True, slots=True)
class LedgerPage:
    query: LedgerQuery
    agent_name: str | None  # the agent queried, resolved
    rows: tuple[LedgerRow, ...]
    truncated: bool  # more events matched than the limit

    @property
    def charged(self) -> tuple[Money, ...]:
        """What the listed settlements, expiries and adjustments charged, per currency."""
        totals: dict[str, Decimal] = {}
        for row in self.rows:
            if row.event_type in ("settlement", "expiry", "adjustment"):
                totals[row.cost.currency] = totals.get(row.cost.currency, Decimal(0)) + row.cost.amount
        return tuple(Money(amount, currency) for currency, amount in sorted(totals.items()))


# --------------------------------------------------------------------------- dead letters


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    dlq_id: int
    group: str
    topic: str
    partition: int
    offset: int
    error_type: str
    error_message: str
    retry_count: int
    failed_at: datetime
    event_id: uuid.UUID | None
    key: bytes | None
    payload: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class DlqSnapshot:
    taken_at: datetime
    letters: tuple[DeadLetterRow, ...] | NotAvailable


# --------------------------------------------------------------------------- integrity


@dataclass(frozen=True, slots=True)
class IntegritySnapshot:
    taken_at: datetime
    batches: tuple[BatchRow, ...] | NotAvailable  # newest first
    total_batches: int
    pending_events: int
    signing_key: str  # the active key, or why there is none


@dataclass(frozen=True, slots=True)
class VerificationResult:
    label: str  # what was verified: "batch 1f3c…", "2025-03-01 00:00 to 2025-03-14 12:00"
    ok: bool
    batches_checked: int
    events_checked: int
    signatures_valid: bool
    merkle_root_hex: str | None
    unsealed_events: int
    problems: int
    first_bad_batch: uuid.UUID | None
    first_bad_event: str | None
    problem: str | None
    seconds: float


# --------------------------------------------------------------------------- operations and actions


@dataclass(frozen=True, slots=True)
class Capability:
    """Whether an action can be done with this source, and if not, why."""

    action: str
    available: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class OperationsSnapshot:
    taken_at: datetime
    capabilities: tuple[Capability, ...]
    facts: tuple[tuple[str, str], ...] = ()  # label, value: deployment, key folder, last backup ...


@dataclass(frozen=True, slots=True)
class ActionRequest:
    """What the operator asked for: an action of the catalogue, its target, and the values they typed."""

    action: str
    target: str = ""  # an agent id, a policy id, a dead letter id ...
    label: str = ""  # the target as the operator knows it (a name)
    params: tuple[tuple[str, str], ...] = ()

    def param(self, name: str, default: str = "") -> str:
        return next((value for key, value in self.params if key == name), default)


@dataclass(frozen=True, slots=True)
class PlanStep:
    description: str
    destructive: bool = False
    long_running: bool = False


@dataclass(frozen=True, slots=True)
class ActionPlan:
    """What an action will do, shown before it runs; it runs only when the operator types ``confirm_word``."""

    request: ActionRequest
    title: str
    steps: tuple[PlanStep, ...]
    confirm_word: str
    notes: tuple[str, ...] = ()
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # ties a run to the plan shown

    @property
    def destructive(self) -> bool:
        return any(step.destructive for step in self.steps)


class ProgressKind(StrEnum):
    STARTED = "started"
    PROGRESS = "progress"
    FINISHED = "finished"
    FAILED = "failed"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Progress:
    kind: ProgressKind
    step: int  # 1-based
    total: int
    description: str
    done: int | None = None
    of: int | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ActionResult:
    ok: bool
    summary: str
    details: tuple[str, ...] = ()


ProgressCallback = Callable[[Progress], None]


class DataSource(Protocol):
    """What the dashboard reads and does. Methods are called from worker threads and may block; each raises
    a :class:`~caracald.core.errors.CaracalError` (or any exception) that the dashboard shows as one line."""

    @property
    def kind(self) -> str:
        """embedded, distributed or demo."""
        ...

    def describe(self) -> str:
        """What this source reads, for the title bar (no I/O)."""
        ...

    def now(self) -> datetime: ...

    def overview(self) -> Overview: ...

    def agents(self) -> AgentsSnapshot: ...

    def agent_detail(self, agent_id: uuid.UUID) -> AgentDetail: ...

    def ledger(self, query: LedgerQuery) -> LedgerPage: ...

    def dead_letters(self) -> DlqSnapshot: ...

    def integrity(self) -> IntegritySnapshot: ...

    def verify_batch(self, batch_id: uuid.UUID) -> VerificationResult: ...

    def verify_range(self, start: datetime, end: datetime) -> VerificationResult: ...

    def operations(self) -> OperationsSnapshot: ...

    def capability(self, action: str) -> Capability:
        """Whether ``action`` can be done (no I/O: what is installed, not whether it would succeed)."""
        ...

    def plan(self, request: ActionRequest) -> ActionPlan:
        """What the action would do (reads only); raises when it cannot be done as asked."""
        ...

    def run(self, plan: ActionPlan, progress: ProgressCallback) -> ActionResult:
        """Do what the plan says. A failure raises, with what state it left in its message."""
        ...

    def close(self) -> None: ...
