"""Helpers shared by the event-pipeline tests: agents, events, producing, running consumers, reading back."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import psycopg
import yaml
from psycopg.rows import dict_row

from caracald.bus.base import RecordProducer, event_headers
from caracald.core.events import AUDIT_TOPIC, METERING_TOPIC, MeteringEvent, encode
from caracald.core.ledger import LedgerEventType
from caracald.core.money import Money
from caracald.integrity.sealer import pending_count

ROOT = Path(__file__).resolve().parents[2]
CARACALD = Path(sys.executable).parent / "caracald"
BASE = datetime(2025, 3, 1, tzinfo=UTC)

#: Consumer daemon -> (its consumer group, the topic it reads).
CONSUMERS = {
    "ledger-writer": ("ledger-writer-group", METERING_TOPIC),
    "metrics-aggregator": ("metrics-aggregator-group", METERING_TOPIC),
    "audit-logger": ("audit-logger-group", AUDIT_TOPIC),
}


def add_agents(url: str, count: int) -> list[uuid.UUID]:
    agents = [uuid.uuid4() for _ in range(count)]
    now = datetime.now(UTC)
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO agents (agent_id, name, owner, status, created_at, updated_at) "
            "VALUES (%s, %s, 'tests@example.com', 'active', %s, %s)",
            [(a, f"agent-{a.hex[:12]}", now, now) for a in agents],
        )
    return agents


def make_events(agents: Sequence[uuid.UUID], count: int, *, start: int = 0) -> list[MeteringEvent]:
    """Alternating reservations and settlements, one second apart, spread over the agents."""
    events = []
    for n in range(start, start + count):
        settle = n % 2 == 1
        events.append(
            MeteringEvent(
                kind=LedgerEventType.SETTLEMENT if settle else LedgerEventType.RESERVATION,
                request_id=uuid.uuid4(),
                agent_id=agents[n % len(agents)],
                occurred_at=BASE + timedelta(seconds=n),
                cost=Money(Decimal(n) / Decimal(1000), "USD") if settle else Money(Decimal(0), "USD"),
                resource="https://api.openai.com/v1/chat/completions",
                model=("gpt-4o", "gpt-4o-mini")[n % 2 and (n // 2) % 2],
                hold=None if settle else Money(Decimal("0.05"), "USD"),
                input_tokens=n if settle else None,
                output_tokens=2 * n if settle else None,
            )
        )
    return events


def send_events(
    producer: RecordProducer,
    items: Sequence[MeteringEvent | tuple[bytes | None, bytes]],
    *,
    topic: str = METERING_TOPIC,
) -> int:
    """Send metering events (or raw (key, value) records) and wait for every acknowledgement."""
    futures = []
    for item in items:
        if isinstance(item, MeteringEvent):
            futures.append(producer.send(topic, encode(item), key=item.key, headers=event_headers(item)))
        else:
            key, value = item
            futures.append(producer.send(topic, value, key=key, headers=[("trace-id", b"t")]))
    assert producer.flush(60) == 0
    for future in futures:
        future.result(timeout=60)
    return len(futures)


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Loop(Protocol):
    def run(self) -> None: ...

    def stop(self) -> None: ...


class Running:
    """A consume loop on a thread, stopped gracefully (and closed) on exit."""

    def __init__(self, loop: Any, close: Callable[[], None] | None = None) -> None:
        self.loop = loop
        self.close = close or loop.close
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="consumer-under-test")

    def _run(self) -> None:
        try:
            self.loop.run()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Any:
        self.thread.start()
        return self.loop

    def __exit__(self, *exc: object) -> None:
        self.loop.stop()
        self.thread.join(60)
        self.close()
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def rows(url: str, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def ledger_keys(url: str) -> list[uuid.UUID]:
    return [
        r["idempotency_key"] for r in rows(url, "SELECT idempotency_key FROM ledger_events ORDER BY event_id")
    ]


def unsealed_count(url: str) -> int:
    """Events in no sealed Merkle batch yet (placed in an open batch, or not placed)."""
    with psycopg.connect(url) as conn:
        return pending_count(conn)[0]


def ledger_count(url: str) -> int:
    return int(rows(url, "SELECT count(*) AS n FROM ledger_events")[0]["n"])


def totals(url: str) -> list[dict[str, Any]]:
    return rows(url, "SELECT * FROM spend_totals ORDER BY agent_id, bucket, currency")


_RAW_TOTALS = """
SELECT agent_id, currency, date_trunc('hour', occurred_at, 'UTC') AS bucket,
       COALESCE(sum(cost) FILTER (WHERE event_type IN ('settlement', 'expiry', 'adjustment')), 0) AS total,
       count(*) FILTER (WHERE event_type IN ('settlement', 'expiry')) AS spending_events,
       count(*) AS ledger_events
  FROM ledger_events GROUP BY 1, 2, 3 ORDER BY 1, 3, 2
"""


def raw_totals(url: str) -> list[dict[str, Any]]:
    return rows(url, _RAW_TOTALS)


def totals_beside_raw(url: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The kept totals and the ones the raw events give, read from one snapshot: a writer's transaction that
    commits between two separate reads (a killed writer's backend finishing its commit) cannot tell them
    apart."""
    with psycopg.connect(url, row_factory=dict_row) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            kept = conn.execute("SELECT * FROM spend_totals ORDER BY agent_id, bucket, currency").fetchall()
            raw = conn.execute(_RAW_TOTALS).fetchall()  # type: ignore[arg-type]
    return kept, raw


def dead_letters(url: str) -> list[dict[str, Any]]:
    return rows(url, "SELECT * FROM dlq_events ORDER BY dlq_id")


def event_log_committed(url: str, group: str, topic: str) -> int:
    found = rows(
        url,
        "SELECT committed_offset FROM consumer_offsets WHERE consumer_group = %s AND topic = %s",
        (group, topic),
    )
    return int(found[0]["committed_offset"]) if found else 0


def event_log_end(url: str, topic: str) -> int:
    found = rows(url, "SELECT max(log_offset) AS m FROM event_log WHERE topic = %s", (topic,))
    return int(found[0]["m"]) + 1 if found and found[0]["m"] is not None else 0


# -- daemons as subprocesses


def write_config(path: Path, database_url: str, **sections: Any) -> Path:
    config: dict[str, Any] = {"database": {"url": database_url}, "bus": {"kind": "postgres"}}
    for name, value in sections.items():
        config[name] = {**config.get(name, {}), **value}
    path.write_text(yaml.safe_dump(config))
    return path


def daemon_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARACAL", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update(PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def start_daemon(
    daemon: str, config: Path, *args: str, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    output: Any = log.open("ab") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            [str(CARACALD), daemon, "--config", str(config), *args],
            cwd=ROOT,
            env=env or daemon_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if log is not None:
            output.close()


def stop_daemon(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        # Its threads' stacks into its log first (the daemons dump them on SIGUSR1): why it hangs.
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise AssertionError(f"the daemon did not stop within {timeout} s") from None


@contextlib.contextmanager
def daemon(
    name: str, config: Path, *args: str, env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_daemon(name, config, *args, env=env, log=log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            stop_daemon(proc, signal.SIGKILL)
