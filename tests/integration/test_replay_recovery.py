"""The runbook's "Event Replay Recovery", end to end on the local platform, with Kafka and PostgreSQL.

A real ``caracald ledger-writer`` (started and stopped by ``caracal services``) writes metering events from
Kafka into the ledger and seals them with a signing key; a snapshot is taken part-way. Then the database is
reset and the procedure is run command by command, as the runbook writes it. Afterwards the ledger holds
exactly the events it held before, with the same amounts and totals, its batches verify, and a second
replay changes nothing. The other components are small stand-in daemons (``platform.commands``): the
gateway, aggregator and audit logger have nothing to do here but be started and stopped.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from caracald.bus.kafka import KafkaProducer
from caracald.core.events import MeteringEvent
from tests.clitools import block
from tests.harness.kafka import KafkaService
from tests.integration.conftest import Cli
from tests.integration.pipeline import (
    dead_letters,
    make_events,
    rows,
    send_events,
    totals,
    unsealed_count,
    wait_for,
)
from tests.integration.test_services_local import DAEMON

pytestmark = pytest.mark.integration

GROUP = "ledger-writer-group"
STAND_INS = ("gateway", "metrics-aggregator", "audit-logger")


@pytest.fixture
def ops(tmp_path: Path, database_url: str, kafka_service: KafkaService) -> Iterator[Cli]:
    """The CLI on the local platform with the Kafka bus; whatever it started is stopped at the end."""
    script = tmp_path / "daemon.py"
    script.write_text(DAEMON)
    config = tmp_path / "caracal.yaml"
    config.write_text(
        "\n".join(
            [
                "bus:",
                "  kind: kafka",
                "kafka:",
                f"  bootstrap_servers: {json.dumps(kafka_service.bootstrap_servers)}",
                "integrity:",
                f"  key_dir: {json.dumps(str(tmp_path / 'keys'))}",
                "  batch_size: 64",
                "  batch_max_age_seconds: 1",
                "backup:",
                f"  dir: {json.dumps(str(tmp_path / 'backups'))}",
                "platform:",
                "  kind: local",
                "  stop_timeout_seconds: 30",
                "  commands:",
                *[
                    f"    {name}: [{json.dumps(sys.executable)}, {json.dumps(str(script))}, {name}, normal]"
                    for name in STAND_INS
                ],
                "embedded:",
                f"  data_dir: {json.dumps(str(tmp_path / 'data'))}",
            ]
        )
        + "\n"
    )
    cli = Cli(database_url, env={"CARACAL_CONFIG": str(config)})
    yield cli
    cli("services", "down")


def live_events(agents: list[uuid.UUID], count: int, *, start: int) -> list[MeteringEvent]:
    """Reservations and settlements that occur now (as the gateway's do): their Kafka time is their time."""
    at = datetime.now(UTC)
    return [
        dataclasses.replace(event, occurred_at=at + timedelta(microseconds=n))
        for n, event in enumerate(make_events(agents, count, start=start))
    ]


def produce(bootstrap: str, events: list[MeteringEvent]) -> None:
    producer = KafkaProducer({"bootstrap.servers": bootstrap})
    try:
        send_events(producer, events)
    finally:
        producer.close()


def ledger(url: str) -> list[dict[str, Any]]:
    """Every ledger event by its id (the idempotency key), with what it charged; not the row numbers."""
    return rows(
        url,
        "SELECT idempotency_key, event_type, agent_id, request_id, occurred_at, model, input_tokens,"
        " output_tokens, cost, currency FROM ledger_events ORDER BY idempotency_key",
    )


def unsealed(url: str) -> int:
    return unsealed_count(url)


def batches(url: str) -> int:
    return int(rows(url, "SELECT count(*) AS n FROM merkle_batches")[0]["n"])


def wait_written_and_sealed(url: str, count: int) -> None:
    wait_for(lambda: len(ledger(url)) >= count, timeout=120, what=f"{count} events in the ledger")
    assert len(ledger(url)) == count
    wait_for(lambda: unsealed(url) == 0, timeout=60, what="every event sealed")


def spending(ops: Cli, agents: list[str], since: datetime, until: datetime) -> dict[str, Any]:
    """What ``caracal ledger query`` reports per agent: over the whole run, and for today's window."""
    out: dict[str, Any] = {}
    for agent in agents:
        ranged = ops.ok(
            "ledger", "query", "--agent-id", agent, "--start-time", since.isoformat(),
            "--end-time", until.isoformat(), "-o", "json",
        )  # fmt: skip
        daily = ops.ok("ledger", "query", "--agent-id", agent, "--time-window", "daily", "-o", "json")
        out[agent] = (json.loads(ranged.stdout), json.loads(daily.stdout))
    return out


def states(ops: Cli) -> dict[str, str]:
    data = json.loads(ops.ok("services", "status", "-o", "json").stdout)
    return {c["component"]: c["state"] for c in data["components"]}


def verify_range(ops: Cli, since: datetime) -> dict[str, str]:
    out = ops.ok("merkle", "verify-range", "--start-time", since.isoformat(), "--end-time", "now")
    return block(out.stdout)


def replay_done(ops: Cli) -> bool:
    (group,) = json.loads(ops.ok("replay", "status", "--consumer-group", GROUP, "-o", "json").stdout)
    return bool(group["lag"] == 0 and group["progress"] == 1)


def test_event_replay_recovery_after_a_database_reset(
    ops: Cli, database_url: str, kafka_service: KafkaService
) -> None:
    bootstrap = kafka_service.bootstrap_servers
    ops.ok("kafka", "create-topics", "--partitions", "3", "--replication-factor", "1")
    ops.ok("merkle", "generate-key")
    agents = [
        json.loads(
            ops.ok(
                "agent",
                "create",
                "--name",
                f"agent-{n}-{uuid.uuid4().hex[:6]}",
                "--owner",
                "ops@example.com",
                "-o",
                "json",
            ).stdout
        )["agent_id"]
        for n in range(3)
    ]
    for agent in agents:
        ops.ok(
            "policy", "create", "--agent-id", agent, "--limit", "500.00", "--currency", "USD",
            "--time-window", "daily", "--window-type", "calendar", "--change-reason", "budget",
        )  # fmt: skip
    ids = [uuid.UUID(a) for a in agents]
    time.sleep(0.05)
    t = datetime.now(UTC)  # the replay point: before the first event

    # the pipeline at work: a real ledger writer, a snapshot part-way, more events after it
    up = ops.ok("services", "up", "--component", "ledger-writer")
    assert "ledger-writer started (pid " in up.stdout
    produce(bootstrap, live_events(ids, 300, start=0))
    wait_written_and_sealed(database_url, 300)
    snapshot_id = block(ops.ok("snapshot", "create").stdout)["Snapshot ID"]
    produce(bootstrap, live_events(ids, 200, start=300))
    wait_written_and_sealed(database_url, 500)
    assert verify_range(ops, t)["Integrity"] == "PASSED"

    until = datetime.now(UTC)
    before = ledger(database_url)
    before_totals = totals(database_url)
    before_spending = spending(ops, agents, t, until)
    assert len(before) == 500 and {r["agent_id"] for r in before} == set(ids)
    assert sum(r["cost"] for r in before) > 0 and len(before_totals) >= 3
    sealed_before = batches(database_url)
    assert sealed_before >= 500 // 64

    # -- the procedure, as the runbook writes it
    down = ops.ok("services", "down", "--component", "ledger-writer")
    assert "ledger-writer stopped" in down.stdout
    assert states(ops)["ledger-writer"] == "stopped"
    ops.ok("db", "reset", "--confirm")
    assert ledger(database_url) == [] and rows(database_url, "SELECT * FROM agents") == []

    plan = ops.ok("snapshot", "restore", "--snapshot-id", snapshot_id)
    assert "Dry run: nothing was changed." in plan.stdout and "Put back the snapshot's agents" in plan.stdout
    restored = ops.ok("snapshot", "restore", "--snapshot-id", snapshot_id, "--execute", "--yes")
    assert "put back 3 agents, 3 agent_credentials, 3 policies, 3 policy_versions" in restored.stdout
    assert "1 merkle_keys" in restored.stdout
    assert "ledger empty up to the snapshot" in restored.stdout

    replay = ["replay", "start", "--from-timestamp", t.isoformat(), "--consumer-group", GROUP]
    shown = json.loads(ops.ok(*replay, "-o", "json").stdout)
    assert sum(p["events_to_replay"] for p in shown["partitions"]) == 500
    assert all((p["committed_offset"] or 0) == p["end_offset"] for p in shown["partitions"])  # None: unused
    moved = ops.ok(*replay, "--execute", "--yes")
    assert "Offsets moved" in moved.stdout
    (status,) = json.loads(ops.ok("replay", "status", "--consumer-group", GROUP, "-o", "json").stdout)
    assert status["lag"] == 500 and status["progress"] == 0

    ops.ok("services", "up", "--component", "ledger-writer")
    wait_for(lambda: replay_done(ops), timeout=120, what="the replay to finish")
    last = [line for line in ops.ok("replay", "status").stdout.splitlines() if line.startswith("Last replay")]
    assert last == [
        f"Last replay of {GROUP}: from {t.isoformat().replace('+00:00', 'Z')}, " + last[0].split(", ", 1)[1]
    ]
    assert last[0].endswith("by tester@example.com; replayed.")
    wait_written_and_sealed(database_url, 500)
    verified = verify_range(ops, t)
    assert verified["Integrity"] == "PASSED" and verified["Event Count"] == "500"

    everything = ops.ok("services", "up")
    assert "ledger-writer already running" in everything.stdout
    assert set(states(ops).values()) == {"running"}

    # the same events, the same amounts, the same totals; nothing dead-lettered
    assert ledger(database_url) == before
    assert totals(database_url) == before_totals
    assert spending(ops, agents, t, until) == before_spending
    assert dead_letters(database_url) == []
    sealed_after = batches(database_url)

    # replaying again changes nothing
    ops.ok("services", "down", "--component", "ledger-writer")
    ops.ok(*replay, "--execute", "--yes")
    ops.ok("services", "up", "--component", "ledger-writer")
    wait_for(lambda: replay_done(ops), timeout=120, what="the second replay to finish")
    assert ledger(database_url) == before
    assert totals(database_url) == before_totals
    assert spending(ops, agents, t, until) == before_spending
    assert batches(database_url) == sealed_after and unsealed(database_url) == 0
    assert verify_range(ops, t)["Integrity"] == "PASSED"
