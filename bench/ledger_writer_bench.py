"""Ledger writer throughput: produce N metering events to Kafka, then time one writer draining them.

    python bench/ledger_writer_bench.py                     # 200,000 events
    python bench/ledger_writer_bench.py --events 1000000    # the full run
    python bench/ledger_writer_bench.py --no-seal           # the writer alone, without Merkle sealing

Without ``--bootstrap-servers`` / ``--database-url`` (or ``CARACAL_KAFKA_BOOTSTRAP_SERVERS`` /
``CARACAL_DATABASE_URL``) it starts a throw-away Kafka broker and PostgreSQL with the test harness (the
harness's PostgreSQL runs with ``fsync=off``; batches of thousands of rows make a commit's flush a small part
of the cost anyway). Each run uses a new topic, consumer group and database, so runs never see each other's
data. Prints the producer's rate and the writer's: events applied per second, from its first poll to its last
commit. The target is 20,000 events/s.

Sealing is on, as ``caracald ledger-writer`` runs it: a signing key is made in a temporary folder and a
:class:`~caracald.consumers.sealing.PeriodicSealer` seals due batches (``--seal-batch`` events, the
``integrity.batch_size`` default) every ``--seal-interval`` seconds, on its own thread and connection, while
the writer drains. After the drain the bench waits until every full batch is sealed and prints when that
happened (from the writer's first poll) as well. The machine's 1-minute load average is sampled every second
during the drain (mean and maximum printed): on a shared machine it says how much CPU the run competed for.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from caracald.bus.base import Record, event_headers  # noqa: E402
from caracald.bus.kafka import KafkaBatchConsumer, KafkaProducer, create_topics  # noqa: E402
from caracald.consumers.ledger_writer import LedgerWriter  # noqa: E402
from caracald.consumers.sealing import DEFAULT_INTERVAL, PeriodicSealer  # noqa: E402
from caracald.core.events import MeteringEvent, encode  # noqa: E402
from caracald.core.ledger import LedgerEventType  # noqa: E402
from caracald.core.money import Money  # noqa: E402
from caracald.integrity import keys  # noqa: E402
from caracald.integrity.sealer import pending_count  # noqa: E402
from caracald.runtime.daemon import tune_interpreter  # noqa: E402
from caracald.store.database import Database  # noqa: E402
from caracald.store.migrate import migrate  # noqa: E402

TARGET = 20_000


#: When the first bench event happened; one more follows every millisecond, as from a busy gateway.
START = datetime(2025, 1, 1, tzinfo=UTC)


def make_events(count: int, agents: list[uuid.UUID], first: int = 0) -> list[MeteringEvent]:
    """Events number ``first`` on: reservations and settlements in turn, one per millisecond."""
    kinds = (LedgerEventType.RESERVATION, LedgerEventType.SETTLEMENT)
    events = []
    for i in range(count):
        kind = kinds[i % 2]
        request = uuid.UUID(int=random.getrandbits(128), version=4)
        tokens_in, tokens_out = random.randint(10, 4000), random.randint(1, 2000)
        events.append(
            MeteringEvent(
                kind=kind,
                request_id=request,
                agent_id=agents[i % len(agents)],
                occurred_at=START + timedelta(milliseconds=first + i),
                cost=Money(Decimal(tokens_in * 3 + tokens_out * 15) / Decimal(1_000_000), "USD")
                if kind is LedgerEventType.SETTLEMENT
                else Money(Decimal(0), "USD"),
                resource="https://api.openai.com/v1/chat/completions",
                model="gpt-4o-mini",
                hold=Money(Decimal("0.05"), "USD") if kind is LedgerEventType.RESERVATION else None,
                input_tokens=tokens_in if kind is LedgerEventType.SETTLEMENT else None,
                output_tokens=tokens_out if kind is LedgerEventType.SETTLEMENT else None,
                policy_ids=(agents[0],),
            )
        )
    return events


class TimedConsumer:
    """The consumer, noting when the first records arrived (so that the group join is not timed)."""

    def __init__(self, consumer: KafkaBatchConsumer) -> None:
        self.consumer = consumer
        self.group = consumer.group
        self.first_records_at: float | None = None
        self.records = 0  # records polled (a replay reads records that add no row)

    def poll_batch(self, max_records: int, timeout: float) -> list[Record]:
        records = self.consumer.poll_batch(max_records, timeout)
        if records and self.first_records_at is None:
            self.first_records_at = time.time()
        self.records += len(records)
        return records

    def commit(self, records: Sequence[Record]) -> None:
        self.consumer.commit(records)

    def lag(self) -> dict[tuple[str, int], int]:
        return self.consumer.lag()

    def close(self) -> None:
        self.consumer.close()


def ledger_count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM ledger_events").fetchone()
    return int(row[0]) if row else 0


def unsealed_count(url: str) -> int:
    with psycopg.connect(url) as conn:
        return pending_count(conn)[0]


def postgres_cpu(url: str) -> float | None:
    """CPU seconds the PostgreSQL server has used so far (its processes, and those that have exited), or None
    when the server is not on this machine or its files are not readable (``data_directory`` needs a
    superuser, as the harness's is)."""
    try:
        with psycopg.connect(url) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
        pid = int((Path(str(row[0] if row else "")) / "postmaster.pid").read_text().split()[0])
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if entry.name == str(pid):  # utime, stime, and the reaped children's cutime, cstime
                total += sum(int(f) for f in fields[11:15])
            elif fields[1] == str(pid):  # a live child: utime, stime
                total += int(fields[11]) + int(fields[12])
        return total / ticks
    except (psycopg.Error, OSError, ValueError, IndexError):
        return None


def own_cpu() -> float:
    """CPU seconds this process (the writer, its sealer and their Kafka clients) has used so far."""
    times = os.times()
    return times.user + times.system


class LoadSampler:
    """The 1-minute load average, sampled every second on a thread until :meth:`stop`."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(1.0):
                return

    def stop(self) -> str:
        self._stop.set()
        self._thread.join()
        mean = sum(self.samples) / len(self.samples)
        return f"mean {mean:.1f}, max {max(self.samples):.1f} on {os.cpu_count()} CPUs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument(
        "--seal", action=argparse.BooleanOptionalAction, default=True, help="Merkle sealing while draining"
    )
    parser.add_argument("--seal-batch", type=int, default=1000, help="events per Merkle batch")
    parser.add_argument(
        "--seal-interval", type=float, default=DEFAULT_INTERVAL, help="seconds between sealing rounds"
    )
    parser.add_argument("--bootstrap-servers", default=os.environ.get("CARACAL_KAFKA_BOOTSTRAP_SERVERS"))
    parser.add_argument(
        "--database-url",
        default=os.environ.get("CARACAL_DATABASE_URL"),
        help="a server URL; the bench makes (and keeps) a new database on it",
    )
    args = parser.parse_args()

    services = []
    bootstrap = args.bootstrap_servers
    if not bootstrap:
        from tests.harness.kafka import KafkaService

        # The harness tunes the JVM for start-up (C1 only); a benchmark wants steady-state speed (C2).
        os.environ.setdefault("CARACAL_TEST_KAFKA_JAVA_OPTS", "-XX:TieredStopAtLevel=4 -XX:CICompilerCount=2")
        print("starting a Kafka broker (test harness) ...", flush=True)
        broker = KafkaService().start()
        services.append(broker.close)
        bootstrap = broker.bootstrap_servers
    name = f"bench_{uuid.uuid4().hex[:10]}"
    if args.database_url:
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = psycopg.conninfo.make_conninfo(args.database_url, dbname=name)
    else:
        from tests.harness.postgres import PostgresService

        print("starting PostgreSQL (test harness) ...", flush=True)
        postgres = PostgresService.start()
        services.append(postgres.stop)
        url = postgres.create_database(name)
    try:
        return run(args, bootstrap, url)
    finally:
        for stop in reversed(services):
            stop()


def add_agents(url: str, count: int) -> list[uuid.UUID]:
    """``count`` active agents, the events' owners (the ledger's foreign key)."""
    agents = [uuid.uuid4() for _ in range(count)]
    now = datetime.now(UTC)
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO agents (agent_id, name, owner, status, created_at, updated_at) "
            "VALUES (%s, %s, 'bench@example.com', 'active', %s, %s)",
            [(a, f"bench-agent-{i}", now, now) for i, a in enumerate(agents)],
        )
    return agents


def bench_producer(config: dict[str, str]) -> KafkaProducer:
    return KafkaProducer({**config, "linger.ms": 20, "batch.size": 1_000_000}, delivery_timeout=300)


def produce(
    producer: KafkaProducer,
    topic: str,
    count: int,
    agents: list[uuid.UUID],
    payloads: list[bytes] | None = None,
) -> tuple[float, int]:
    """Send ``count`` events and wait for them: (seconds spent sending and flushing, records not
    acknowledged). The encoded events are appended to ``payloads`` when given."""
    seconds = 0.0
    for chunk in range(0, count, 50_000):  # in chunks: a million events need not sit in memory
        events = make_events(min(50_000, count - chunk), agents, chunk)
        encoded = [(e.key, encode(e), event_headers(e)) for e in events]
        if payloads is not None:
            payloads.extend(value for _, value, _ in encoded)
        started = time.perf_counter()
        for key, value, headers in encoded:
            producer.send(topic, value, key=key, headers=headers)
        seconds += time.perf_counter() - started
    started = time.perf_counter()
    left = producer.flush(300)
    seconds += time.perf_counter() - started
    return seconds, left


def make_sealer(url: str, key_dir: Path, seal_batch: int, seal_interval: float) -> PeriodicSealer:
    """A sealer as ``caracald ledger-writer`` runs it, with a new signing key in ``key_dir`` (not started)."""
    with Database(url) as db:
        keys.generate(db, key_dir, actor="bench", at=datetime.now(UTC))
    return PeriodicSealer(url, key_dir, batch_size=seal_batch, interval=seal_interval)


def drain(
    consumer: TimedConsumer,
    url: str,
    dlq_producer: KafkaProducer,
    dlq_topic: str,
    batch_size: int,
    seal_batch: int,
    idle_exit: float = 3.0,
) -> tuple[float, float]:
    """One ledger writer drains the consumer's topic: (wall time of its first records, of its last commit)."""
    writer = LedgerWriter(
        consumer, url, dlq_producer, dlq_topic=dlq_topic, batch_size=batch_size, seal_batch_size=seal_batch
    )
    writer.run(idle_exit=idle_exit)
    writer.close()
    finished = writer.health.last_commit or time.time()
    return consumer.first_records_at or finished, finished


class SealWatcher:
    """Notes when the sealed tree first reaches ``target`` events (``merkle_state.tree_size``, polled every
    0.1 s on a thread): the drain's writer waits out ``idle_exit`` seconds before it returns, so asking once
    it has would time that wait as sealing."""

    def __init__(self, url: str, target: int) -> None:
        self.url = url
        self.target = target
        self.done_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="seal-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.wait(0.1):
                row = conn.execute("SELECT tree_size FROM merkle_state").fetchone()
                if row is not None and row[0] >= self.target:
                    self.done_at = time.time()
                    return

    def wait(self, sealer: PeriodicSealer) -> float:
        """Wait until the target is sealed (or sealing failed); when it was reached (now on a failure)."""
        while self._thread.is_alive() and sealer.last_error is None:
            self._thread.join(0.5)
        self._stop.set()
        return self.done_at or time.time()


def run(args: argparse.Namespace, bootstrap: str, url: str) -> int:
    migrate(url)
    agents = add_agents(url, args.agents)
    config = {"bootstrap.servers": bootstrap}
    topic = f"bench.metering.{uuid.uuid4().hex[:8]}"
    dlq_topic = f"bench.dlq.{uuid.uuid4().hex[:8]}"
    create_topics(config, [topic], partitions=args.partitions, replication_factor=1, retention_ms=None)
    create_topics(config, [dlq_topic], partitions=1, replication_factor=1, retention_ms=None)

    print(f"producing {args.events:,} events ...", flush=True)
    producer = bench_producer(config)
    produce_seconds, left = produce(producer, topic, args.events, agents)
    if left:
        print(f"{left} events not acknowledged", file=sys.stderr)
        return 1
    print(
        f"produced {args.events:,} events in {produce_seconds:.1f} s ({args.events / produce_seconds:,.0f}/s)"
    )
    print(f"load average before draining: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-keys-") as key_dir:
        sealer = None
        if args.seal:
            sealer = make_sealer(url, Path(key_dir), args.seal_batch, args.seal_interval)
        consumer = TimedConsumer(KafkaBatchConsumer(config, f"bench-{uuid.uuid4().hex[:8]}", [topic]))
        print(f"draining with one ledger writer{' and its sealer' if sealer else ''} ...", flush=True)
        tune_interpreter()  # as `caracald ledger-writer` runs
        load = LoadSampler()
        cpu_before = (own_cpu(), postgres_cpu(url))
        watcher = None
        if sealer is not None:
            watcher = SealWatcher(url, args.events // args.seal_batch * args.seal_batch)
            sealer.start()
        started, finished = drain(consumer, url, producer, dlq_topic, args.batch_size, args.seal_batch)
        producer.close()
        seconds = finished - started
        applied = ledger_count(url)
        rate = applied / seconds if seconds > 0 else 0.0
        print(
            f"ledger writer: {applied:,} events in {seconds:.1f} s = {rate:,.0f} events/s (target {TARGET:,})"
        )
        if sealer is not None and watcher is not None:
            sealed_at = watcher.wait(sealer)
            sealer.stop()
            left = unsealed_count(url)
            sealed_rate = (applied - left) / (sealed_at - started)
            print(
                f"sealed: {applied - left:,} events in batches of {args.seal_batch:,} "
                f"{sealed_at - started:.1f} s after the first poll = {sealed_rate:,.0f} events/s written and "
                f"sealed (target {TARGET:,}); {left:,} wait for their batch to fill"
                + (f"; sealing failed: {sealer.last_error}" if sealer.last_error else "")
            )
        print(f"load average during the drain: {load.stop()}")
        # What the work costs, whatever else the machine runs: CPU time per event, from the start of the drain
        # to the end of sealing (the Kafka broker's share is not counted).
        python_cpu, pg_cpu = own_cpu() - cpu_before[0], postgres_cpu(url)
        per_event = f"writer process {python_cpu / max(applied, 1) * 1e6:.0f} us"
        if pg_cpu is not None and cpu_before[1] is not None:
            per_event += f", PostgreSQL {(pg_cpu - cpu_before[1]) / max(applied, 1) * 1e6:.0f} us"
        print(f"CPU per event: {per_event}")
    if applied != args.events:
        print(f"expected {args.events:,} ledger rows, found {applied:,}", file=sys.stderr)
        return 1
    if sealer is not None and sealer.last_error is not None:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
