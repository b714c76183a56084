"""The metrics aggregator: spend aggregates in Redis for dashboards, and Prometheus counters.

Group ``metrics-aggregator-group`` on ``caracal.metering.events`` (Kafka or the event log), through
:class:`~caracald.consumers.runner.ConsumerRunner`. Every metering event adds to six Redis hashes, by UTC hour
and UTC day of the event's ``occurred_at``, for its agent, its model, and everything::

    {ns}:agg:agent:<agent id>:hour:<YYYYMMDDHH>     {ns}:agg:agent:<agent id>:day:<YYYYMMDD>
    {ns}:agg:model:<model>:hour:<YYYYMMDDHH>        {ns}:agg:model:<model>:day:<YYYYMMDD>
    {ns}:agg:all:hour:<YYYYMMDDHH>                  {ns}:agg:all:day:<YYYYMMDD>

with the fields

    spend:<CUR>          charged spend (settlements, expiries, adjustments) as an integer at the
                         currency's ledger scale (minor unit plus six digits: 1 = 0.00000001 USD), added
                         with HINCRBY: exact, never a float (:func:`read` turns it back into Money);
    events:<kind>        events of each kind (reservation, settlement, expiry, adjustment, denial);
    requests             requests seen (a reservation, or a denial: every request has exactly one);
    input_tokens, output_tokens, cached_input_tokens   metered on settlements.

Hour hashes expire ``hour_ttl`` after their last update (14 days by default), day hashes ``day_ttl`` (400
days). A model-less event counts under the model ``-``.

**Idempotent by event id.** One Lua script per batch records each event id in the set
``{ns}:agg:seen:<YYYYMMDDHH>`` (the hour the event occurred) and adds the event only when the id was not in
it, atomically; a set expires ``dedup_ttl`` after the last id was added to it (8 days by default: longer
than the topics' 7-day retention, so a redelivery or a replay of anything still on the bus counts nothing,
however old the events are). All keys share the hash tag ``{ns}``, so a Redis Cluster accepts the script
(every key is declared in KEYS).

**Prometheus** (on the daemon's ``/metrics``), for the events this process applied:
``caracal_agent_spend_ledger_units_total{agent_id,currency}`` and
``caracal_model_spend_ledger_units_total{model,currency}`` (charged spend in ledger units: integers, exact
up to 2**53 per series), ``caracal_agent_requests_total{agent_id}`` and
``caracal_metered_events_total{kind}``.

Without Redis configured the aggregator keeps the Prometheus counters only (a warning says so at start).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Literal

from prometheus_client import Counter
from redis import Redis
from redis import exceptions as redis_errors

from caracald.bus.base import BatchConsumer, BusError, Record, RecordProducer
from caracald.consumers.ledger_writer import Failure
from caracald.consumers.runner import Applied, ConsumerRunner, DeadLetterStore
from caracald.core import events as metering
from caracald.core.events import DLQ_TOPIC, METERING_TOPIC, EventDecodeError, MeteringEvent
from caracald.core.ledger import CHARGED_EVENT_TYPES, LedgerEventType
from caracald.core.money import Money, ledger_scale

GROUP: Final = "metrics-aggregator-group"
NO_MODEL: Final = "-"
#: Largest amount of one event, in ledger units: far from HINCRBY's 64-bit limit even after many additions.
MAX_EVENT_UNITS: Final = 2**53

Scope = Literal["agent", "model", "all"]
Granularity = Literal["hour", "day"]

AGENT_SPEND = Counter(
    "caracal_agent_spend_ledger_units",
    "Charged spend per agent, in ledger units of its currency (the minor unit / 10**6: 1 = 0.00000001 USD).",
    ["agent_id", "currency"],
)
MODEL_SPEND = Counter(
    "caracal_model_spend_ledger_units",
    "Charged spend per model, in ledger units of its currency (the minor unit / 10**6).",
    ["model", "currency"],
)
AGENT_REQUESTS = Counter("caracal_agent_requests", "Requests per agent (admitted or denied).", ["agent_id"])
METERED_EVENTS = Counter("caracal_metered_events", "Metering events aggregated, by kind.", ["kind"])

# KEYS: every key the batch touches. ARGV[1]: the number of events, then per event:
#   event id, index of its seen set in KEYS, the set's TTL in seconds, the number of target hashes,
#   then per target: index in KEYS, its TTL in seconds, the number of fields, then field/increment pairs.
# Returns one flag per event: 1 applied now, 0 seen before.
_SCRIPT: Final = """
local n = tonumber(ARGV[1])
local pos = 2
local applied = {}
for e = 1, n do
    local id = ARGV[pos]
    local seen = KEYS[tonumber(ARGV[pos + 1])]
    local seen_ttl = ARGV[pos + 2]
    local targets = tonumber(ARGV[pos + 3])
    pos = pos + 4
    local new = redis.call('SADD', seen, id)
    if new == 1 then
        redis.call('EXPIRE', seen, seen_ttl)
    end
    for t = 1, targets do
        local key = KEYS[tonumber(ARGV[pos])]
        local ttl = ARGV[pos + 1]
        local fields = tonumber(ARGV[pos + 2])
        pos = pos + 3
        if new == 1 then
            for f = 0, fields - 1 do
                redis.call('HINCRBY', key, ARGV[pos + 2 * f], ARGV[pos + 2 * f + 1])
            end
            redis.call('EXPIRE', key, ttl)
        end
        pos = pos + 2 * fields
    end
    applied[e] = new
end
return applied
"""


def _hour(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y%m%d%H")


def _day(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y%m%d")


def key(namespace: str, scope: Scope, subject: str | None, granularity: Granularity, at: datetime) -> str:
    """The hash of ``scope`` (``subject`` is the agent id or the model; None for ``all``) for the UTC hour or
    day holding ``at``."""
    bucket = _hour(at) if granularity == "hour" else _day(at)
    middle = "all" if scope == "all" else f"{scope}:{subject}"
    return f"{{{namespace}}}:agg:{middle}:{granularity}:{bucket}"


def seen_key(namespace: str, at: datetime) -> str:
    return f"{{{namespace}}}:agg:seen:{_hour(at)}"


def _key_text(value: object) -> bool:
    """Whether ``value`` can name a Redis key: a string that is valid Unicode (no lone surrogate)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def units(money: Money) -> int:
    """``money`` as an integer at its currency's ledger scale (exact: Money is held at that scale)."""
    return int(money.amount.scaleb(ledger_scale(money.currency)))


def fields_of(event: MeteringEvent) -> dict[str, int]:
    """What one event adds to each of its hashes."""
    added: dict[str, int] = {f"events:{event.kind}": 1}
    if event.kind in CHARGED_EVENT_TYPES and not event.cost.is_zero():
        added[f"spend:{event.cost.currency}"] = units(event.cost)
    if event.kind in (LedgerEventType.RESERVATION, LedgerEventType.DENIAL):
        added["requests"] = 1
    if event.kind is LedgerEventType.SETTLEMENT:
        for name in ("input_tokens", "output_tokens", "cached_input_tokens"):
            value = getattr(event, name)
            if value:
                added[name] = int(value)
    return added


@dataclass(frozen=True, slots=True)
class Aggregate:
    """One hash read back: spend per currency as Money, and the counts."""

    spend: dict[str, Money] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0


def read(
    client: Redis,
    scope: Scope,
    subject: str | None,
    granularity: Granularity,
    at: datetime,
    *,
    namespace: str = "caracal",
) -> Aggregate:
    """The aggregate of ``scope`` for the UTC hour or day holding ``at`` (empty when there is none)."""
    raw: dict[bytes | str, bytes | str] = client.hgetall(key(namespace, scope, subject, granularity, at))
    spend: dict[str, Money] = {}
    counts: dict[str, int] = {}
    numbers: dict[str, int] = {}
    for name_raw, value_raw in raw.items():
        name = name_raw.decode() if isinstance(name_raw, bytes) else name_raw
        value = int(value_raw)
        if name.startswith("spend:"):
            currency = name.removeprefix("spend:")
            spend[currency] = Money(Decimal(value).scaleb(-ledger_scale(currency)), currency)
        elif name.startswith("events:"):
            counts[name.removeprefix("events:")] = value
        else:
            numbers[name] = value
    return Aggregate(
        spend,
        counts,
        numbers.get("requests", 0),
        numbers.get("input_tokens", 0),
        numbers.get("output_tokens", 0),
        numbers.get("cached_input_tokens", 0),
    )


class RedisAggregates:
    """Applies batches of metering events to the Redis aggregates (see the module doc)."""

    def __init__(
        self,
        client: Redis | None,
        *,
        namespace: str = "caracal",
        hour_ttl: timedelta = timedelta(days=14),
        day_ttl: timedelta = timedelta(days=400),
        dedup_ttl: timedelta = timedelta(days=8),
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.hour_ttl = int(hour_ttl.total_seconds())
        self.day_ttl = int(day_ttl.total_seconds())
        self.dedup_ttl = int(dedup_ttl.total_seconds())
        self._script = client.register_script(_SCRIPT) if client is not None else None

    def decode(self, record: Record) -> MeteringEvent:
        event = metering.decode(record.value)
        if event.model is not None and not _key_text(event.model):
            raise EventDecodeError("malformed metering event: model is not a string of valid Unicode")
        if abs(units(event.cost)) >= MAX_EVENT_UNITS:
            raise EventDecodeError(f"malformed metering event: cost {event.cost} is out of range")
        for name in ("input_tokens", "output_tokens", "cached_input_tokens"):
            value = getattr(event, name)
            if value is not None and (type(value) is not int or not 0 <= value < MAX_EVENT_UNITS):
                raise EventDecodeError(f"malformed metering event: {name} is not a count")
        return event

    def _targets(self, event: MeteringEvent) -> list[tuple[str, int]]:
        at = event.occurred_at
        agent = str(event.agent_id)
        model = event.model or NO_MODEL
        return [
            (key(self.namespace, "agent", agent, "hour", at), self.hour_ttl),
            (key(self.namespace, "agent", agent, "day", at), self.day_ttl),
            (key(self.namespace, "model", model, "hour", at), self.hour_ttl),
            (key(self.namespace, "model", model, "day", at), self.day_ttl),
            (key(self.namespace, "all", None, "hour", at), self.hour_ttl),
            (key(self.namespace, "all", None, "day", at), self.day_ttl),
        ]

    def apply(self, items: Sequence[tuple[Record, MeteringEvent]]) -> Applied:
        if not items:
            return Applied()
        if self._script is None:  # no Redis: Prometheus only, without deduplication
            for _, event in items:
                self._count(event)
            return Applied(len(items))
        keys: dict[str, int] = {}

        def index(name: str) -> int:
            found = keys.get(name)
            if found is None:
                found = keys[name] = len(keys) + 1  # Lua indexes from 1
            return found

        args: list[str | int] = [len(items)]
        for _, event in items:
            targets = self._targets(event)
            args += [str(event.event_id), index(seen_key(self.namespace, event.occurred_at)), self.dedup_ttl]
            args.append(len(targets))
            added = fields_of(event)
            for name, ttl in targets:
                args += [index(name), ttl, len(added)]
                for field_name, increment in added.items():
                    args += [field_name, increment]
        flags = self._script(keys=list(keys), args=args)
        applied = 0
        for (_, event), flag in zip(items, flags, strict=True):
            if int(flag) == 1:
                applied += 1
                self._count(event)
        return Applied(applied, len(items) - applied)

    def apply_one(self, record: Record, item: MeteringEvent) -> Applied:
        return self.apply([(record, item)])

    @staticmethod
    def _count(event: MeteringEvent) -> None:
        METERED_EVENTS.labels(str(event.kind)).inc()
        if event.kind in (LedgerEventType.RESERVATION, LedgerEventType.DENIAL):
            AGENT_REQUESTS.labels(str(event.agent_id)).inc()
        if event.kind in CHARGED_EVENT_TYPES and not event.cost.is_zero():
            amount = units(event.cost)
            if amount > 0:  # a counter only grows; a negative adjustment shows in Redis only
                AGENT_SPEND.labels(str(event.agent_id), event.cost.currency).inc(amount)
                MODEL_SPEND.labels(event.model or NO_MODEL, event.cost.currency).inc(amount)

    def classify(self, exc: BaseException) -> Failure:
        if isinstance(exc, ValueError | TypeError | ArithmeticError | RecursionError):
            return Failure.PERMANENT  # raised here, before Redis was asked: the event is unusable
        if isinstance(exc, redis_errors.ResponseError) and not isinstance(
            exc, redis_errors.NoScriptError | redis_errors.BusyLoadingError | redis_errors.ReadOnlyError
        ):
            text = str(exc)
            if text.startswith("WRONGTYPE") or "overflow" in text or "not an integer" in text:
                return Failure.PERMANENT  # some key or value this event touches is unusable
        return Failure.OUTAGE

    def check(self) -> None:
        if self.client is not None:
            self.client.ping()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


MetricsAggregator = ConsumerRunner[MeteringEvent]


def redis_client(url: str, *, timeout: float = 5.0) -> Redis:
    return Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30
    )


def build(
    bus: str,
    database_url: str,
    redis_url: str | None,
    *,
    kafka_config: dict[str, Any] | None = None,
    topic: str = METERING_TOPIC,
    group: str = GROUP,
    dlq_topic: str = DLQ_TOPIC,
    namespace: str = "caracal",
    connect_timeout: int = 5,
    **runner_options: Any,
) -> MetricsAggregator:
    """An aggregator on the ``kafka`` or ``postgres`` (event log) bus; dead letters go to ``database_url``.

    Without ``redis_url`` it keeps the Prometheus counters only (and cannot tell a replayed event).
    """
    consumer: BatchConsumer
    producer: RecordProducer
    if bus == "kafka":
        from caracald.bus.kafka import KafkaBatchConsumer, KafkaProducer

        if not kafka_config:
            raise BusError("the Kafka bus needs kafka.bootstrap_servers")
        consumer = KafkaBatchConsumer(kafka_config, group, [topic])
        producer = KafkaProducer(kafka_config)
    elif bus == "postgres":
        from caracald.bus.pg_log import PgLogConsumer, PgLogProducer

        consumer = PgLogConsumer(database_url, group, [topic])
        producer = PgLogProducer(database_url, application_name="caracal-metrics-aggregator-dlq")
    else:
        raise ValueError(f"unknown bus {bus!r}")
    return ConsumerRunner(
        consumer,
        RedisAggregates(redis_client(redis_url) if redis_url else None, namespace=namespace),
        dead_letters=DeadLetterStore(
            database_url, connect_timeout=connect_timeout, application_name="caracal-metrics-aggregator-dlq"
        ),
        dlq_producer=producer,
        dlq_topic=dlq_topic,
        **runner_options,
    )
