"""One real round trip through each service the harness starts (see tests/conftest.py)."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict

import psycopg
import pytest
import redis
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from tests.harness.kafka import KafkaService
from tests.harness.postgres import PostgresService
from tests.harness.redis_server import RedisService

pytestmark = pytest.mark.integration

# Spend from a budget only when it covers the amount; answers {spent?, balance after}.
SPEND_SCRIPT = """
local balance = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount = tonumber(ARGV[1])
if balance >= amount then
  return {1, redis.call('DECRBY', KEYS[1], amount)}
end
return {0, balance}
"""


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- Redis


def test_redis_set_get_and_lua(redis_service: RedisService) -> None:
    client = redis.Redis.from_url(redis_service.url)
    try:
        key = _unique("budget")
        assert client.set(key, 100)
        assert client.get(key) == b"100"

        assert client.eval(SPEND_SCRIPT, 1, key, 30) == [1, 70]
        spend = client.register_script(SPEND_SCRIPT)  # EVALSHA, falling back to EVAL
        assert spend(keys=[key], args=[50]) == [1, 20]
        assert spend(keys=[key], args=[21]) == [0, 20]
        assert client.get(key) == b"20"
    finally:
        client.close()


def test_redis_restart_keeps_port(redis_service: RedisService) -> None:
    if not redis_service.managed:
        pytest.skip("CARACAL_TEST_REDIS_URL: an external Redis cannot be restarted")
    client = redis.Redis.from_url(redis_service.url, retry_on_timeout=False)
    try:
        key = _unique("volatile")
        client.set(key, "x")
        port = redis_service.port
        redis_service.restart()
        assert redis_service.port == port
        assert redis_service.is_running
        # No persistence: a restart loses everything.
        assert client.get(key) is None
    finally:
        client.close()


# --------------------------------------------------------------------------- PostgreSQL


def test_postgres_query_and_databases(postgres_service: PostgresService) -> None:
    with psycopg.connect(postgres_service.uri) as conn:
        assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
        version = conn.execute("SHOW server_version_num").fetchone()
        assert version is not None
        assert int(version[0]) >= 130000

    template = _unique("tpl")
    copy = _unique("db")
    uri = postgres_service.create_database(template)
    try:
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("CREATE TABLE ledger (id bigint PRIMARY KEY, amount numeric NOT NULL)")
            conn.execute("INSERT INTO ledger VALUES (1, 9.99)")

        copy_uri = postgres_service.create_database(copy, template=template)
        assert copy_uri == postgres_service.admin_uri(copy)
        holder = psycopg.connect(copy_uri, autocommit=True)
        try:
            row = holder.execute("SELECT amount FROM ledger WHERE id = 1").fetchone()
            assert row is not None
            assert str(row[0]) == "9.99"
            # FORCE ends the open connection instead of failing.
            postgres_service.drop_database(copy)
        finally:
            holder.close()
    finally:
        postgres_service.drop_database(copy)
        postgres_service.drop_database(template)

    with psycopg.connect(postgres_service.uri) as conn:
        names = {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}
    assert template not in names
    assert copy not in names


# --------------------------------------------------------------------------- Kafka


Headers = list[tuple[str, str | bytes | None]]
Record = tuple[bytes, bytes, Headers]


def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    futures[topic].result(timeout=30)
    metadata = admin.list_topics(topic=topic, timeout=10)
    assert len(metadata.topics[topic].partitions) == partitions


def _produce(bootstrap: str, topic: str, records: list[Record]) -> list[Message]:
    producer = Producer(
        {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5}
    )
    delivered: list[Message] = []
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err)
        else:
            delivered.append(msg)

    for key, value, headers in records:
        producer.produce(topic, key=key, value=value, headers=headers, on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert errors == []
    return delivered


def _consume(
    bootstrap: str, topic: str, group: str, expected: int, timeout: float = 30.0
) -> tuple[Consumer, list[Message]]:
    """Consume ``expected`` messages with a fresh group, committing by hand after each batch."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    received: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(received) < expected and time.monotonic() < deadline:
        batch = consumer.consume(num_messages=expected, timeout=0.5)
        for msg in batch:
            assert msg.error() is None, msg.error()
            received.append(msg)
        if batch:
            consumer.commit(asynchronous=False)
    return consumer, received


def _partition(msg: Message) -> int:
    partition = msg.partition()
    assert partition is not None
    return partition


def _key(msg: Message) -> bytes:
    key = msg.key()
    assert isinstance(key, bytes)
    return key


def test_kafka_produce_consume_commit(kafka_service: KafkaService) -> None:
    bootstrap = kafka_service.bootstrap_servers
    topic = _unique("roundtrip")
    _create_topic(bootstrap, topic, 3)

    records: list[Record] = [
        (f"agent-{i % 4}".encode(), f"charge-{i}".encode(), [("seq", str(i).encode()), ("kind", b"charge")])
        for i in range(10)
    ]
    delivered = _produce(bootstrap, topic, records)
    assert len(delivered) == 10
    partition_of_key: dict[bytes, int] = {}
    for msg in delivered:
        assert partition_of_key.setdefault(_key(msg), _partition(msg)) == _partition(msg)

    consumer, received = _consume(bootstrap, topic, _unique("group"), expected=10)
    try:
        assert len(received) == 10
        by_value = {msg.value(): msg for msg in received}
        for key, value, headers in records:
            msg = by_value[value]
            assert msg.key() == key
            assert msg.headers() == headers
            assert _partition(msg) == partition_of_key[key]

        # One key, one partition: its messages come back in the order they were produced.
        seqs_by_key: dict[bytes, list[int]] = defaultdict(list)
        for msg in received:
            seq = dict(msg.headers() or [])["seq"]
            assert isinstance(seq, bytes)
            seqs_by_key[_key(msg)].append(int(seq))
        for key, seqs in seqs_by_key.items():
            assert seqs == sorted(seqs), key
            assert len(seqs) == sum(1 for k, _, _ in records if k == key)

        next_offset: dict[int, int] = defaultdict(int)
        for msg in received:
            offset = msg.offset()
            assert offset is not None
            next_offset[_partition(msg)] = max(next_offset[_partition(msg)], offset + 1)
        committed = consumer.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
        assert sorted(tp.partition for tp in committed) == [0, 1, 2]
        for tp in committed:
            assert tp.error is None
            if next_offset[tp.partition]:
                assert tp.offset == next_offset[tp.partition], tp
            else:
                assert tp.offset < 0, tp  # nothing consumed there, nothing committed
        assert sum(next_offset.values()) == 10
    finally:
        consumer.close()


def test_kafka_kill_and_restart_keeps_data(kafka_service: KafkaService) -> None:
    if not kafka_service.managed:
        pytest.skip("CARACAL_TEST_KAFKA_BOOTSTRAP: an external broker cannot be restarted")
    bootstrap = kafka_service.bootstrap_servers
    topic = _unique("durable")
    _create_topic(bootstrap, topic, 1)
    _produce(bootstrap, topic, [(b"k", b"before", [])])

    kafka_service.restart(kill=True)  # SIGKILL, then start on the same ports and log folder
    assert kafka_service.bootstrap_servers == bootstrap
    assert kafka_service.is_running

    _produce(bootstrap, topic, [(b"k", b"after", [])])
    consumer, received = _consume(bootstrap, topic, _unique("group"), expected=2)
    consumer.close()
    assert [msg.value() for msg in received] == [b"before", b"after"]
