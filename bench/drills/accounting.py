"""After a drill: was anything lost, duplicated, left open or overspent? Read from every place it is recorded.

The bus is the reference for what the gateways emitted: every metering event Kafka acknowledged (read back
from the topic, partition by partition) must be in the ledger exactly once, or in the dead letter table; every
call a gateway answered 200 must have its reservation and exactly one charge (a settlement, or an expiry when
the settlement never came) in the ledger; once the hold time to live has passed, no reservation may be left
without its charge, and Redis may hold no hold; the metrics aggregator's Redis aggregates must count each
event once; and the settled spend under every policy must stay within its limit.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from bench.drills.deployment import Deployment
from bench.drills.load import Reply
from caracald.consumers import metrics_aggregator
from caracald.consumers.metrics_aggregator import redis_client
from caracald.core.events import METERING_TOPIC, EventDecodeError, decode

CHARGES = ("settlement", "expiry")


@dataclass
class Accounting:
    """What one drill left behind, for its agents only."""

    bus_events: int = 0  # distinct metering events on the topic
    bus_redeliveries: int = 0  # the same event sent more than once (at least once: allowed)
    ledger_events: int = 0
    dead_letters: int = 0
    lost: list[str] = field(
        default_factory=list
    )  # events on the bus or answered calls missing from the ledger
    duplicated: list[str] = field(default_factory=list)  # more than one row, or two charges, for one effect
    open_holds_ledger: int = 0  # reservations without a charge
    open_holds_redis: int = 0  # holds Redis still counts
    aggregate_mismatches: list[str] = field(default_factory=list)
    admitted_calls: int = 0

    @property
    def clean(self) -> bool:
        return not (
            self.lost
            or self.duplicated
            or self.open_holds_ledger
            or self.open_holds_redis
            or self.aggregate_mismatches
        )


def bus_events(deployment: Deployment, agents: set[uuid.UUID]) -> Counter[uuid.UUID]:
    """Event id -> times it is on the metering topic, for events of ``agents``."""
    consumer = Consumer(
        {
            "bootstrap.servers": deployment.env.kafka.bootstrap_servers,
            "group.id": f"drills-audit-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    seen: Counter[uuid.UUID] = Counter()
    try:
        meta = consumer.list_topics(METERING_TOPIC, timeout=30).topics[METERING_TOPIC]
        ends = {}
        for partition in meta.partitions:
            _, high = consumer.get_watermark_offsets(TopicPartition(METERING_TOPIC, partition), timeout=30)
            if high > 0:
                ends[partition] = high
        consumer.assign([TopicPartition(METERING_TOPIC, p, OFFSET_BEGINNING) for p in ends])
        done: set[int] = set()
        while len(done) < len(ends):
            for message in consumer.consume(5000, timeout=5):
                if message.error() is not None:
                    if message.error().code() == KafkaError._PARTITION_EOF:
                        done.add(message.partition())
                    continue
                if message.offset() + 1 >= ends[message.partition()]:
                    done.add(message.partition())
                try:
                    event = decode(message.value())
                except EventDecodeError:
                    continue
                if event.agent_id in agents:
                    seen[event.event_id] += 1
    finally:
        consumer.close()
    return seen


def account(
    deployment: Deployment,
    agents: Iterable[uuid.UUID],
    replies: Sequence[Reply],
    *,
    expect_settled: bool = True,
) -> Accounting:
    agent_ids = set(agents)
    result = Accounting(admitted_calls=sum(r.admitted for r in replies))
    rows = deployment.rows(
        "SELECT idempotency_key, event_type, request_id, agent_id, cost, occurred_at FROM ledger_events"
        " WHERE agent_id = ANY(%s)",
        [list(agent_ids)],
    )
    result.ledger_events = len(rows)
    in_ledger = Counter(row["idempotency_key"] for row in rows)
    result.duplicated += [f"ledger row {key} x{n}" for key, n in in_ledger.items() if n > 1]
    on_bus = bus_events(deployment, agent_ids)
    dead = {
        row["event_id"]
        for row in deployment.rows("SELECT event_id FROM dlq_events WHERE event_id = ANY(%s)", [list(on_bus)])
    }
    result.dead_letters = len(dead)
    result.bus_events = len(on_bus)
    result.bus_redeliveries = sum(n - 1 for n in on_bus.values())
    result.lost += [
        f"event {event_id} on the bus, not in the ledger"
        for event_id in on_bus
        if event_id not in in_ledger and event_id not in dead
    ]

    by_request: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if row["request_id"] is not None:
            by_request[str(row["request_id"])].append(row["event_type"])
    for request, kinds in by_request.items():
        charges = sum(kinds.count(kind) for kind in CHARGES)
        if charges > 1:
            result.duplicated.append(f"request {request} charged {charges} times: {sorted(kinds)}")
        if "reservation" in kinds and charges == 0:
            result.open_holds_ledger += 1
    for reply in replies:
        if not reply.admitted:
            continue
        kinds = by_request.get(reply.request_id or "", [])
        if "reservation" not in kinds:
            result.lost.append(f"call {reply.request_id} answered 200, no reservation in the ledger")
        if expect_settled and not any(kind in kinds for kind in CHARGES):
            result.lost.append(f"call {reply.request_id} answered 200, never charged in the ledger")
    result.aggregate_mismatches = _aggregates(deployment, agent_ids, rows)
    return result


def _aggregates(deployment: Deployment, agents: set[uuid.UUID], rows: list[dict[str, object]]) -> list[str]:
    """The metrics aggregator's per-agent daily hashes against the ledger: each event counted once."""
    expected: dict[tuple[uuid.UUID, str], Counter[str]] = defaultdict(Counter)
    spend: dict[tuple[uuid.UUID, str], Decimal] = defaultdict(Decimal)
    days: dict[tuple[uuid.UUID, str], datetime] = {}
    for row in rows:
        at = row["occurred_at"]
        assert isinstance(at, datetime)
        slot = (row["agent_id"], at.strftime("%Y%m%d"))  # type: ignore[index]
        days[slot] = at  # type: ignore[index]
        expected[slot][str(row["event_type"])] += 1  # type: ignore[index]
        if row["event_type"] in ("settlement", "expiry", "adjustment"):
            spend[slot] += Decimal(str(row["cost"]))  # type: ignore[index]
    client = redis_client(deployment.env.redis.url)
    problems = []
    try:
        for slot, counts in expected.items():
            agent, _ = slot
            found = metrics_aggregator.read(client, "agent", str(agent), "day", days[slot])
            if dict(found.events) != dict(counts):
                problems.append(f"agent {agent}: aggregated {dict(found.events)}, ledger {dict(counts)}")
            money = found.spend.get("USD")
            if (money.amount if money else Decimal(0)) != spend[slot]:
                problems.append(f"agent {agent}: aggregated spend {money}, ledger {spend[slot]}")
    finally:
        client.close()
    return problems


def wait_drained(deployment: Deployment, agents: Iterable[uuid.UUID], timeout: float = 180) -> float:
    """Until the ledger holds every event of ``agents`` on the bus, all sealed; the seconds it took."""
    agent_ids = set(agents)
    began = time.monotonic()
    while True:
        wanted = set(bus_events(deployment, agent_ids))
        found = {
            row["idempotency_key"]
            for row in deployment.rows(
                "SELECT idempotency_key FROM ledger_events WHERE agent_id = ANY(%s)", [list(agent_ids)]
            )
        }
        unsealed = deployment.rows(
            "SELECT count(*) AS n FROM ledger_events"
            " WHERE seq IS NULL OR seq > COALESCE((SELECT tree_size FROM merkle_state), 0)"
        )[0]["n"]
        if wanted <= found and unsealed == 0:
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            return time.monotonic() - began
        time.sleep(1)
