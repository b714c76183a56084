"""Read-only views of what Caracal holds, for front ends (the TUI) that must not reach into the engine.

Every function takes the CLI's :class:`~caracal_ops.cli.context.CliState`, so a front end sees exactly what
``caracal`` sees with the same ``--config`` and ``--database-url``, and returns plain dataclasses (or the pure
core's types) that do not tie the caller to the store, the bus or the budget backends.

Capabilities that another part of Caracal provides, and that may be missing from an installation (the
ledger's Merkle batches, the platform's services), are imported when first used: a missing one raises
:class:`NotAvailableError`, which says so, rather than failing the caller's import.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg

from caracal_ops.cli.context import CliState
from caracald.admin import agents as agent_admin
from caracald.admin import budget as budget_admin
from caracald.admin import database as database_admin
from caracald.admin import ledger as ledger_admin
from caracald.admin import policies as policy_admin
from caracald.admin.budget import Catalog as Catalog  # re-exported: the dashboard holds one
from caracald.budget.base import Scope, ScopeStatus
from caracald.core.agents import Agent
from caracald.core.errors import CaracalError, NotFoundError, StoreUnavailableError, ValidationError
from caracald.core.ledger import LedgerEvent, SpendingSummary
from caracald.core.money import Money
from caracald.core.policy import PolicyVersion
from caracald.core.windows import WindowBounds, WindowSpec
from caracald.store import dlq as dlq_store
from caracald.store import gateway as gateway_store
from caracald.store import policies as policy_store

#: How long one probe of a network service (the gateway's health or metrics) may take.
PROBE_SECONDS = 1.5
#: The most pending records counted per consumer group and topic (more shows as "at least").
LAG_COUNT_CAP = 100_000


class NotAvailableError(CaracalError):
    """This installation does not have the capability (yet): the message says which and why."""

    reason = "not_available"


def describe_error(exc: BaseException) -> str:
    """One line for an operator, whatever failed: Caracal's own message, PostgreSQL's, or the exception's."""
    if isinstance(exc, CaracalError):
        return exc.message
    if isinstance(exc, psycopg.OperationalError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"PostgreSQL is unavailable: {first}"
    if isinstance(exc, psycopg.Error):
        diag = getattr(exc, "diag", None)
        primary = diag.message_primary if diag is not None else None
        return f"database error: {(primary or str(exc)).strip().splitlines()[0]}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def optional_module(module: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise NotAvailableError(f"{what} is not available in this installation ({module}: {exc})") from None


# --------------------------------------------------------------------------- deployment


@dataclass(frozen=True, slots=True)
class Deployment:
    """What the configuration points at: the embedded default or the distributed deployment."""

    embedded: bool
    store: str  # "embedded PostgreSQL in <dir>" or "PostgreSQL at <host>"
    bus: str  # "postgres" or "kafka"
    budget_backend: str  # "local" or "redis"
    platform: str  # "local", "systemd" or "kubernetes"
    config_source: str

    @property
    def name(self) -> str:
        return "embedded" if self.embedded else "distributed"


def deployment(state: CliState) -> Deployment:
    config = state.config
    if config.embedded_mode:
        store = f"embedded PostgreSQL in {config.embedded.data_dir.expanduser()}"
    else:
        url = config.database.url.get_secret_value() if config.database.url else ""
        host = url.split("@", 1)[-1].split("/", 1)[0].split("?", 1)[0] or "localhost"
        store = f"PostgreSQL at {host}"
    return Deployment(
        embedded=config.embedded_mode,
        store=store,
        bus=config.bus.kind,
        budget_backend=config.budget.backend,
        platform=config.platform.kind,
        config_source=config.source,
    )


# --------------------------------------------------------------------------- agents, budgets, policies


def agents(state: CliState) -> list[Agent]:
    return agent_admin.list_agents(state.db)


def agent(state: CliState, agent_id: uuid.UUID) -> Agent:
    return agent_admin.get_agent(state.db, agent_id)


@dataclass(frozen=True, slots=True)
class BudgetView:
    """Where one policy stands in its current window."""

    policy_id: uuid.UUID
    agent_id: uuid.UUID  # whose policy it is (an ancestor's, for a delegated agent's scopes)
    window: WindowSpec
    window_start: datetime
    window_end: datetime
    limit: Money
    settled: Money
    held: Money
    holds: int

    @property
    def remaining(self) -> Money:
        return self.limit - self.settled - self.held


def _view(status: ScopeStatus) -> BudgetView:
    return BudgetView(
        policy_id=status.scope.policy_id,
        agent_id=status.scope.agent_id,
        window=status.scope.window,
        window_start=status.bounds.start,
        window_end=status.bounds.end,
        limit=status.scope.limit,
        settled=status.settled,
        held=status.held,
        holds=status.holds,
    )


def _redis_statuses(state: CliState, scopes: list[Any], at: datetime) -> list[ScopeStatus]:
    from caracald.budget.redis_backend import RedisBudget

    url = state.config.redis.url
    if url is None:
        raise ValidationError("budget.backend is redis but no redis.url is configured")

    async def fetch() -> list[ScopeStatus]:
        budget = RedisBudget.from_url(url.get_secret_value())
        try:
            return await budget.status(scopes, at)
        finally:
            await budget.close()

    return asyncio.run(fetch())


def budget_source(state: CliState) -> str:
    """Where budget figures come from: the shared Redis counters, or the ledger (embedded)."""
    return "redis" if state.config.budget.backend == "redis" else "ledger"


def _hold_ttl(state: CliState) -> timedelta:
    return timedelta(seconds=state.config.gateway.hold_ttl_seconds)


def catalog(state: CliState, previous: Catalog | None = None) -> Catalog:
    """Every agent and active policy scope; ``previous`` when nothing changed (see :func:`budgets`)."""
    return budget_admin.catalog(state.db, previous)


def budgets(
    state: CliState,
    at: datetime,
    *,
    scopes: Sequence[Scope] | None = None,
    previous: Mapping[uuid.UUID, BudgetView] | None = None,
) -> list[BudgetView]:
    """Every active policy's limit, settled spend and open holds in the window in force at ``at`` (of
    ``scopes``, when the caller holds them from a :func:`catalog`).

    ``previous``: views from an earlier call, by policy. One that the new figures would make again is
    returned itself, so a caller can tell what changed by identity (on a dashboard, most do not)."""
    if budget_source(state) == "redis":
        chosen = list(scopes) if scopes is not None else budget_admin.all_scopes(state.db)
        return [_view(s) for s in _redis_statuses(state, chosen, at)]
    figures = budget_admin.all_ledger_figures(state.db, at, hold_ttl=_hold_ttl(state), scopes=scopes)
    money = budget_admin.ZeroShared()
    before = previous or {}
    views = []
    for scope in figures.scopes:
        settled, held, holds = figures.totals.get(scope.policy_id, budget_admin.NOTHING)
        bounds = figures.bounds[scope.window]
        old = before.get(scope.policy_id)
        if old is not None and _makes(old, scope, bounds, settled, held, holds):
            views.append(old)
            continue
        currency = scope.limit.currency
        views.append(
            BudgetView(
                policy_id=scope.policy_id,
                agent_id=scope.agent_id,
                window=scope.window,
                window_start=bounds.start,
                window_end=bounds.end,
                limit=scope.limit,
                settled=money(settled, currency),
                held=money(held, currency),
                holds=holds,
            )
        )
    return views


def _makes(
    view: BudgetView, scope: Scope, bounds: WindowBounds, settled: Decimal, held: Decimal, holds: int
) -> bool:
    """``view`` is what these figures make. Money keeps its amount at the ledger scale, so a figure equal to
    that amount makes the very same Money (one with finer digits is never equal to it, and is rebuilt)."""
    return (
        view.holds == holds
        and view.settled.amount == settled
        and view.held.amount == held
        and view.window_start == bounds.start
        and view.window_end == bounds.end
        and view.agent_id == scope.agent_id
        and (view.limit is scope.limit or view.limit == scope.limit)
        and (view.window is scope.window or view.window == scope.window)
    )


def agent_budgets(state: CliState, agent_id: uuid.UUID, at: datetime) -> list[BudgetView]:
    """Every policy a request of this agent must fit (its own and its ancestors'), as ``caracal budget
    status`` shows them."""
    scopes = budget_admin.scopes_for(state.db, agent_id)
    if budget_source(state) == "redis":
        return [_view(s) for s in _redis_statuses(state, scopes, at)]
    return [_view(s) for s in budget_admin.ledger_status(state.db, scopes, at, hold_ttl=_hold_ttl(state))]


def policy_history(state: CliState, agent_id: uuid.UUID) -> list[PolicyVersion]:
    return policy_admin.policy_history(state.db, agent_id)


def policy(state: CliState, policy_id: uuid.UUID) -> PolicyVersion:
    """A policy's current version."""
    with state.db.read() as conn:
        found = policy_store.current(conn, policy_id)
    if found is None:
        raise NotFoundError(f"policy {policy_id} not found")
    return found


# --------------------------------------------------------------------------- ledger


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    event_id: int
    event: LedgerEvent
    recorded_at: datetime
    batch_id: uuid.UUID | None  # its Merkle batch, once sealed


def ledger_events(
    state: CliState, agent_id: uuid.UUID | None, start: datetime, end: datetime, *, limit: int = 500
) -> list[LedgerEntry]:
    return [
        LedgerEntry(e.event_id, e.event, e.recorded_at, e.batch_id)
        for e in ledger_admin.events(state.db, agent_id, start, end, limit=limit)
    ]


def spending(state: CliState, agent_id: uuid.UUID, start: datetime, end: datetime) -> list[SpendingSummary]:
    return ledger_admin.spending(state.db, agent_id, start, end)


def find_agent(state: CliState, text: str) -> Agent:
    """An agent by id, or by exact name."""
    text = text.strip()
    try:
        return agent(state, uuid.UUID(text))
    except ValueError:
        pass
    for candidate in agents(state):
        if candidate.name == text:
            return candidate
    raise ValidationError(f"no agent with the id or name {text!r}")


# --------------------------------------------------------------------------- health


@dataclass(frozen=True, slots=True)
class StoreHealth:
    healthy: bool
    server_version: str
    latency_ms: float
    schema_version: int
    expected_schema_version: int
    replica: str
    problems: tuple[str, ...]


def store_health(state: CliState) -> StoreHealth:
    report = database_admin.health_check(state.db)
    return StoreHealth(
        healthy=report.healthy,
        server_version=report.server_version,
        latency_ms=report.latency_ms,
        schema_version=report.schema_version,
        expected_schema_version=report.expected_schema_version,
        replica=report.replica,
        problems=report.problems,
    )


@dataclass(frozen=True, slots=True)
class SwitchView:
    enabled: bool
    reason: str
    set_by: str
    set_at: datetime


def deny_all(state: CliState) -> SwitchView | None:
    """The gateway's deny-all switch as the store holds it (None: never set)."""
    with state.db.read() as conn:
        switch = gateway_store.get_switch(conn, gateway_store.DENY_ALL)
    return None if switch is None else SwitchView(switch.enabled, switch.reason, switch.set_by, switch.set_at)


def _gateway_base(state: CliState, port: int) -> str:
    return state.config.gateway.local_url(port)


def _fetch(url: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Accept": "application/json, text/plain"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=PROBE_SECONDS) as answer:  # noqa: S310
            return int(answer.status), answer.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StoreUnavailableError(f"{url} is not answering: {reason}") from None


@dataclass(frozen=True, slots=True)
class GatewayHealth:
    url: str
    status: str  # "ok", "degraded" or "unavailable", as the gateway says
    deny_all: bool
    components: dict[str, Any]


def gateway_health(state: CliState) -> GatewayHealth:
    """The gateway's own ``/health`` (at ``gateway.host``:``gateway.port``)."""
    url = _gateway_base(state, state.config.gateway.port) + "/health"
    code, body = _fetch(url)
    try:
        data = json.loads(body)
    except ValueError:
        raise StoreUnavailableError(f"{url} answered {code} without a health document") from None
    if not isinstance(data, dict) or "status" not in data:
        raise StoreUnavailableError(f"{url} answered {code} without a health document")
    return GatewayHealth(
        url=url,
        status=str(data["status"]),
        deny_all=bool(data.get("deny_all")),
        components=dict(data.get("components") or {}),
    )


@dataclass(frozen=True, slots=True)
class GatewayCounters:
    """The gateway's cumulative counters at one instant; two of them give rates."""

    at: datetime
    requests: float
    denials: float
    holds_in_flight: float | None


def gateway_counters(state: CliState, at: datetime | None = None) -> GatewayCounters:
    """Requests and denials so far, from the gateway's Prometheus endpoint (``gateway.metrics_port``)."""
    from prometheus_client.parser import text_string_to_metric_families

    url = _gateway_base(state, state.config.gateway.metrics_port) + "/metrics"
    code, body = _fetch(url)
    if code != 200:
        raise StoreUnavailableError(f"{url} answered {code}")
    totals = {"caracal_gateway_requests": 0.0, "caracal_gateway_denials": 0.0}
    holds: float | None = None
    for family in text_string_to_metric_families(body.decode(errors="replace")):
        if family.name in totals:
            totals[family.name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
        elif family.name == "caracal_gateway_holds_in_flight":
            holds = sum(s.value for s in family.samples)
    return GatewayCounters(
        at=at or datetime.now(UTC),
        requests=totals["caracal_gateway_requests"],
        denials=totals["caracal_gateway_denials"],
        holds_in_flight=holds,
    )


@dataclass(frozen=True, slots=True)
class ServiceView:
    component: str
    state: str  # running, starting, stopping, stopped, failed, not-installed, unknown
    replicas: int | None
    ready: int | None
    detail: str


def services(state: CliState) -> list[ServiceView]:
    """Each daemon's state on the configured platform (local supervisor, systemd or Kubernetes)."""
    platform_module = optional_module("caracal_ops.platform", "service control")
    platform = platform_module.platform_for(state.config)
    views = []
    for component in platform_module.COMPONENTS:
        try:
            status = platform.status(component)
        except CaracalError as exc:
            views.append(ServiceView(component, "unknown", None, None, exc.message))
            continue
        views.append(ServiceView(component, str(status.state), status.replicas, status.ready, status.detail))
    return views


def budget_counters_latency(state: CliState) -> float | None:
    """Milliseconds for the shared (Redis) budget counters to answer; None when the counters live in the
    gateway's process (the local backend), where only the gateway can say how they are."""
    if budget_source(state) != "redis":
        return None
    from caracald.budget.redis_backend import RedisBudget

    url = state.config.redis.url
    if url is None:
        raise ValidationError("budget.backend is redis but no redis.url is configured")

    async def ping() -> float:
        budget = RedisBudget.from_url(url.get_secret_value())
        try:
            started = asyncio.get_running_loop().time()
            await asyncio.wait_for(budget.ping(), PROBE_SECONDS)
            return (asyncio.get_running_loop().time() - started) * 1000
        finally:
            await budget.close()

    try:
        return asyncio.run(ping())
    except CaracalError:
        raise
    except Exception as exc:
        raise StoreUnavailableError(f"Redis is unavailable: {describe_error(exc)}") from None


# --------------------------------------------------------------------------- bus


def kafka_brokers(state: CliState) -> int:
    """How many Kafka brokers answer (the distributed bus)."""
    from caracal_ops import kafka_admin

    return len(kafka_admin.list_brokers(state.config.kafka))


@dataclass(frozen=True, slots=True)
class GroupLag:
    group: str
    topic: str
    lag: int
    capped: bool = False  # at least ``lag`` (the count stopped at LAG_COUNT_CAP)


#: Consumer groups of Caracal's daemons, by the module that defines each (those not installed are skipped).
_GROUP_MODULES = (
    "caracald.consumers.ledger_writer",
    "caracald.consumers.metrics_aggregator",
    "caracald.consumers.audit_logger",
)


def _known_groups() -> list[str]:
    groups = []
    for name in _GROUP_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        group = getattr(module, "GROUP", None)
        if isinstance(group, str):
            groups.append(group)
    return groups


def consumer_lag(state: CliState) -> list[GroupLag]:
    """Records each consumer group has yet to read, per topic: from the event log table (embedded bus)
    or from Kafka's committed offsets and log ends."""
    if state.config.bus.kind == "kafka":
        from caracal_ops import kafka_admin

        lags: list[GroupLag] = []
        for group in _known_groups():
            try:
                partitions = kafka_admin.consumer_lag(state.config.kafka, group)
            except CaracalError as exc:
                if exc.reason == "not_found":
                    continue
                raise
            per_topic: dict[str, int] = {}
            for p in partitions:
                per_topic[p.topic] = per_topic.get(p.topic, 0) + p.lag
            lags.extend(GroupLag(group, topic, lag) for topic, lag in sorted(per_topic.items()))
        return lags
    with state.db.read() as conn:
        rows = conn.execute(
            """
            SELECT o.consumer_group, o.topic,
                   (SELECT count(*) FROM (SELECT 1 FROM event_log e
                                           WHERE e.topic = o.topic AND e.log_offset >= o.committed_offset
                                           LIMIT %s) pending) AS lag
              FROM consumer_offsets o
             ORDER BY o.consumer_group, o.topic
            """,
            (LAG_COUNT_CAP + 1,),
        ).fetchall()
    return [
        GroupLag(
            r["consumer_group"], r["topic"], min(int(r["lag"]), LAG_COUNT_CAP), int(r["lag"]) > LAG_COUNT_CAP
        )
        for r in rows
    ]


# --------------------------------------------------------------------------- dead letters


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    dlq_id: int
    consumer_group: str
    source_topic: str
    source_partition: int
    source_offset: int
    key: bytes | None
    payload: bytes
    headers: tuple[tuple[str, bytes], ...]
    error_type: str
    error_message: str
    retry_count: int
    failed_at: datetime
    event_id: uuid.UUID | None
    status: str


@dataclass(frozen=True, slots=True)
class DeadLetterStats:
    pending: int
    oldest_failed_at: datetime | None


def dead_letter_stats(state: CliState) -> DeadLetterStats:
    with state.db.read() as conn:
        stats = dlq_store.stats(conn)
    return DeadLetterStats(stats.pending, stats.oldest_failed_at)


def dead_letters(state: CliState, *, limit: int = 1000) -> list[DeadLetterView]:
    """Pending dead letters, oldest first."""
    with state.db.read() as conn:
        letters = dlq_store.list_letters(conn, limit=limit)
    return [
        DeadLetterView(
            dlq_id=d.dlq_id or 0,
            consumer_group=d.consumer_group,
            source_topic=d.source_topic,
            source_partition=d.source_partition,
            source_offset=d.source_offset,
            key=d.key,
            payload=d.payload,
            headers=d.headers,
            error_type=d.error_type,
            error_message=d.error_message,
            retry_count=d.retry_count,
            failed_at=d.failed_at,
            event_id=d.event_id,
            status=str(d.status),
        )
        for d in letters
    ]


# --------------------------------------------------------------------------- ledger integrity


@dataclass(frozen=True, slots=True)
class BatchView:
    batch_id: uuid.UUID
    first_seq: int
    last_seq: int
    event_count: int
    key_name: str
    key_id: str
    min_occurred_at: datetime
    max_occurred_at: datetime
    created_at: datetime
    root_hash: bytes
    verified_at: datetime | None
    verification_status: str | None  # "passed", "failed", or None (never verified)
    verification_problem: str | None


@dataclass(frozen=True, slots=True)
class SealingState:
    latest: BatchView | None
    batches: int
    pending_events: int
    oldest_pending: datetime | None


def _integrity() -> tuple[ModuleType, ModuleType, ModuleType, ModuleType]:
    what = "ledger integrity (Merkle batches)"
    return (
        optional_module("caracald.integrity.batches", what),
        optional_module("caracald.integrity.sealer", what),
        optional_module("caracald.integrity.verifier", what),
        optional_module("caracald.integrity.keys", what),
    )


def _batch_view(batch: Any) -> BatchView:
    return BatchView(
        batch_id=batch.batch_id,
        first_seq=batch.first_seq,
        last_seq=batch.last_seq,
        event_count=batch.event_count,
        key_name=batch.key_name,
        key_id=batch.key_id,
        min_occurred_at=batch.min_occurred_at,
        max_occurred_at=batch.max_occurred_at,
        created_at=batch.created_at,
        root_hash=bytes(batch.root_hash),
        verified_at=batch.verified_at,
        verification_status=batch.verification_status,
        verification_problem=batch.verification_problem,
    )


def _no_integrity_schema(exc: psycopg.Error) -> NotAvailableError:
    return NotAvailableError(f"ledger integrity is not available in this database: {describe_error(exc)}")


def sealing_state(state: CliState) -> SealingState:
    batches, sealer, _verifier, _keys = _integrity()
    try:
        with state.db.read() as conn:
            latest = batches.latest(conn)
            count = batches.count(conn)
            pending, oldest = sealer.pending_count(conn)
    except psycopg.errors.UndefinedTable as exc:
        raise _no_integrity_schema(exc) from None
    return SealingState(None if latest is None else _batch_view(latest), count, pending, oldest)


def recent_batches(state: CliState, limit: int = 200) -> list[BatchView]:
    """The latest sealed batches, newest first."""
    batches, _sealer, _verifier, _keys = _integrity()
    try:
        with state.db.read() as conn:
            found = batches.recent(conn, limit)
    except psycopg.errors.UndefinedTable as exc:
        raise _no_integrity_schema(exc) from None
    return [_batch_view(b) for b in reversed(found)]


def key_dir(state: CliState) -> Path:
    config = state.config
    return config.integrity.resolved_key_dir(embedded=config.embedded_mode, data_dir=config.embedded.data_dir)


@dataclass(frozen=True, slots=True)
class SigningKeyView:
    key_dir: Path
    active: str | None  # the active key's name, None when the folder has none
    trusted: int  # public keys verification trusts


def signing_key(state: CliState) -> SigningKeyView:
    _batches, _sealer, _verifier, keys = _integrity()
    folder = key_dir(state)
    return SigningKeyView(folder, keys.active_name(folder), len(keys.trusted_keys(folder)))


@dataclass(frozen=True, slots=True)
class Verification:
    """The outcome of verifying a batch or a time range, as ``caracal merkle verify-*`` reports it."""

    scope: str  # "batch" or "range"
    ok: bool
    batches_checked: int
    events_checked: int
    first_batch: uuid.UUID | None
    last_batch: uuid.UUID | None
    merkle_root: bytes | None
    signatures_valid: bool
    unsealed_events: int
    problems: int
    first_bad_batch: uuid.UUID | None
    first_bad_event: str | None
    problem: str | None
    seconds: float


def _verification(report: Any) -> Verification:
    first = report.first_problem
    count = report.batch_event_count if report.scope == "batch" else report.events_checked
    return Verification(
        scope=report.scope,
        ok=report.ok,
        batches_checked=report.batches_checked,
        events_checked=int(count or 0),
        first_batch=report.first_batch,
        last_batch=report.last_batch,
        merkle_root=report.merkle_root,
        signatures_valid=report.signatures_valid,
        unsealed_events=report.unsealed_events,
        problems=len(report.problems),
        first_bad_batch=first.batch_id if first else None,
        first_bad_event=first.event_text() if first else None,
        problem=first.message if first else None,
        seconds=report.seconds,
    )


def _trusted(state: CliState, keys: ModuleType) -> list[Any]:
    folder = key_dir(state)
    found: list[Any] = keys.trusted_keys(folder)
    if not found:
        raise ValidationError(f"no public keys in {folder} to verify with: set integrity.key_dir")
    return found


def _record(state: CliState, batches: ModuleType, report: Any) -> None:
    """Note each checked batch's outcome, as the CLI does (best effort: a read-only role cannot)."""
    if not report.outcomes:
        return
    outcomes = [(bid, p is None, p.message if p else None) for bid, p in report.outcomes.items()]
    try:
        with state.db.transaction() as conn:
            batches.record_verification(conn, outcomes, datetime.now(UTC))
    except psycopg.Error:
        pass


def verify_batch(state: CliState, batch_id: uuid.UUID) -> Verification:
    batches, _sealer, verifier, keys = _integrity()
    trusted = _trusted(state, keys)
    with state.db.read() as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        report = verifier.verify_batch(conn, batch_id, trusted)
    _record(state, batches, report)
    return _verification(report)


def verify_range(state: CliState, start: datetime, end: datetime) -> Verification:
    batches, _sealer, verifier, keys = _integrity()
    trusted = _trusted(state, keys)
    grace = timedelta(seconds=2 * state.config.integrity.batch_max_age_seconds + 300)
    with state.db.read() as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        report = verifier.verify_range(conn, start, end, trusted, unsealed_grace=grace)
    _record(state, batches, report)
    return _verification(report)
