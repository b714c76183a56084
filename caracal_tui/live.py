"""The live data source: what ``caracal`` sees with the same configuration (embedded or distributed), read
through the ops toolkit, and changed through the same administrative use cases the CLI calls."""

from __future__ import annotations

import functools
import importlib.util
import operator
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import wraps
from typing import Any, ParamSpec, TypeVar

from caracal_ops import actions as ops_actions
from caracal_ops import inventory
from caracal_ops.cli.context import CliState
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
    NotAvailable,
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
from caracald.core.agents import Agent
from caracald.core.errors import CaracalError, ConflictError, ValidationError
from caracald.core.money import Money
from caracald.core.windows import WindowSpec

P = ParamSpec("P")
R = TypeVar("R")

#: The longest the overview waits for one probe (a platform call, a broker) before showing it as unknown.
PROBE_WAIT_SECONDS = 5.0


def _translated(method: Callable[P, R]) -> Callable[P, R]:
    """Any failure leaves as a Caracal error with one line an operator can read."""

    @wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except CaracalError:
            raise
        except Exception as exc:
            raise CaracalError(inventory.describe_error(exc)) from exc

    return call


@functools.lru_cache(maxsize=256)
def _window_words(spec: WindowSpec) -> tuple[str, str]:
    """How a window is shown, short and in full (a handful of distinct ones behind a thousand budgets)."""
    return (str(spec.window) if not spec.is_rolling else f"rolling {spec.window}"), str(spec)


def _budget(view: inventory.BudgetView, names: dict[uuid.UUID, str]) -> Budget:
    window, detail = _window_words(view.window)
    return Budget(
        policy_id=view.policy_id,
        owner_id=view.agent_id,
        owner_name=names.get(view.agent_id) or str(view.agent_id)[:8],
        window=window,
        window_detail=detail,
        window_start=view.window_start,
        window_end=view.window_end,
        limit=view.limit,
        settled=view.settled,
        held=view.held,
        holds=view.holds,
    )


def _agent_row(agent: Agent, budgets: tuple[Budget, ...]) -> AgentRow:
    return AgentRow(agent.agent_id, agent.name, agent.owner, str(agent.status), agent.parent_id, budgets)


def _batch(view: inventory.BatchView) -> BatchRow:
    return BatchRow(
        batch_id=view.batch_id,
        first_seq=view.first_seq,
        last_seq=view.last_seq,
        event_count=view.event_count,
        key_id=view.key_id,
        created_at=view.created_at,
        min_occurred_at=view.min_occurred_at,
        max_occurred_at=view.max_occurred_at,
        root_hex=view.root_hash.hex(),
        verification=view.verification_status,
        verified_at=view.verified_at,
        problem=view.verification_problem,
    )


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True, slots=True)
class _Outcome:
    """A probe's value, or the one line saying why there is none."""

    value: Any = None
    error: str | None = None


Runner = Callable[[ProgressCallback], ActionResult]


@dataclass(frozen=True, slots=True)
class _Shown:
    """What the last agents snapshot was made of, for the catalog it was made with."""

    catalog: inventory.Catalog
    views: dict[uuid.UUID, inventory.BudgetView]
    budgets: dict[uuid.UUID, tuple[inventory.BudgetView, Budget]]
    rows: dict[uuid.UUID, AgentRow]


class LiveSource:
    """Reads and changes the deployment ``state`` points at (``--config``, ``--database-url``)."""

    def __init__(self, state: CliState, *, readonly: bool = False) -> None:
        self.state = state
        self.readonly = readonly
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="caracal-tui-probe")
        self._counters: inventory.GatewayCounters | None = None
        self._catalog: inventory.Catalog | None = None  # agents and policy scopes, re-read when they change
        self._shown: _Shown | None = None  # the last agents snapshot's parts, reused where nothing changed
        self._plans: dict[str, Runner] = {}

    # ------------------------------------------------------------------ plumbing

    @property
    def kind(self) -> str:
        try:
            return "embedded" if self.state.config.embedded_mode else "distributed"
        except CaracalError:
            return "unconfigured"

    def describe(self) -> str:
        try:
            return inventory.deployment(self.state).store
        except CaracalError as exc:
            return f"configuration error: {exc.message}"

    def now(self) -> datetime:
        return datetime.now(UTC)

    def _db(self) -> None:
        """Open the store once, whichever worker gets here first (the embedded server may start now)."""
        with self._lock:
            self.state.db  # noqa: B018 - opens the pool (and starts the embedded server) on first use

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self.state.close()

    def _probe(self, call: Callable[[], Any]) -> Future[Any]:
        return self._pool.submit(call)

    @staticmethod
    def _outcome(future: Future[Any], wait: float = PROBE_WAIT_SECONDS) -> _Outcome:
        try:
            return _Outcome(future.result(timeout=wait))
        except FutureTimeout:
            return _Outcome(error=f"no answer within {wait:.0f} s")
        except Exception as exc:
            return _Outcome(error=inventory.describe_error(exc))

    # ------------------------------------------------------------------ overview

    @_translated
    def overview(self) -> Overview:
        state = self.state
        deployment = inventory.deployment(state)
        at = self.now()
        try:
            self._db()
            store_error: str | None = None
        except Exception as exc:
            store_error = inventory.describe_error(exc)
        probes: dict[str, Future[Any]] = {
            "gateway": self._probe(lambda: inventory.gateway_health(state)),
            "counters": self._probe(lambda: inventory.gateway_counters(state, at)),
            "services": self._probe(lambda: inventory.services(state)),
            "budget": self._probe(lambda: inventory.budget_counters_latency(state)),
        }
        if deployment.bus == "kafka":
            probes["bus"] = self._probe(lambda: inventory.kafka_brokers(state))
            probes["lag"] = self._probe(lambda: inventory.consumer_lag(state))
        if store_error is None:
            probes["store"] = self._probe(lambda: inventory.store_health(state))
            probes["switch"] = self._probe(lambda: inventory.deny_all(state))
            probes["dlq"] = self._probe(lambda: inventory.dead_letter_stats(state))
            probes["merkle"] = self._probe(lambda: inventory.sealing_state(state))
            if deployment.bus != "kafka":
                probes["lag"] = self._probe(lambda: inventory.consumer_lag(state))
        got = {name: self._outcome(future) for name, future in probes.items()}
        unreachable = _Outcome(error=f"the store is unreachable: {store_error}")

        def part(name: str) -> _Outcome:
            return got.get(name, unreachable)

        alerts: list[Alert] = []
        components = [self._store_component(part("store"), store_error, alerts)]
        components.append(self._bus_component(deployment, part("bus"), store_error))
        gateway = part("gateway")
        components.append(self._budget_component(part("budget"), gateway))
        components.extend(self._process_components(deployment, gateway, part("services"), alerts))
        traffic = self._traffic(gateway, part("counters"))
        switch = part("switch")
        if isinstance(switch.value, inventory.SwitchView) and switch.value.enabled:
            why = f": {switch.value.reason}" if switch.value.reason else ""
            alerts.append(
                Alert(
                    AlertLevel.CRITICAL,
                    f"DENY-ALL ON since {switch.value.set_at:%Y-%m-%d %H:%M} UTC by {switch.value.set_by}: "
                    f"the gateway refuses every request{why}",
                )
            )
        lag_part = part("lag")
        lag: tuple[Lag, ...] | NotAvailable = (
            NotAvailable(lag_part.error)
            if lag_part.error is not None
            else tuple(Lag(g.group, g.topic, g.lag, g.capped) for g in lag_part.value)
        )
        dlq_part = part("dlq")
        dlq: DlqSummary | NotAvailable = (
            NotAvailable(dlq_part.error)
            if dlq_part.error is not None
            else DlqSummary(dlq_part.value.pending, dlq_part.value.oldest_failed_at)
        )
        merkle_part = part("merkle")
        merkle: MerkleSummary | NotAvailable
        if merkle_part.error is not None:
            merkle = NotAvailable(merkle_part.error)
        else:
            sealing: inventory.SealingState = merkle_part.value
            latest = None if sealing.latest is None else _batch(sealing.latest)
            merkle = MerkleSummary(latest, sealing.batches, sealing.pending_events, sealing.oldest_pending)
            if latest is not None and latest.verification == "failed":
                alerts.append(
                    Alert(
                        AlertLevel.CRITICAL,
                        f"LEDGER VERIFICATION FAILED: batch {latest.batch_id}: "
                        f"{latest.problem or 'see Integrity'}",
                    )
                )
        return Overview(
            taken_at=at,
            deployment=deployment.name,
            target=f"{deployment.store} · bus {deployment.bus} · budgets {deployment.budget_backend}",
            components=tuple(components),
            traffic=traffic,
            lag=lag,
            dlq=dlq,
            merkle=merkle,
            alerts=tuple(alerts),
        )

    @staticmethod
    def _store_component(probe: _Outcome, store_error: str | None, alerts: list[Alert]) -> Component:
        if store_error is not None or probe.error is not None:
            error = store_error or probe.error or ""
            alerts.append(Alert(AlertLevel.CRITICAL, f"STORE UNREACHABLE from this dashboard: {error}"))
            return Component("store", Health.DOWN, "unreachable", error)
        health: inventory.StoreHealth = probe.value
        schema = f"{health.schema_version}/{health.expected_schema_version}"
        detail = f"PostgreSQL {health.server_version} · schema {schema}"
        if health.replica != "not configured":
            detail += f" · replica {health.replica}"
        if health.problems:
            return Component("store", Health.WARN, f"{health.latency_ms:.0f} ms", "; ".join(health.problems))
        return Component("store", Health.OK, f"ok {health.latency_ms:.0f} ms", detail)

    @staticmethod
    def _bus_component(
        deployment: inventory.Deployment, probe: _Outcome, store_error: str | None
    ) -> Component:
        if deployment.bus == "kafka":
            if probe.error is not None:
                return Component("bus", Health.DOWN, "unreachable", f"Kafka: {probe.error}")
            return Component("bus", Health.OK, f"{probe.value} brokers", "Kafka")
        if store_error is not None:
            return Component("bus", Health.DOWN, "unreachable", "the event log is in the store")
        return Component("bus", Health.OK, "ok", "event log in PostgreSQL")

    @staticmethod
    def _budget_component(probe: _Outcome, gateway: _Outcome) -> Component:
        if probe.error is not None:
            return Component("budget counters", Health.DOWN, "unreachable", probe.error)
        if probe.value is not None:
            return Component("budget counters", Health.OK, f"ok {probe.value:.0f} ms", "Redis")
        # the local backend lives in the gateway: only it can tell
        if gateway.error is not None:
            return Component("budget counters", Health.UNKNOWN, "gateway down", "in the gateway's process")
        budget = gateway.value.components.get("budget") or {}
        status = str(budget.get("status", "unknown"))
        health = Health.OK if status == "ok" else Health.DOWN
        return Component(
            "budget counters", health, status, str(budget.get("error") or "in the gateway's process")
        )

    def _process_components(
        self,
        deployment: inventory.Deployment,
        gateway: _Outcome,
        services: _Outcome,
        alerts: list[Alert],
    ) -> list[Component]:
        processes: dict[str, inventory.ServiceView] = {}
        if services.error is None:
            processes = {s.component: s for s in services.value}
        out = []
        process = processes.get("gateway")
        running = f" · process {process.state}" if process is not None else ""
        if gateway.error is not None:
            out.append(Component("gateway", Health.DOWN, "not answering", gateway.error + running))
        else:
            health_doc: inventory.GatewayHealth = gateway.value
            cache = health_doc.components.get("cache") or {}
            age = cache.get("age_seconds")
            detail = health_doc.url.removesuffix("/health") + (
                f" · cache {age:.1f} s old" if age is not None else ""
            )
            if health_doc.status == "ok":
                out.append(Component("gateway", Health.OK, "ok", detail))
            elif health_doc.status == "degraded":
                out.append(Component("gateway", Health.WARN, "DEGRADED", detail))
                alerts.append(
                    Alert(
                        AlertLevel.CRITICAL,
                        "DEGRADED MODE: the gateway serves from its cache (PostgreSQL unreachable)",
                    )
                )
            else:
                out.append(Component("gateway", Health.DOWN, health_doc.status.upper(), detail))
                alerts.append(
                    Alert(AlertLevel.CRITICAL, "GATEWAY UNAVAILABLE: it refuses every request (fail closed)")
                )
            if health_doc.deny_all and not any("DENY-ALL" in a.text for a in alerts):
                alerts.append(Alert(AlertLevel.CRITICAL, "DENY-ALL ON: the gateway refuses every request"))
        if services.error is not None:
            out.append(Component("services", Health.UNKNOWN, "unknown", services.error))
            return out
        for name, view in processes.items():
            if name == "gateway":
                continue
            replicas = (
                f" {view.ready}/{view.replicas}"
                if view.replicas is not None and view.ready is not None
                else ""
            )
            if view.state == "running":
                health = Health.OK
            elif view.state in ("starting", "stopping"):
                health = Health.WARN
            elif view.state == "failed":
                health = Health.DOWN
            elif view.state == "stopped":
                # embedded: the consumers run inside the gateway's process, a separate one need not run
                health = Health.OFF if deployment.embedded else Health.WARN
            elif view.state == "not-installed":
                health = Health.OFF
            else:
                health = Health.UNKNOWN
            out.append(Component(name, health, f"{view.state}{replicas}", view.detail))
        return out

    def _traffic(self, gateway: _Outcome, counters: _Outcome) -> Traffic | NotAvailable:
        if counters.error is not None:
            return NotAvailable(f"gateway metrics: {counters.error}")
        now: inventory.GatewayCounters = counters.value
        with self._lock:
            before, self._counters = self._counters, now
        requests = denials = None
        if before is not None:
            seconds = (now.at - before.at).total_seconds()
            if seconds > 0 and now.requests >= before.requests:
                requests = (now.requests - before.requests) / seconds
                denials = max(now.denials - before.denials, 0) / seconds
        status = gateway.value.status if gateway.error is None else "not answering"
        holds = None if now.holds_in_flight is None else int(now.holds_in_flight)
        return Traffic(requests, denials, holds, status)

    # ------------------------------------------------------------------ agents

    @_translated
    def agents(self) -> AgentsSnapshot:
        self._db()
        at = self.now()
        with self._lock:
            previous, before = self._catalog, self._shown
        catalog = inventory.catalog(self.state, previous)
        if before is None or before.catalog is not catalog:  # names or owners may differ: nothing to reuse
            before = _Shown(catalog, {}, {}, {})
        views = inventory.budgets(self.state, at, scopes=catalog.scopes, previous=before.views)
        names: dict[uuid.UUID, str] | None = None
        budgets: dict[uuid.UUID, tuple[inventory.BudgetView, Budget]] = {}
        by_agent: dict[uuid.UUID, list[Budget]] = {}
        for view in views:
            # the same view as last time (nothing about the policy changed): the same Budget
            found = before.budgets.get(view.policy_id)
            if found is not None and found[0] is view:
                budget = found[1]
            else:
                if names is None:
                    names = {a.agent_id: a.name for a in catalog.agents}
                budget = _budget(view, names)
            budgets[view.policy_id] = (view, budget)
            by_agent.setdefault(view.agent_id, []).append(budget)
        rows: dict[uuid.UUID, AgentRow] = {}
        for agent in catalog.agents:
            own = tuple(by_agent.get(agent.agent_id, ()))
            old = before.rows.get(agent.agent_id)
            # an unchanged agent is the same object as before: the dashboard skips it without comparing
            if old is None or len(old.budgets) != len(own) or not all(map(operator.is_, old.budgets, own)):
                old = _agent_row(agent, own)
            rows[agent.agent_id] = old
        shown = _Shown(catalog, {v.policy_id: v for v in views}, budgets, rows)
        with self._lock:
            self._catalog, self._shown = catalog, shown
        return AgentsSnapshot(at, tuple(rows.values()), inventory.budget_source(self.state))

    @_translated
    def agent_detail(self, agent_id: uuid.UUID) -> AgentDetail:
        self._db()
        at = self.now()
        state = self.state
        agent = inventory.agent(state, agent_id)
        scopes = inventory.agent_budgets(state, agent_id, at)
        names = {agent.agent_id: agent.name}
        for owner in {s.agent_id for s in scopes} - {agent.agent_id}:
            names[owner] = inventory.agent(state, owner).name
        parent_name = None
        if agent.parent_id is not None:
            parent_name = names.get(agent.parent_id) or inventory.agent(state, agent.parent_id).name
        chain = [agent.agent_id]
        while (above := inventory.agent(state, chain[-1]).parent_id) is not None and above not in chain:
            chain.append(above)
        rank = {agent_id: index for index, agent_id in enumerate(chain)}
        # its own policies first, then each ancestor's, nearest first
        budgets = tuple(
            sorted((_budget(s, names) for s in scopes), key=lambda b: rank.get(b.owner_id, len(chain)))
        )
        own = tuple(b for b in budgets if b.owner_id == agent.agent_id)
        history = tuple(
            PolicyVersionRow(
                v.policy_id,
                v.version,
                v.terms.limit,
                str(v.terms.window),
                str(v.status),
                v.change_reason,
                v.changed_by,
                v.created_at,
            )
            for v in inventory.policy_history(state, agent_id)
        )
        entries = inventory.ledger_events(state, agent_id, at - timedelta(days=7), at, limit=50)
        recent = tuple(self._ledger_row(e, names) for e in entries)
        return AgentDetail(at, _agent_row(agent, own), parent_name, budgets, history, recent)

    @staticmethod
    def _ledger_row(entry: inventory.LedgerEntry, names: dict[uuid.UUID, str]) -> LedgerRow:
        event = entry.event
        return LedgerRow(
            event_id=entry.event_id,
            occurred_at=event.occurred_at,
            event_type=str(event.event_type),
            agent_id=event.agent_id,
            agent_name=names.get(event.agent_id, str(event.agent_id)[:8]),
            resource=event.resource,
            model=event.model,
            input_tokens=event.input_tokens,
            output_tokens=event.output_tokens,
            cost=event.cost,
            sealed=entry.batch_id is not None,
        )

    @_translated
    def ledger(self, query: LedgerQuery) -> LedgerPage:
        self._db()
        state = self.state
        agent_id = None
        agent_name = None
        if query.agent:
            agent = inventory.find_agent(state, query.agent)
            agent_id, agent_name = agent.agent_id, agent.name
            names = {agent.agent_id: agent.name}
        else:
            names = {a.agent_id: a.name for a in inventory.agents(state)}
        entries = inventory.ledger_events(state, agent_id, query.start, query.end, limit=query.limit + 1)
        rows = tuple(self._ledger_row(e, names) for e in entries[: query.limit])
        return LedgerPage(query, agent_name, rows, len(entries) > query.limit)

    # ------------------------------------------------------------------ dead letters and integrity

    @_translated
    def dead_letters(self) -> DlqSnapshot:
        self._db()
        letters = tuple(
            DeadLetterRow(
                dlq_id=d.dlq_id,
                group=d.consumer_group,
                topic=d.source_topic,
                partition=d.source_partition,
                offset=d.source_offset,
                error_type=d.error_type,
                error_message=d.error_message,
                retry_count=d.retry_count,
                failed_at=d.failed_at,
                event_id=d.event_id,
                key=d.key,
                payload=d.payload,
                headers=d.headers,
            )
            for d in inventory.dead_letters(self.state)
        )
        return DlqSnapshot(self.now(), letters)

    @_translated
    def integrity(self) -> IntegritySnapshot:
        self._db()
        at = self.now()
        try:
            sealing = inventory.sealing_state(self.state)
            batches = tuple(_batch(b) for b in inventory.recent_batches(self.state))
        except inventory.NotAvailableError as exc:
            return IntegritySnapshot(at, NotAvailable(exc.message), 0, 0, "-")
        try:
            key = inventory.signing_key(self.state)
            signing = (
                f"{key.active} ({key.trusted} trusted)"
                if key.active
                else f"none in {key.key_dir} ({key.trusted} trusted)"
            )
        except CaracalError as exc:
            signing = exc.message
        return IntegritySnapshot(at, batches, sealing.batches, sealing.pending_events, signing)

    @staticmethod
    def _verification(label: str, result: inventory.Verification) -> VerificationResult:
        return VerificationResult(
            label=label,
            ok=result.ok,
            batches_checked=result.batches_checked,
            events_checked=result.events_checked,
            signatures_valid=result.signatures_valid,
            merkle_root_hex=result.merkle_root.hex() if result.merkle_root else None,
            unsealed_events=result.unsealed_events,
            problems=result.problems,
            first_bad_batch=result.first_bad_batch,
            first_bad_event=result.first_bad_event,
            problem=result.problem,
            seconds=result.seconds,
        )

    @_translated
    def verify_batch(self, batch_id: uuid.UUID) -> VerificationResult:
        self._db()
        return self._verification(f"batch {batch_id}", inventory.verify_batch(self.state, batch_id))

    @_translated
    def verify_range(self, start: datetime, end: datetime) -> VerificationResult:
        self._db()
        label = f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"
        return self._verification(label, inventory.verify_range(self.state, start, end))

    # ------------------------------------------------------------------ operations

    @_translated
    def operations(self) -> OperationsSnapshot:
        deployment = inventory.deployment(self.state)
        facts: list[tuple[str, str]] = [
            ("Deployment", f"{deployment.name} · config {deployment.config_source}"),
            ("Store", deployment.store),
            ("Bus", deployment.bus),
            ("Budget counters", deployment.budget_backend),
            ("Platform", deployment.platform),
        ]
        try:
            key = inventory.signing_key(self.state)
            facts.append(("Signing key", f"{key.active or 'none'} in {key.key_dir}"))
        except CaracalError as exc:
            facts.append(("Signing key", exc.message))
        try:
            self._db()
            switch = inventory.deny_all(self.state)
            facts.append(("Deny-all", "ON" if switch and switch.enabled else "off"))
        except Exception as exc:
            facts.append(("Deny-all", f"unknown: {inventory.describe_error(exc)}"))
        return OperationsSnapshot(
            self.now(), tuple(self.capability(a) for a in catalogue.OPERATIONS), tuple(facts)
        )

    # ------------------------------------------------------------------ actions

    #: Actions that run a procedure of the ops toolkit, and the module that holds it (missing: not available).
    _PROCEDURES: dict[str, tuple[str, str]] = {  # noqa: RUF012 - read-only table
        "dlq.retry": ("caracal_ops.procedures.dlq", "DLQ redrive"),
        "dlq.purge": ("caracal_ops.procedures.dlq", "DLQ purge"),
        "ops.backup": ("caracal_ops.procedures.backup", "backup"),
        "ops.snapshot": ("caracal_ops.procedures.snapshot", "snapshot"),
        "ops.replay": ("caracal_ops.procedures.replay", "replay"),
        "ops.stop-writes": ("caracal_ops.procedures.emergency", "emergency stop-writes"),
        "ops.resume-writes": ("caracal_ops.procedures.emergency", "resume writes"),
    }
    #: How long a replay's run follows the consumer re-reading, at most, and without any progress.
    follow_seconds: float = 120.0
    stall_seconds: float = 10.0

    def capability(self, action: str) -> Capability:
        spec = catalogue.BY_ACTION.get(action)
        if spec is None:
            return Capability(action, False, f"unknown action {action!r}")
        if spec.changes and self.readonly:
            return Capability(action, False, "the dashboard is read-only")
        if action.startswith("integrity.") and not _module_exists("caracald.integrity.verifier"):
            return Capability(action, False, "ledger integrity (caracald.integrity) is not installed")
        if action in self._PROCEDURES:
            module, what = self._PROCEDURES[action]
            if not _module_exists(module):
                return Capability(
                    action, False, f"no {what} procedure in this installation yet ({module} is not there)"
                )
        return Capability(action, True)

    @_translated
    def plan(self, request: ActionRequest) -> ActionPlan:
        capability = self.capability(request.action)
        if not capability.available:
            raise ActionUnavailableError(f"{request.action} is not available: {capability.reason}")
        self._db()
        builders: dict[str, Callable[[ActionRequest], tuple[ActionPlan, Runner]]] = {
            "agent.suspend": self._plan_status,
            "agent.activate": self._plan_status,
            "policy.change-limit": self._plan_limit,
            "integrity.rotate-key": self._plan_rotation,
            "dlq.retry": self._plan_dlq,
            "dlq.purge": self._plan_dlq,
            "ops.backup": self._plan_backup,
            "ops.snapshot": self._plan_snapshot,
            "ops.replay": self._plan_replay,
            "ops.stop-writes": self._plan_emergency,
            "ops.resume-writes": self._plan_emergency,
        }
        builder = builders.get(request.action)
        if builder is None:
            raise ActionUnavailableError(f"{request.action} cannot be planned by this dashboard")
        plan, runner = builder(request)
        with self._lock:
            self._plans[plan.token] = runner
        return plan

    def run(self, plan: ActionPlan, progress: ProgressCallback) -> ActionResult:
        if self.readonly:
            raise ActionUnavailableError("the dashboard is read-only")
        with self._lock:
            runner = self._plans.pop(plan.token, None)
        if runner is None:
            raise ActionUnavailableError("this plan was not made here, or it already ran: plan it again")
        try:
            return runner(progress)
        except CaracalError:
            raise
        except Exception as exc:
            raise CaracalError(inventory.describe_error(exc)) from exc

    @staticmethod
    def _single_call(plan_steps: tuple[PlanStep, ...], call: Callable[[], str]) -> Runner:
        """A runner for an action that is one audited call: its steps start together and end together."""

        def run(progress: ProgressCallback) -> ActionResult:
            total = len(plan_steps)
            progress(Progress(ProgressKind.STARTED, 1, total, plan_steps[0].description))
            try:
                summary = call()
            except Exception as exc:
                progress(
                    Progress(
                        ProgressKind.FAILED,
                        1,
                        total,
                        plan_steps[0].description,
                        detail=inventory.describe_error(exc),
                    )
                )
                raise
            for index, step in enumerate(plan_steps, 1):
                if index > 1:
                    progress(Progress(ProgressKind.STARTED, index, total, step.description))
                progress(Progress(ProgressKind.FINISHED, index, total, step.description))
            return ActionResult(True, summary)

        return run

    def _plan_status(self, request: ActionRequest) -> tuple[ActionPlan, Runner]:
        suspend = request.action == "agent.suspend"
        agent = inventory.agent(self.state, uuid.UUID(request.target))
        to = "suspended" if suspend else "active"
        if str(agent.status) == to:
            raise ConflictError(f"agent {agent.name} is already {to}")
        verb = "suspend" if suspend else "activate"
        steps = (
            PlanStep(f"Set agent {agent.name} ({agent.agent_id}) to {to}"),
            PlanStep(f"Record agent.{verb} in the audit log as {self.state.who}"),
        )
        notes: tuple[str, ...] = ()
        if suspend:
            notes = (
                "The gateway refuses its requests from its next cache refresh "
                f"(within {self.state.config.gateway.cache_refresh_seconds:g} s); "
                "agents under it keep their own status.",
            )
        reason = request.param("reason")
        if reason:
            notes = (*notes, f"Reason: {reason}")

        def call() -> str:
            changed_agent, changed = ops_actions.set_agent_status(
                self.state, agent.agent_id, suspend=suspend, reason=reason
            )
            return f"agent {changed_agent.name} is {changed_agent.status}" + (
                "" if changed else " (it already was)"
            )

        plan = ActionPlan(request, f"{verb.capitalize()} agent {agent.name}", steps, verb, notes)
        return plan, self._single_call(steps, call)

    def _plan_limit(self, request: ActionRequest) -> tuple[ActionPlan, Runner]:
        policy = inventory.policy(self.state, uuid.UUID(request.target))
        if not policy.is_active:
            raise ConflictError(f"policy {policy.policy_id} is inactive")
        reason = request.param("reason").strip()
        if not reason:
            raise ValidationError("a change reason is required: say why the budget changes")
        limit = Money.parse_limit(request.param("limit"), policy.terms.limit.currency)
        steps = (
            PlanStep(
                f"Write version {policy.version + 1} of policy {policy.policy_id} ({policy.terms.window}): "
                f"limit {policy.terms.limit.format()} -> {limit.format()}"
            ),
            PlanStep("Check it against the policies of the agents above and below"),
            PlanStep(f"Record policy.change in the audit log as {self.state.who}"),
        )
        notes = (
            f"Reason: {reason}",
            "Earlier versions stay as history; the gateway applies it at its next refresh.",
        )

        def call() -> str:
            version = ops_actions.change_policy_limit(
                self.state, policy.policy_id, request.param("limit"), reason
            )
            return (
                f"policy {version.policy_id} is at version {version.version}: {version.terms.limit.format()}"
            )

        plan = ActionPlan(
            request, f"Change the limit of {request.label or policy.policy_id}", steps, "change", notes
        )
        return plan, self._single_call(steps, call)

    def _plan_rotation(self, request: ActionRequest) -> tuple[ActionPlan, Runner]:
        key = inventory.signing_key(self.state)
        if key.active is None:
            raise ValidationError(
                f"no active signing key in {key.key_dir}: create one first with 'caracal merkle generate-key'"
            )
        steps = (
            PlanStep(f"Generate a new signing key in {key.key_dir}"),
            PlanStep(f"Retire key {key.active}; its public key stays trusted for the batches it signed"),
            PlanStep(f"Record merkle.rotate_keys in the audit log as {self.state.who}"),
            PlanStep(
                f"Delete the private key file of {key.active}: nothing can sign as it again", destructive=True
            ),
        )
        notes = ("The sealer signs the next batch with the new key.",)
        reason = request.param("reason")

        def call() -> str:
            rotated = ops_actions.rotate_signing_key(self.state, reason)
            return (
                f"signing key {rotated.key_name}+{rotated.key_id} is active; {rotated.retired_name} retired"
            )

        plan = ActionPlan(request, "Rotate the ledger's signing key", steps, "rotate", notes)
        return plan, self._single_call(steps, call)

    # ------------------------------------------------------------------ procedures

    def _procedure(
        self, request: ActionRequest, plan: Any, *, extra: tuple[PlanStep, ...] = ()
    ) -> tuple[ActionPlan, Runner]:
        """A procedure's plan as the dashboard shows it, and a runner that executes it, audited."""
        if not plan.steps:
            said = "; ".join(plan.notes) or plan.title
            raise ConflictError(f"nothing to do: {said}")
        steps = tuple(PlanStep(s.description, s.destructive, s.long_running) for s in plan.steps) + extra
        shown = ActionPlan(request, plan.title, steps, plan.confirm_word, tuple(plan.notes))
        total = len(steps)

        def run(progress: ProgressCallback) -> ActionResult:
            def forward(event: Any) -> None:
                kind = _PROGRESS_KINDS.get(str(event.kind))
                if kind is None:
                    return
                description = event.step.description if event.step is not None else ""
                progress(Progress(kind, event.index, total, description, event.done, event.of, event.detail))

            report = ops_actions.run_procedure(self.state, plan, forward)
            summaries = tuple(f"{s.key}: {s.summary}" for s in report.steps if s.summary)
            warnings = tuple(f"warning: {w}" for w in report.warnings)
            last = next((s.summary for s in reversed(report.steps) if s.summary), None)
            return ActionResult(True, last or f"{plan.title}: done", summaries + warnings)

        return shown, run

    def _plan_dlq(self, request: ActionRequest) -> tuple[ActionPlan, Runner]:
        try:
            dlq_id = int(request.target)
        except ValueError:
            raise ValidationError(f"not a dead letter id: {request.target!r}") from None
        if request.action == "dlq.retry":
            return self._procedure(request, ops_actions.plan_dlq_retry(self.state, [dlq_id]))
        return self._procedure(request, ops_actions.plan_dlq_purge(self.state, [dlq_id]))

    def _plan_backup(self, request: ActionRequest) -> tuple[ActionPlan, Runner]:
        return self._procedure(request, ops_actions.plan_backup(self.state, request.param("tag") or None))

    def _plan_snapshot(self, request: ActionRequest) -> tuple[ActionPlan, Runner]:
        return self._procedure(request, ops_actions.plan_snapshot(self.state))

    def _plan_emergency(self, request: ActionRequest) -> tuple[ActionPlan, Runner]:
        if request.action == "ops.stop-writes":
            reason = request.param("reason").strip() or "emergency stop-writes from the dashboard"
            return self._procedure(request, ops_actions.plan_stop_writes(self.state, reason))
        return self._procedure(request, ops_actions.plan_resume_writes(self.state))

    def _plan_replay(self, request: ActionRequest) -> tuple[ActionPlan, Runner]:
        since = parse_when(request.param("since"), self.now(), what="replay start")
        group = request.param("group").strip() or "ledger-writer-group"
        plan = ops_actions.plan_replay(self.state, since=since, group=group)
        follow = PlanStep(f"Follow {group} as it reads the events again", long_running=True)
        shown, run_reset = self._procedure(request, plan, extra=(follow,))
        total = len(shown.steps)

        def run(progress: ProgressCallback) -> ActionResult:
            result = run_reset(progress)
            progress(Progress(ProgressKind.STARTED, total, total, follow.description))
            detail = self._follow_replay(
                group,
                lambda done, of, text: progress(
                    Progress(ProgressKind.PROGRESS, total, total, follow.description, done, of, text)
                ),
            )
            progress(Progress(ProgressKind.FINISHED, total, total, follow.description, detail=detail))
            return ActionResult(True, f"{result.summary}; {detail}", result.details)

        return shown, run

    def _follow_replay(self, group: str, report: Callable[[int, int, str], None]) -> str:
        """Poll the group's progress until it has read everything again, stops moving, or time is up."""
        started = last_move = time.monotonic()
        last: tuple[int, int | None] | None = None
        while True:
            try:
                found = ops_actions.replay_progress(self.state, group)
            except Exception as exc:
                return f"cannot follow the replay: {inventory.describe_error(exc)}"
            if found is None:
                return "no replay progress recorded for this group"
            share = found.progress if found.progress is not None else 0.0
            report(int(share * 1000), 1000, f"{found.replayed or 0:,} events read again, lag {found.lag:,}")
            if share >= 1.0 or found.lag == 0:
                return f"{group} has read everything again"
            now = time.monotonic()
            if (found.lag, found.replayed) != last:
                last, last_move = (found.lag, found.replayed), now
            if now - last_move > self.stall_seconds or now - started > self.follow_seconds:
                where = f"{share * 100:.0f}%, lag {found.lag:,}"
                return f"{group} is still reading ({where}): follow it on the Overview"
            time.sleep(0.5)


_PROGRESS_KINDS = {
    "step-started": ProgressKind.STARTED,
    "progress": ProgressKind.PROGRESS,
    "step-finished": ProgressKind.FINISHED,
    "step-failed": ProgressKind.FAILED,
    "warning": ProgressKind.WARNING,
}
