"""A data source with made-up, deterministic data: for the tests, the benchmarks and ``caracal-tui --demo``.

Given the same seed and clock it returns the same snapshots, so screenshots compare byte for byte. Its
actions change its own state (a suspended agent shows as suspended afterwards), and a test can make any
method fail (``fail``), or be slow (``delay``), to check what the dashboard does then.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from caracal_tui import actions as catalogue
from caracal_tui.format import parse_when
from caracal_tui.sources import (
    ActionPlan,
    ActionRequest,
    ActionResult,
    ActionUnavailableError,
    AgentDetail,
    AgentRow,
    AgentsSnapshot,
    Alert,
    AlertLevel,
    BatchRow,
    Budget,
    Capability,
    Component,
    DeadLetterRow,
    DlqSnapshot,
    DlqSummary,
    Health,
    IntegritySnapshot,
    Lag,
    LedgerPage,
    LedgerQuery,
    LedgerRow,
    MerkleSummary,
    OperationsSnapshot,
    Overview,
    PlanStep,
    PolicyVersionRow,
    Progress,
    ProgressCallback,
    ProgressKind,
    Traffic,
    VerificationResult,
)
from caracald.core.errors import CaracalError, ConflictError, NotFoundError, ValidationError
from caracald.core.money import Money

#: The instant a fake source's clock stands at unless told otherwise (screenshots must not move).
FROZEN_AT = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)

_NAMES = (
    "support-bot",
    "research-agent",
    "billing-assistant",
    "code-reviewer",
    "sales-outreach",
    "doc-summariser",
    "triage-bot",
    "data-cleaner",
    "translator",
    "scheduler",
    "qa-runner",
    "forecast-model",
)
_TEAMS = ("platform", "growth", "finance", "research", "support", "infra")
_MODELS = ("gpt-4o-mini", "gpt-4o", "claude-3-5-sonnet", "claude-3-5-haiku")
_RESOURCES = ("openai/v1/chat/completions", "anthropic/v1/messages", "u/search/v1/query")


class _Policy:
    __slots__ = ("agent_id", "history", "limit", "policy_id", "window", "zone")

    def __init__(
        self, policy_id: uuid.UUID, agent_id: uuid.UUID, window: str, zone: str, limit: Money
    ) -> None:
        self.policy_id = policy_id
        self.agent_id = agent_id
        self.window = window
        self.zone = zone
        self.limit = limit
        self.history: list[PolicyVersionRow] = []


class FakeSource:
    """Deterministic data for ``agents`` agents; ``live`` makes spend and traffic move with the real clock."""

    kind = "demo"

    def __init__(
        self,
        *,
        agents: int = 24,
        seed: int = 7,
        clock: datetime | None = FROZEN_AT,
        live: bool = False,
        degraded: bool = False,
        deny_all: bool = False,
        tampered: bool = False,
        unavailable: dict[str, str] | None = None,
        step_delay: float = 0.0,
    ) -> None:
        self._clock = clock
        self.live = live
        self.degraded = degraded
        self.deny_all = deny_all
        self.tampered = tampered
        self.step_delay = step_delay
        #: Method name -> error message: that method raises it (until removed).
        self.fail: dict[str, str] = {}
        #: Method name -> seconds it takes.
        self.delay: dict[str, float] = {}
        #: Method name -> how many times it was called.
        self.calls: dict[str, int] = {}
        self.unavailable = dict(unavailable or {})
        self.runs: list[ActionPlan] = []
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._rng = random.Random(seed)  # noqa: S311 - made-up data, not secrets
        self._seed = seed
        self._key_id = "6a1f03c2"
        self._build(agents)

    # ------------------------------------------------------------------ data

    def _build(self, count: int) -> None:
        rng = self._rng
        at = self.now()
        self._agents: list[AgentRow] = []
        self._policies: dict[uuid.UUID, _Policy] = {}
        self._spend: dict[uuid.UUID, tuple[Decimal, Decimal, int]] = {}
        for index in range(count):
            agent_id = uuid.UUID(int=rng.getrandbits(128), version=4)
            base = _NAMES[index % len(_NAMES)]
            name = base if index < len(_NAMES) else f"{base}-{index // len(_NAMES) + 1}"
            team = _TEAMS[index % len(_TEAMS)]
            parent = self._agents[index % 5].agent_id if index >= 10 and index % 7 == 3 else None
            status = "suspended" if index % 11 == 5 else "active"
            windows = [("daily", "UTC")] + ([("monthly", "Europe/Paris")] if index % 3 == 0 else [])
            for window, zone in windows:
                limit_value = Decimal(rng.choice((25, 50, 100, 250, 500, 1000)))
                if window == "monthly":
                    limit_value *= 20
                policy_id = uuid.UUID(int=rng.getrandbits(128), version=4)
                policy = _Policy(policy_id, agent_id, window, zone, Money(limit_value, "USD"))
                created = at - timedelta(days=30 + index % 20)
                policy.history.append(
                    PolicyVersionRow(
                        policy_id,
                        1,
                        policy.limit,
                        window,
                        "active",
                        "initial budget",
                        "ops@example.com",
                        created,
                    )
                )
                if index % 4 == 1:
                    raised = Money(limit_value * 2, "USD")
                    policy.history.append(
                        PolicyVersionRow(
                            policy_id,
                            2,
                            raised,
                            window,
                            "active",
                            "quarter-end load",
                            "alice@example.com",
                            created + timedelta(days=12),
                        )
                    )
                    policy.limit = raised
                self._policies[policy_id] = policy
                # how far along its budget: most comfortable, some close, a few over
                fraction = Decimal(rng.choice((5, 12, 20, 35, 41, 58, 66, 73, 88, 94, 99, 104))) / 100
                settled = (policy.limit.amount * fraction).quantize(Decimal("0.01"))
                holds = rng.choice((0, 0, 0, 1, 2, 3, 5))
                held = (Decimal(holds) * Decimal("0.35")).quantize(Decimal("0.01"))
                self._spend[policy_id] = (settled, held, holds)
            self._agents.append(AgentRow(agent_id, name, f"{team}@example.com", status, parent, budgets=()))
        self._letters = [self._letter(i) for i in range(6)]
        self._batches = self._make_batches(24)

    def _letter(self, index: int) -> DeadLetterRow:
        rng = random.Random(self._seed * 1000 + index)  # noqa: S311 - made-up data, not secrets
        agent = self._agents[index % len(self._agents)] if self._agents else None
        kinds = (
            ("UnknownAgent", "agent {agent} is not registered (foreign key agents_pkey)"),
            ("DecodeError", "payload is not a metering event: Expecting ',' delimiter: line 1 column 87"),
            ("CurrencyMismatch", "event charges EUR but the policy budgets in USD"),
        )
        error_type, message = kinds[index % len(kinds)]
        payload = {
            "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "kind": "settlement",
            "agent_id": str(agent.agent_id) if agent else None,
            "cost": f"{rng.randint(1, 900) / 100:.2f}",
            "currency": "EUR" if error_type == "CurrencyMismatch" else "USD",
            "model": _MODELS[index % len(_MODELS)],
        }
        body = json.dumps(payload, separators=(",", ":")).encode()
        if error_type == "DecodeError":
            body = body[:86]  # cut short: not JSON any more
        return DeadLetterRow(
            dlq_id=101 + index,
            group="ledger-writer-group",
            topic="caracal.metering.events",
            partition=index % 3,
            offset=48_210 + index * 17,
            error_type=error_type,
            error_message=message.format(agent=agent.agent_id if agent else "-"),
            retry_count=3,
            failed_at=self.now() - timedelta(hours=30 - index * 5),
            event_id=uuid.UUID(payload["event_id"]),
            key=str(payload["agent_id"]).encode(),
            payload=body,
            headers=(("caracal-schema", b"metering/v1"),),
        )

    def _make_batches(self, count: int) -> list[BatchRow]:
        rng = random.Random(self._seed + 99)  # noqa: S311 - made-up data, not secrets
        rows = []
        seq = 1
        start = self.now() - timedelta(hours=count)
        for index in range(count):
            size = 1000 if index < count - 1 else 412
            created = start + timedelta(hours=index + 1)
            failed = self.tampered and index == count - 6
            rows.append(
                BatchRow(
                    batch_id=uuid.UUID(int=rng.getrandbits(128), version=4),
                    first_seq=seq,
                    last_seq=seq + size - 1,
                    event_count=size,
                    key_id=self._key_id,
                    created_at=created,
                    min_occurred_at=created - timedelta(hours=1),
                    max_occurred_at=created - timedelta(seconds=5),
                    root_hex=f"{rng.getrandbits(256):064x}",
                    verification="failed" if failed else ("passed" if index < count - 2 else None),
                    verified_at=created + timedelta(minutes=5) if index < count - 2 else None,
                    problem=f"event {seq + 417} (seq {seq + 417}): column cost differs from its sealed bytes"
                    if failed
                    else None,
                )
            )
            seq += size
        return rows[::-1]

    # ------------------------------------------------------------------ plumbing

    def now(self) -> datetime:
        return self._clock if self._clock is not None else datetime.now(UTC)

    def describe(self) -> str:
        return f"demo data ({len(self._agents):,} agents)"

    def _enter(self, name: str) -> None:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1
            message = self.fail.get(name)
            pause = self.delay.get(name, 0.0)
        if pause:
            time.sleep(pause)
        if message is not None:
            raise CaracalError(message)

    def _drift(self) -> float:
        """Seconds since start when live (the demo moves), else 0."""
        return time.monotonic() - self._started if self.live else 0.0

    def _budget(
        self,
        policy: _Policy,
        names: dict[uuid.UUID, str],
        drift: float,
        bounds: dict[str, tuple[datetime, datetime]],
    ) -> Budget:
        settled, held, holds = self._spend[policy.policy_id]
        if self.live:
            step = Decimal(int(drift * 7 + policy.policy_id.int % 97)) / 100
            settled = min(settled + step, policy.limit.amount * Decimal("1.02")).quantize(Decimal("0.01"))
            holds = (holds + int(drift) // 3) % 6
            held = (Decimal(holds) * Decimal("0.35")).quantize(Decimal("0.01"))
        start, end = bounds[policy.window]
        return Budget(
            policy_id=policy.policy_id,
            owner_id=policy.agent_id,
            owner_name=names.get(policy.agent_id, "?"),
            window=policy.window,
            window_detail=f"calendar {policy.window} ({policy.zone})",
            window_start=start,
            window_end=end,
            limit=policy.limit,
            settled=Money(settled, "USD"),
            held=Money(held, "USD"),
            holds=holds,
        )

    def _rows(self) -> tuple[AgentRow, ...]:
        # one instant and one drift for the whole snapshot, as a real source reads one
        at = self.now()
        drift = self._drift()
        day = at.replace(hour=0, minute=0, second=0, microsecond=0)
        month = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        bounds = {
            "daily": (day, day + timedelta(days=1)),
            "monthly": (month, (month + timedelta(days=32)).replace(day=1)),
        }
        names = {a.agent_id: a.name for a in self._agents}
        by_agent: dict[uuid.UUID, list[Budget]] = {}
        for policy in self._policies.values():
            by_agent.setdefault(policy.agent_id, []).append(self._budget(policy, names, drift, bounds))
        return tuple(
            AgentRow(a.agent_id, a.name, a.owner, a.status, a.parent_id, tuple(by_agent.get(a.agent_id, ())))
            for a in self._agents
        )

    def _find(self, agent_id: uuid.UUID) -> AgentRow:
        for row in self._rows():
            if row.agent_id == agent_id:
                return row
        raise NotFoundError(f"agent {agent_id} not found")

    # ------------------------------------------------------------------ reads

    def overview(self) -> Overview:
        self._enter("overview")
        drift = self._drift()
        components = (
            Component(
                "store",
                Health.WARN if self.degraded else Health.OK,
                "unreachable" if self.degraded else "ok 2 ms",
                "PostgreSQL 17.2, schema 4/4",
            ),
            Component("bus", Health.OK, "ok", "event log in PostgreSQL"),
            Component("budget counters", Health.OK, "ok", "in process (local backend)"),
            Component(
                "gateway",
                Health.WARN if self.degraded else Health.OK,
                "degraded" if self.degraded else "ok",
                "http://127.0.0.1:8443, cache 1.2 s old",
            ),
            Component("ledger-writer", Health.OK, "running 1/1"),
            Component("metrics-aggregator", Health.OK, "running 1/1"),
            Component("audit-logger", Health.OFF, "not installed"),
        )
        requests = 42.5 + (drift % 10)
        denials = 0.0 if requests == 0 else 1.25 + (drift % 3) / 2
        traffic = Traffic(
            requests,
            denials,
            sum(self._spend[p][2] for p in self._policies),
            "degraded" if self.degraded else "ok",
        )
        lag = (
            Lag("ledger-writer-group", "caracal.metering.events", 12 + int(drift) % 40),
            Lag("metrics-aggregator-group", "caracal.metering.events", 0),
            Lag("audit-logger-group", "caracal.audit.events", 3),
        )
        latest = self._batches[0] if self._batches else None
        merkle = MerkleSummary(latest, len(self._batches), 87, self.now() - timedelta(seconds=41))
        alerts: list[Alert] = []
        if self.degraded:
            alerts.append(
                Alert(
                    AlertLevel.CRITICAL,
                    "DEGRADED MODE: the gateway serves from its cache (PostgreSQL unreachable)",
                )
            )
        if self.deny_all:
            alerts.append(
                Alert(
                    AlertLevel.CRITICAL,
                    "DENY-ALL ON: the gateway refuses every request (set by alice@example.com)",
                )
            )
        failed = next((b for b in self._batches if b.verification == "failed"), None)
        if failed is not None:
            alerts.append(
                Alert(AlertLevel.CRITICAL, f"LEDGER VERIFICATION FAILED: batch {str(failed.batch_id)[:8]}")
            )
        oldest = min((d.failed_at for d in self._letters), default=None)
        return Overview(
            taken_at=self.now(),
            deployment="demo",
            target=self.describe(),
            components=components,
            traffic=traffic,
            lag=lag,
            dlq=DlqSummary(len(self._letters), oldest),
            merkle=merkle,
            alerts=tuple(alerts),
        )

    def agents(self) -> AgentsSnapshot:
        self._enter("agents")
        return AgentsSnapshot(self.now(), self._rows(), "demo")

    def agent_detail(self, agent_id: uuid.UUID) -> AgentDetail:
        self._enter("agent_detail")
        rows = self._rows()
        by_id = {r.agent_id: r for r in rows}
        agent = by_id.get(agent_id)
        if agent is None:
            raise NotFoundError(f"agent {agent_id} not found")
        scopes = list(agent.budgets)
        parent = by_id.get(agent.parent_id) if agent.parent_id else None
        ancestor = parent
        while ancestor is not None:
            scopes.extend(ancestor.budgets)
            ancestor = by_id.get(ancestor.parent_id) if ancestor.parent_id else None
        history = tuple(
            version
            for policy in self._policies.values()
            if policy.agent_id == agent_id
            for version in policy.history
        )
        recent = self._events(agent, self.now() - timedelta(days=7), self.now())[:50]
        return AgentDetail(
            self.now(),
            agent,
            parent.name if parent else None,
            tuple(scopes),
            tuple(sorted(history, key=lambda v: v.created_at)),
            tuple(recent),
        )

    def _events(self, agent: AgentRow, start: datetime, end: datetime) -> list[LedgerRow]:
        index = next((i for i, a in enumerate(self._agents) if a.agent_id == agent.agent_id), 0)
        rng = random.Random(self._seed * 7919 + index)  # noqa: S311 - made-up data, not secrets
        rows = []
        at = self.now()
        event_id = 900_000 + index * 100
        for n in range(40):
            occurred = at - timedelta(minutes=37 * n + rng.randint(0, 30))
            kind = ("reservation", "settlement", "settlement", "denial", "settlement", "expiry")[n % 6]
            model = _MODELS[(n + index) % len(_MODELS)]
            tokens_in, tokens_out = rng.randint(200, 9000), rng.randint(50, 2000)
            cost = Decimal(0)
            if kind in ("settlement", "expiry"):
                cost = (
                    Decimal(tokens_in) * Decimal("0.0000025") + Decimal(tokens_out) * Decimal("0.00001")
                ).quantize(Decimal("0.000001"))
            if start <= occurred < end:
                rows.append(
                    LedgerRow(
                        event_id=event_id - n,
                        occurred_at=occurred,
                        event_type=kind,
                        agent_id=agent.agent_id,
                        agent_name=agent.name,
                        resource=_RESOURCES[(n + index) % len(_RESOURCES)],
                        model=model if kind != "denial" else None,
                        input_tokens=tokens_in if kind in ("settlement", "expiry") else None,
                        output_tokens=tokens_out if kind in ("settlement", "expiry") else None,
                        cost=Money(cost, "USD"),
                        sealed=n > 3,
                    )
                )
        return rows

    def ledger(self, query: LedgerQuery) -> LedgerPage:
        self._enter("ledger")
        if query.end <= query.start:
            raise ValidationError("end time must be after start time")
        rows = self._rows()
        wanted = query.agent.strip()
        if wanted:
            match = [r for r in rows if r.name == wanted or str(r.agent_id) == wanted]
            if not match:
                raise ValidationError(f"no agent with the id or name {wanted!r}")
            chosen = match
        else:
            chosen = list(rows[:20])
        events: list[LedgerRow] = []
        for agent in chosen:
            events.extend(self._events(agent, query.start, query.end))
        events.sort(key=lambda r: (r.occurred_at, r.event_id), reverse=True)
        return LedgerPage(
            query, chosen[0].name if wanted else None, tuple(events[: query.limit]), len(events) > query.limit
        )

    def dead_letters(self) -> DlqSnapshot:
        self._enter("dead_letters")
        with self._lock:
            letters = tuple(self._letters)
        return DlqSnapshot(self.now(), letters)

    def integrity(self) -> IntegritySnapshot:
        self._enter("integrity")
        return IntegritySnapshot(
            self.now(),
            tuple(self._batches),
            len(self._batches),
            87,
            f"caracal-2025-03-01+{self._key_id} (ed25519)",
        )

    def _verification(self, label: str, batches: list[BatchRow]) -> VerificationResult:
        bad = next((b for b in reversed(batches) if b.verification == "failed"), None)
        return VerificationResult(
            label=label,
            ok=bad is None,
            batches_checked=len(batches),
            events_checked=sum(b.event_count for b in batches),
            signatures_valid=True,
            merkle_root_hex=batches[0].root_hex if batches else None,
            unsealed_events=0,
            problems=0 if bad is None else 1,
            first_bad_batch=bad.batch_id if bad else None,
            first_bad_event=(f"{bad.first_seq + 417} (seq {bad.first_seq + 417})" if bad else None),
            problem=bad.problem if bad else None,
            seconds=0.042,
        )

    def verify_batch(self, batch_id: uuid.UUID) -> VerificationResult:
        self._enter("verify_batch")
        found = [b for b in self._batches if b.batch_id == batch_id]
        if not found:
            raise NotFoundError(f"merkle batch {batch_id} not found")
        return self._verification(f"batch {batch_id}", found)

    def verify_range(self, start: datetime, end: datetime) -> VerificationResult:
        self._enter("verify_range")
        if end < start:
            raise ValidationError("end time must not be before start time")
        found = [b for b in self._batches if b.max_occurred_at >= start and b.min_occurred_at <= end]
        return self._verification(f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC", found)

    def operations(self) -> OperationsSnapshot:
        self._enter("operations")
        facts = (
            ("Deployment", "demo (made-up data, nothing is changed anywhere)"),
            ("Store", "none"),
            ("Signing key", f"caracal-2025-03-01+{self._key_id}"),
            ("Deny-all", "ON" if self.deny_all else "off"),
        )
        return OperationsSnapshot(self.now(), tuple(self.capability(a) for a in catalogue.OPERATIONS), facts)

    # ------------------------------------------------------------------ actions

    def capability(self, action: str) -> Capability:
        if action not in catalogue.BY_ACTION:
            return Capability(action, False, f"unknown action {action!r}")
        reason = self.unavailable.get(action)
        return Capability(action, reason is None, reason or "")

    def plan(self, request: ActionRequest) -> ActionPlan:
        self._enter("plan")
        capability = self.capability(request.action)
        if not capability.available:
            raise ActionUnavailableError(f"{request.action} is not available: {capability.reason}")
        action = request.action
        if action in ("agent.suspend", "agent.activate"):
            agent = self._find(uuid.UUID(request.target))
            verb = "suspend" if action == "agent.suspend" else "activate"
            to = "suspended" if verb == "suspend" else "active"
            if agent.status == to:
                raise ConflictError(f"agent {agent.name} is already {to}")
            return ActionPlan(
                request,
                f"{verb.capitalize()} agent {agent.name}",
                (
                    PlanStep(f"Set agent {agent.name} ({agent.agent_id}) to {to}"),
                    PlanStep(f"Record agent.{verb} in the audit log"),
                ),
                verb,
                (
                    ("The gateway refuses its requests at its next cache refresh (within 5 s).",)
                    if verb == "suspend"
                    else ()
                ),
            )
        if action == "policy.change-limit":
            policy = self._policies.get(uuid.UUID(request.target))
            if policy is None:
                raise NotFoundError(f"policy {request.target} not found")
            limit = Money.parse_limit(request.param("limit"), policy.limit.currency)
            return ActionPlan(
                request,
                f"Change the {policy.window} limit of {request.label or policy.policy_id}",
                (
                    PlanStep(
                        f"Write version {len(policy.history) + 1} of policy {policy.policy_id}: "
                        f"{policy.limit.format()} -> {limit.format()}"
                    ),
                    PlanStep("Record policy.change in the audit log"),
                ),
                "change",
                (f"Reason: {request.param('reason')}",),
            )
        if action in ("dlq.retry", "dlq.purge"):
            letter = self._letter_by_id(int(request.target))
            if action == "dlq.retry":
                retry_steps = (
                    PlanStep(f"Publish dead letter {letter.dlq_id} to {letter.topic} again"),
                    PlanStep(f"Mark dead letter {letter.dlq_id} redriven"),
                )
                return ActionPlan(request, f"Retry dead letter {letter.dlq_id}", retry_steps, "retry")
            steps = (
                PlanStep(
                    f"Mark dead letter {letter.dlq_id} purged: it will never be applied", destructive=True
                ),
            )
            return ActionPlan(request, f"Purge dead letter {letter.dlq_id}", steps, "purge")
        if action == "integrity.rotate-key":
            return ActionPlan(
                request,
                "Rotate the ledger's signing key",
                (
                    PlanStep("Generate a new ed25519 signing key"),
                    PlanStep(f"Retire key {self._key_id}; keep its public key trusted"),
                    PlanStep(f"Delete the private key file of {self._key_id}", destructive=True),
                ),
                "rotate",
            )
        if action == "ops.replay":
            since = parse_when(request.param("since", "-1h"), self.now(), what="replay start")
            return ActionPlan(
                request,
                f"Replay metering events since {since:%Y-%m-%d %H:%M} UTC",
                (
                    PlanStep("Stop the ledger writer"),
                    PlanStep(
                        "Reset ledger-writer-group to the first offset after the start", destructive=True
                    ),
                    PlanStep("Start the ledger writer and wait until it caught up", long_running=True),
                ),
                "replay",
                ("Events already in the ledger are skipped by their idempotency keys.",),
            )
        if action == "ops.backup":
            return ActionPlan(
                request,
                "Back up the database",
                (PlanStep("Dump the database with pg_dump", long_running=True), PlanStep("Check the dump")),
                "backup",
            )
        if action == "ops.snapshot":
            return ActionPlan(
                request, "Take a snapshot", (PlanStep("Record budgets and the ledger position"),), "snapshot"
            )
        if action == "ops.stop-writes":
            return ActionPlan(
                request,
                "Emergency stop-writes",
                (
                    PlanStep(
                        "Turn the gateway's deny-all switch on: every request is refused", destructive=True
                    ),
                ),
                "stop-writes",
                (f"Reason: {request.param('reason')}",),
            )
        if action == "ops.resume-writes":
            return ActionPlan(
                request,
                "Resume writes",
                (PlanStep("Turn the gateway's deny-all switch off"),),
                "resume-writes",
            )
        raise ActionUnavailableError(f"{action} cannot be planned here")

    def _letter_by_id(self, dlq_id: int) -> DeadLetterRow:
        with self._lock:
            for letter in self._letters:
                if letter.dlq_id == dlq_id:
                    return letter
        raise NotFoundError(f"dead letter {dlq_id} not found or already resolved")

    def run(self, plan: ActionPlan, progress: ProgressCallback) -> ActionResult:
        self._enter("run")
        total = len(plan.steps)
        for index, step in enumerate(plan.steps, 1):
            progress(Progress(ProgressKind.STARTED, index, total, step.description))
            if step.long_running:
                for done in range(1, 6):
                    if self.step_delay:
                        time.sleep(self.step_delay)
                    progress(Progress(ProgressKind.PROGRESS, index, total, step.description, done * 20, 100))
            elif self.step_delay:
                time.sleep(self.step_delay)
            progress(Progress(ProgressKind.FINISHED, index, total, step.description))
        summary = self._apply(plan)
        with self._lock:
            self.runs.append(plan)
        return ActionResult(True, summary)

    def _apply(self, plan: ActionPlan) -> str:
        request = plan.request
        action = request.action
        with self._lock:
            if action in ("agent.suspend", "agent.activate"):
                status = "suspended" if action == "agent.suspend" else "active"
                agent_id = uuid.UUID(request.target)
                self._agents = [
                    replace(a, status=status) if a.agent_id == agent_id else a for a in self._agents
                ]
                return f"agent {request.label or agent_id} is {status}"
            if action == "policy.change-limit":
                policy = self._policies[uuid.UUID(request.target)]
                policy.limit = Money.parse_limit(request.param("limit"), policy.limit.currency)
                policy.history.append(
                    PolicyVersionRow(
                        policy.policy_id,
                        len(policy.history) + 1,
                        policy.limit,
                        policy.window,
                        "active",
                        request.param("reason"),
                        "demo",
                        self.now(),
                    )
                )
                return (
                    f"policy {policy.policy_id} is at version {len(policy.history)}: {policy.limit.format()}"
                )
            if action in ("dlq.retry", "dlq.purge"):
                dlq_id = int(request.target)
                self._letters = [d for d in self._letters if d.dlq_id != dlq_id]
                return f"dead letter {dlq_id} {'redriven' if action == 'dlq.retry' else 'purged'}"
            if action == "integrity.rotate-key":
                old, self._key_id = self._key_id, "91c2ee07"
                return f"signing key rotated: {old} retired, {self._key_id} active"
            if action == "ops.stop-writes":
                self.deny_all = True
                return "deny-all is ON: the gateway refuses every request"
            if action == "ops.resume-writes":
                self.deny_all = False
                return "deny-all is off"
            if action == "ops.backup":
                return "backup 20250314T120000Z written (12.4 MB), dump checked"
            if action == "ops.snapshot":
                return "snapshot 20250314T120000Z recorded"
            if action == "ops.replay":
                return "replayed 4,812 events; 4,812 already in the ledger (skipped)"
        raise ActionUnavailableError(f"{action} cannot be run here")

    def close(self) -> None:
        return None
