"""``caracal kafka`` against a real broker."""

from __future__ import annotations

import json
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition

from tests.clitools import block
from tests.harness.kafka import KafkaService
from tests.integration.conftest import Cli


def _cli(database_url: str, kafka: KafkaService) -> Cli:
    return Cli(database_url, env={"CARACAL_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers})


def test_topics_and_brokers(database_url: str, kafka_service: KafkaService) -> None:
    cli = _cli(database_url, kafka_service)
    prefix = f"t{uuid.uuid4().hex[:6]}"
    names = [f"{prefix}.metering", f"{prefix}.audit"]
    created = cli.ok(
        "kafka",
        "create-topics",
        "--partitions",
        "4",
        "--replication-factor",
        "1",
        "--retention-hours",
        "48",
        *[arg for n in names for arg in ("--topic", n)],
    )
    assert created.stdout.split("\n")[:2] == [f"{n}: created" for n in names]
    again = cli.ok("kafka", "create-topics", "--replication-factor", "1", "--topic", names[0])
    assert again.stdout.strip() == f"{names[0]}: exists"

    listed = json.loads(cli.ok("kafka", "list-topics", "-o", "json").stdout)
    assert set(names) <= set(listed)
    assert not any(t.startswith("__") for t in listed)

    described = cli.ok("kafka", "describe-topic", "--topic", names[0])
    fields = block(described.stdout)
    assert fields["Partitions"] == "4"
    assert fields["Replication Factor"] == "1"
    assert fields["retention.ms"] == str(48 * 3_600_000)

    brokers = json.loads(cli.ok("kafka", "list-brokers", "-o", "json").stdout)
    assert len(brokers) == 1
    assert brokers[0]["port"] == int(kafka_service.bootstrap_servers.rsplit(":", 1)[1])


def test_consumer_lag_per_partition(database_url: str, kafka_service: KafkaService) -> None:
    cli = _cli(database_url, kafka_service)
    topic = f"lag-{uuid.uuid4().hex[:8]}"
    group = f"group-{uuid.uuid4().hex[:8]}"
    kafka_service.create_topic(topic, num_partitions=2)
    producer = Producer({"bootstrap.servers": kafka_service.bootstrap_servers})
    for i in range(10):
        producer.produce(topic, value=b"x", partition=i % 2)
    producer.flush(10)
    consumer = Consumer(
        {"bootstrap.servers": kafka_service.bootstrap_servers, "group.id": group, "enable.auto.commit": False}
    )
    consumer.commit(offsets=[TopicPartition(topic, 0, 3), TopicPartition(topic, 1, 5)], asynchronous=False)
    consumer.close()

    data = json.loads(cli.ok("kafka", "consumer-lag", "--consumer-group", group, "-o", "json").stdout)
    assert data["total_lag"] == 2 + 0
    assert [
        (p["partition"], p["current_offset"], p["log_end_offset"], p["lag"]) for p in data["partitions"]
    ] == [(0, 3, 5, 2), (1, 5, 5, 0)]
    table = cli.ok("kafka", "consumer-lag", "--consumer-group", group)
    assert table.stdout.splitlines()[0].split() == [
        "GROUP",
        "TOPIC",
        "PARTITION",
        "CURRENT-OFFSET",
        "LOG-END-OFFSET",
        "LAG",
    ]


def test_errors_are_clear(database_url: str, kafka_service: KafkaService) -> None:
    cli = _cli(database_url, kafka_service)
    missing = cli("kafka", "describe-topic", "--topic", "no-such-topic")
    assert missing.exit_code == 1 and "does not exist" in missing.stderr
    unknown_group = cli("kafka", "consumer-lag", "--consumer-group", f"nobody-{uuid.uuid4().hex[:6]}")
    assert unknown_group.exit_code == 1
    unconfigured = Cli(database_url)("kafka", "list-topics")
    assert unconfigured.exit_code == 2 and "no Kafka configured" in unconfigured.stderr
    down = Cli(database_url, env={"CARACAL_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})("kafka", "list-brokers")
    assert down.exit_code == 3 and "Kafka is unavailable" in down.stderr
