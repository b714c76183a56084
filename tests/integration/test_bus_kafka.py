"""The distributed bus: the Kafka producer, batch consumer, topic administration and the spool fallback."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import ConfigResource

from caracald.bus.base import BusError, BusUnavailableError, ProducerSink, Record
from caracald.bus.kafka import (
    KafkaBatchConsumer,
    KafkaProducer,
    client_config,
    committed_offsets,
    create_topics,
    reset_offsets,
)
from caracald.bus.spool import Spool, SpoolingSink
from caracald.core.events import MeteringEvent, decode
from caracald.core.ledger import LedgerEventType
from caracald.core.money import Money
from caracald.runtime.config import KafkaConfig
from tests.harness.kafka import KafkaService

pytestmark = pytest.mark.integration


def unique(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:10]}"


@pytest.fixture
def config(kafka_service: KafkaService) -> dict[str, Any]:
    return client_config(KafkaConfig(bootstrap_servers=kafka_service.bootstrap_servers))


@pytest.fixture
def topic(config: dict[str, Any]) -> str:
    name = unique("test.metering")
    assert create_topics(config, [name], partitions=3, replication_factor=1) == [name]
    return name


@pytest.fixture
def producer(config: dict[str, Any]) -> Iterator[KafkaProducer]:
    p = KafkaProducer(config, delivery_timeout=30)
    yield p
    p.close()


def drain(c: KafkaBatchConsumer, expected: int, timeout: float = 30.0) -> list[Record]:
    got: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        got += c.poll_batch(1000, 0.5)
    return got


def event(n: int, agent: uuid.UUID) -> MeteringEvent:
    return MeteringEvent(
        kind=LedgerEventType.SETTLEMENT,
        request_id=uuid.UUID(int=n + 1),
        agent_id=agent,
        occurred_at=datetime(2025, 1, 1, tzinfo=UTC),
        cost=Money(Decimal("0.002"), "USD"),
        model="gpt-4o",
    )


def test_records_round_trip_and_a_group_resumes_after_its_commit(
    config: dict[str, Any], topic: str, producer: KafkaProducer
) -> None:
    futures = [
        producer.send(
            topic, f"v{i}".encode(), key=f"agent-{i % 4}".encode(), headers=[("n", str(i).encode())]
        )
        for i in range(40)
    ]
    futures.append(producer.send(topic, b"no key"))
    assert producer.flush(30) == 0
    for f in futures:
        f.result(0)

    group = unique("g")
    c = KafkaBatchConsumer(config, group, [topic])
    try:
        got = drain(c, 41)
        assert len(got) == 41
        by_value = {r.value: r for r in got}
        assert by_value[b"v7"].key == b"agent-3"
        assert by_value[b"v7"].headers == [("n", b"7")]
        assert by_value[b"no key"].key is None and by_value[b"no key"].headers == []
        assert all(r.timestamp is not None and r.timestamp.tzinfo is not None for r in got)
        # one agent, one partition, in order
        agent1 = [r for r in got if r.key == b"agent-1"]
        assert len({r.partition for r in agent1}) == 1
        assert [r.offset for r in agent1] == sorted(r.offset for r in agent1)
        half = [r for r in got if r.partition == got[0].partition]
        c.commit(got)
        assert sum(c.lag().values()) == 0
        committed = committed_offsets(config, group, topic)
        assert sum(committed.values()) == 41
        assert committed[half[0].partition] == half[-1].offset + 1
    finally:
        c.close()

    producer.send(topic, b"after", key=b"agent-1").result(30)
    again = KafkaBatchConsumer(config, group, [topic])
    try:
        assert [r.value for r in drain(again, 1)] == [b"after"]
    finally:
        again.close()


async def test_the_producer_sink_emits_metering_events(
    config: dict[str, Any], topic: str, producer: KafkaProducer
) -> None:
    sink = ProducerSink(producer, topic=topic, timeout=30)
    agent = uuid.uuid4()
    await asyncio.gather(*(sink.emit(event(n, agent)) for n in range(10)))
    c = KafkaBatchConsumer(config, unique("g"), [topic])
    try:
        got = drain(c, 10)
    finally:
        c.close()
    decoded = [decode(r.value) for r in got]
    assert [e.request_id.int - 1 for e in decoded] == list(range(10))  # one key: one partition, in order
    assert got[0].key == str(agent).encode()
    assert dict(got[0].headers)["caracal-event-id"] == str(decoded[0].event_id).encode()


def test_create_topics_is_idempotent_and_sets_retention(
    config: dict[str, Any], kafka_service: KafkaService
) -> None:
    names = [unique("a"), unique("b")]
    assert create_topics(config, names, partitions=2, replication_factor=1, retention_ms=3_600_000) == sorted(
        names
    )
    assert create_topics(config, names, partitions=2, replication_factor=1) == []
    admin = kafka_service.admin()
    resource = ConfigResource(ConfigResource.Type.TOPIC, names[0])
    described = admin.describe_configs([resource])[resource].result(timeout=30)
    assert described["retention.ms"].value == "3600000"
    assert len(admin.list_topics(names[0], timeout=10).topics[names[0]].partitions) == 2


def test_reset_offsets_replays_a_topic(config: dict[str, Any], topic: str, producer: KafkaProducer) -> None:
    for i in range(5):
        producer.send(topic, str(i).encode(), key=b"k")
    assert producer.flush(30) == 0
    group = unique("g")
    c = KafkaBatchConsumer(config, group, [topic])
    c.commit(drain(c, 5))
    c.close()
    reset_offsets(config, group, topic, 0)
    again = KafkaBatchConsumer(config, group, [topic])
    try:
        assert sorted(r.value for r in drain(again, 5)) == [b"0", b"1", b"2", b"3", b"4"]
    finally:
        again.close()


def test_a_missing_topic_is_an_error(config: dict[str, Any]) -> None:
    c = KafkaBatchConsumer(config, unique("g"), [unique("missing")])

    def poll_for_20_seconds() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            c.poll_batch(10, 0.5)

    try:
        with pytest.raises(BusError):
            poll_for_20_seconds()
    finally:
        c.close()


def test_an_unreachable_broker_fails_the_send_in_bounded_time() -> None:
    p = KafkaProducer({"bootstrap.servers": "127.0.0.1:1"}, delivery_timeout=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(BusUnavailableError):
            p.send("t", b"x").result(timeout=30)
        assert time.monotonic() - started < 10
    finally:
        p.close(timeout=1)


async def test_events_are_spooled_while_kafka_is_down_and_arrive_after(
    kafka_service: KafkaService, config: dict[str, Any], topic: str, tmp_path: Path
) -> None:
    if not kafka_service.managed:
        pytest.skip("an external Kafka cannot be killed")
    agent = uuid.uuid4()
    producer = KafkaProducer(config, delivery_timeout=60)
    sink = SpoolingSink(producer, Spool(tmp_path / "spool"), topic=topic, bus_timeout=2.0, retry_interval=0.5)
    try:
        await sink.emit(event(0, agent))
        assert not sink.spooling
        kafka_service.kill()
        try:
            for n in range(1, 30):
                await sink.emit(event(n, agent))  # durable on disk: returns without the broker
            assert sink.spooling
        finally:
            await asyncio.to_thread(kafka_service.start)
        await asyncio.wait_for(sink.wait_drained(), 60)
        assert not sink.spooling
        await sink.emit(event(30, agent))
    finally:
        sink.close()

    c = KafkaBatchConsumer(config, unique("g"), [topic])
    try:
        got = drain(c, 31, timeout=30)
        got += c.poll_batch(100, 1.0)  # a late duplicate, if any
    finally:
        c.close()
    numbers = [decode(r.value).request_id.int - 1 for r in got]
    assert set(numbers) == set(range(31))  # nothing lost; duplicates are harmless downstream
    first_seen = list(dict.fromkeys(numbers))
    assert first_seen[1:] == sorted(first_seen[1:])  # the spooled ones kept their order
