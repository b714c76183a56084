"""``caracald ledger-writer | metrics-aggregator | audit-logger`` as processes: READY=1 on the notify socket
once consuming, WATCHDOG=1 from the loop, /healthz and /readyz on the health port, /metrics, and a clean
exit 0 on SIGTERM that finishes and commits the batch in hand."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from caracald.bus import pg_log
from caracald.bus.audit import AuditEmitter
from caracald.core.audit import AuditEntry, AuditEvent, AuditEventType
from caracald.core.events import AUDIT_TOPIC, METERING_TOPIC
from tests.harness.ports import free_port
from tests.harness.postgres import PostgresService
from tests.harness.redis_server import RedisService
from tests.integration.pipeline import (
    CONSUMERS,
    add_agents,
    daemon,
    daemon_env,
    event_log_committed,
    event_log_end,
    ledger_count,
    make_events,
    rows,
    send_events,
    stop_daemon,
    unsealed_count,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration


def get(url: str) -> tuple[int, dict[str, Any] | str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - http://127.0.0.1 only
            body = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


class NotifySocket:
    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.fields: list[str] = []

    def wait(self, wanted: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while wanted not in self.fields:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {wanted} within {timeout} s; got {self.fields}")
            with contextlib.suppress(TimeoutError):
                self.fields += self.sock.recv(65536).decode().split("\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path)
    yield sock
    sock.close()


def produce_everything(url: str, n: int = 200) -> None:
    events = make_events(add_agents(url, 2), n)
    producer = pg_log.PgLogProducer(url)
    try:
        send_events(producer, [*events, (b"k", b"not an event")])
    finally:
        producer.close()
    emitter = AuditEmitter(pg_log.PgLogProducer(url))
    try:
        for i in range(20):
            emitter.send(_audit_event(i))
        assert emitter.flush(30) == 0
        emitter.producer.send(AUDIT_TOPIC, b"{}").result(10)
    finally:
        emitter.close()


def _audit_event(i: int) -> AuditEvent:
    return AuditEvent.new(
        AuditEntry(
            datetime.now(UTC), "gateway", AuditEventType.OPS_PROCEDURE, f"test.daemon.{i}", details={"i": i}
        )
    )


@pytest.mark.parametrize("name", list(CONSUMERS))
def test_daemon_notifies_serves_health_and_stops_cleanly(
    name: str, tmp_path: Path, database_url: str, redis_service: RedisService, notify: NotifySocket
) -> None:
    group, topic = CONSUMERS[name]
    produce_everything(database_url)
    config = write_config(tmp_path / "caracal.yaml", database_url, redis={"url": redis_service.url})
    health, metrics = free_port(), free_port()
    env = daemon_env(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="1000000")
    log = tmp_path / "daemon.log"
    args = ["--health-port", str(health), "--metrics-port", str(metrics), "--listen-host", "127.0.0.1"]
    with daemon(name, config, *args, env=env, log=log) as proc:
        notify.wait("READY=1")
        assert any(f.startswith("STATUS=") and topic in f for f in notify.fields)
        notify.fields.clear()
        notify.wait("WATCHDOG=1", timeout=10)
        wait_for(
            lambda: event_log_committed(database_url, group, topic) == event_log_end(database_url, topic),
            what=f"{name} drained the log",
        )
        status, body = get(f"http://127.0.0.1:{health}/healthz")
        assert status == 200 and isinstance(body, dict) and body["live"] and body["daemon"] == name
        wait_for(lambda: get(f"http://127.0.0.1:{health}/readyz")[0] == 200, what="ready")
        assert get(f"http://127.0.0.1:{health}/nope")[0] == 404
        status, text = get(f"http://127.0.0.1:{metrics}/metrics")
        assert status == 200 and f'caracal_consumer_ready{{group="{group}"}} 1.0' in str(text)
        assert f'caracal_consumer_records_total{{group="{group}",outcome="dead_lettered"}} 1.0' in str(text)
        code = stop_daemon(proc, signal.SIGTERM, timeout=30)
        notify.wait("STOPPING=1", timeout=5)
    assert code == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    if name == "ledger-writer":
        assert ledger_count(database_url) == 200
    if name == "audit-logger":
        assert len(rows(database_url, "SELECT 1 FROM audit_log WHERE event_id IS NOT NULL")) == 20
    if name == "metrics-aggregator":
        assert "caracal_agent_spend_ledger_units_total" in str(text)


def test_readiness_follows_the_database_and_liveness_does_not(
    tmp_path: Path, database_url: str, postgres_service: PostgresService, notify: NotifySocket
) -> None:
    config = write_config(tmp_path / "caracal.yaml", database_url)
    health = free_port()
    env = daemon_env(NOTIFY_SOCKET=notify.path)
    name = database_url.split("?")[0].rsplit("/", 1)[1]
    args = ["--health-port", str(health), "--metrics-port", "0", "--listen-host", "127.0.0.1"]
    with daemon("audit-logger", config, *args, env=env, log=tmp_path / "log") as proc:
        notify.wait("READY=1")
        wait_for(lambda: get(f"http://127.0.0.1:{health}/readyz")[0] == 200, what="ready")
        with postgres_service.connect() as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            try:
                wait_for(lambda: get(f"http://127.0.0.1:{health}/readyz")[0] == 503, what="not ready")
                _status, body = get(f"http://127.0.0.1:{health}/readyz")
                assert isinstance(body, dict) and body["last_error"]
                assert get(f"http://127.0.0.1:{health}/healthz")[0] == 200
            finally:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        wait_for(lambda: get(f"http://127.0.0.1:{health}/readyz")[0] == 200, what="ready again")
        emitter = AuditEmitter(pg_log.PgLogProducer(database_url))
        try:
            emitter.emit(_audit_event(1))
        finally:
            emitter.close()
        wait_for(
            lambda: len(rows(database_url, "SELECT 1 FROM audit_log")) == 1, what="the event after the outage"
        )
        assert stop_daemon(proc, signal.SIGTERM) == 0


def test_sigterm_mid_stream_finishes_and_commits_the_batch(tmp_path: Path, database_url: str) -> None:
    events = make_events(add_agents(database_url, 5), 30_000)
    producer = pg_log.PgLogProducer(database_url)
    try:
        send_events(producer, events)
    finally:
        producer.close()
    config = write_config(tmp_path / "caracal.yaml", database_url)
    log = tmp_path / "log"
    args = ["--health-port", "0", "--metrics-port", "0", "--batch-size", "1000", "--log-level", "WARNING"]
    with daemon("ledger-writer", config, *args, log=log) as proc:
        wait_for(lambda: ledger_count(database_url) >= 3000 or proc.poll() is not None, what="progress")
        assert stop_daemon(proc, signal.SIGTERM) == 0, log.read_text()[-2000:]
    written = ledger_count(database_url)
    assert 0 < written <= len(events)
    # everything applied is committed, and nothing committed is missing: no half batch
    assert (
        event_log_committed(database_url, "ledger-writer-group", METERING_TOPIC)
        - (event_log_end(database_url, METERING_TOPIC) - len(events))
        == written
    )


def test_a_busy_port_does_not_stop_the_daemon(
    tmp_path: Path, database_url: str, notify: NotifySocket
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = write_config(tmp_path / "caracal.yaml", database_url)
    log = tmp_path / "log"
    env = daemon_env(NOTIFY_SOCKET=notify.path)
    try:
        args = ["--health-port", str(port), "--metrics-port", str(port), "--listen-host", "127.0.0.1"]
        with daemon("audit-logger", config, *args, env=env, log=log) as proc:
            notify.wait("READY=1")
            assert stop_daemon(proc, signal.SIGTERM) == 0
    finally:
        taken.close()
    text = log.read_text()
    assert "cannot serve /healthz and /readyz" in text and "cannot serve /metrics" in text


def test_a_bad_configuration_exits_3_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "caracal.yaml"
    config.write_text("bus: {kind: carrier-pigeon}\n")
    log = tmp_path / "log"
    with daemon("ledger-writer", config, env=daemon_env(), log=log) as proc:
        assert proc.wait(30) == 3
    assert log.read_text().strip().startswith("Error: invalid configuration")


def test_the_ledger_writer_seals_what_it_writes_once_a_key_exists(tmp_path: Path, database_url: str) -> None:
    from tests.integration.conftest import Cli

    key_dir = tmp_path / "keys"
    config = write_config(
        tmp_path / "caracal.yaml",
        database_url,
        integrity={"key_dir": str(key_dir), "batch_size": 100, "batch_max_age_seconds": 0.5},
    )
    agents = add_agents(database_url, 2)
    events = make_events(agents, 250)
    producer = pg_log.PgLogProducer(database_url)
    try:
        send_events(producer, events)
    finally:
        producer.close()
    log = tmp_path / "log"
    args = ["--health-port", "0", "--metrics-port", "0"]
    with daemon("ledger-writer", config, *args, log=log) as proc:
        wait_for(lambda: ledger_count(database_url) == 250, what="the events")
        wait_for(lambda: "are not sealed" in log.read_text(), what="the warning about the missing key")
        cli = Cli(database_url, env={"CARACAL_CONFIG": str(config)})
        cli.ok("merkle", "generate-key")  # picked up on the next round, no restart
        wait_for(
            lambda: unsealed_count(database_url) == 0,
            what="every event sealed",
        )
        assert len(rows(database_url, "SELECT 1 FROM merkle_batches")) == 3
        # The sealer keeps its connection between rounds; cut, it opens another on its next round.
        cut = rows(
            database_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'caracal-ledger-writer-sealer'",
        )
        assert cut
        producer = pg_log.PgLogProducer(database_url)
        try:
            send_events(producer, make_events(agents, 100, start=250))
        finally:
            producer.close()
        wait_for(lambda: ledger_count(database_url) == 350, what="the later events")
        wait_for(lambda: unsealed_count(database_url) == 0, what="the later events sealed")
        assert stop_daemon(proc, signal.SIGTERM) == 0
    verified = cli.ok("merkle", "verify-range", "--start-time", "2000-01-01T00:00:00Z", "--end-time", "now")
    assert "PASSED" in verified.stdout
