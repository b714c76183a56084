"""Throughput summary: each speed Caracal promises, next to a floor measured in the same run.

    .venv/bin/python bench/drills/throughput.py            # about 5 to 6 minutes on 2 cores
    .venv/bin/python bench/drills/throughput.py --quick    # about 2 to 3 minutes, smaller sizes

A figure taken on a shared 2-core machine says little on its own, so every measure has a *baseline* taken
right next to it, on the same machine and services, and the table shows both and their ratio. The targets
are the issues' (#3 gateway, #4 ledger writer, #5 integrity, #8 dashboard); a measure that no issue gives a
target (admission, replay, CLI start) is shown as a figure only, and says so. Each step reuses the pieces of
the bench script that measures it in depth, with smaller sizes:

* **gateway** (``bench/gateway_bench.py``): the fake provider (*direct*), the pass-through proxy
  (``bench/passthrough.py``) and ``caracald gateway`` in the distributed deployment, each in its own process.
  Latency at concurrency 1, interleaved in blocks (A B C A B C ...); "added" is a target's p50/p99 minus
  direct's, and the pass-through's added latency is the baseline (the floor of any proxy). Throughput:
  ``wrk`` at 32 connections on each target in turn, A B C then C B A (medians), against the pass-through
  (an aiohttp load loop when ``wrk`` is not installed: said in the row, and a weaker load generator, since
  it shares the 2 cores with the servers).
* **admission** (``bench/budget_bench.py``): a Redis budget admission against two scopes at concurrency 1,
  in blocks alternating with Redis ``PING`` on the same connection pool (the round trip every admission
  pays before its script runs).
* **ledger writer** (``bench/ledger_writer_bench.py``): N events produced to a new topic, then drained by one
  ledger writer with its Merkle sealer (as ``caracald ledger-writer`` runs), from its first records to its
  last offset commit. Baseline: the same rows, as the writer makes them, ``COPY``'d straight into an empty
  ledger in the writer's batches (see :func:`_copy_floor` for why that floor).
* **replay**: ``caracal replay start --from-timestamp T --consumer-group G --topic ... --execute`` (the real
  CLI, a process of its own) rewinds the writer's group to before the first event; a writer then re-reads
  the whole backlog, every event already applied. Rate from its first records to its last commit; baseline
  the first drain of the same events. An invariant row checks that the replay changed nothing (rows,
  amounts, spend totals).
* **verify-range / verify-event** (``bench/merkle_bench.py``): N events inserted and sealed, ``verify_all``
  best of two; baseline a plain sequential read of the same rows (binary ``COPY`` of the table to the
  client), best of two. ``verify_event`` latency over a sample; baseline a primary-key read of the same
  events on the same kind of connection.
* **CLI start**: wall time of ``caracal --help`` (it has no ``--version``), median of runs alternating with
  ``python -c pass`` on the same interpreter, the baseline.
* **TUI** (``bench/tui_bench.py``): ``caracal-tui`` headless on the Agents view with 1,000 agents in
  PostgreSQL: first paint and refresh. Baseline: an empty Textual app at the same size (its first frame,
  and a refresh with nothing to fetch or draw, down the dashboard's path).

A step that fails gives one row saying why (verdict missed) and the others still run. What the bench
helpers print goes to a log in the drill's work folder, not to the screen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.drills import report  # noqa: E402
from bench.drills.env import DrillEnv  # noqa: E402
from bench.drills.report import Row  # noqa: E402

DRILL = "throughput"
BIN = Path(sys.executable).parent
NO_TARGET = "none set (issues #3-#9)"
#: What a failed measurement raises (SystemExit: the bench helpers' way of giving up).
FAILURES = (Exception, SystemExit)


@dataclass(frozen=True, slots=True)
class Sizes:
    latency_requests: int  # per gateway target, concurrency 1
    latency_warmup: int
    load_seconds: float  # per wrk run
    load_rounds: int  # of wrk runs on every target, in turn: A B C, then C B A, ...
    connections: int
    admissions: int
    writer_events: int
    verify_events: int
    verify_samples: int
    cli_runs: int
    tui_agents: int
    tui_refreshes: int


FULL = Sizes(
    latency_requests=1000,  # as issue #3 states the measure
    latency_warmup=200,
    load_seconds=5.0,
    load_rounds=2,
    connections=32,
    admissions=5000,
    writer_events=100_000,
    verify_events=200_000,
    verify_samples=1000,
    cli_runs=10,
    tui_agents=1000,
    tui_refreshes=20,
)
QUICK = Sizes(
    latency_requests=500,
    latency_warmup=100,
    load_seconds=5.0,
    load_rounds=1,
    connections=32,
    admissions=2000,
    writer_events=30_000,
    verify_events=100_000,
    verify_samples=300,
    cli_runs=5,
    tui_agents=1000,  # the targets are stated for 1,000 agents
    tui_refreshes=10,
)


def run(env: DrillEnv) -> list[Row]:
    sizes = QUICK if env.quick else FULL
    log_path = env.folder("throughput") / "bench.log"
    steps: list[tuple[str, str, Callable[[DrillEnv, Sizes], list[Row]]]] = [
        ("gateway", "added p50 <= 1 ms, p99 <= 5 ms; >= 0.5 x pass-through req/s", gateway_rows),
        ("budget admission", NO_TARGET, admission_rows),
        ("ledger writer and replay", ">= 20,000 events/s", writer_rows),
        ("verify-range and verify-event", ">= 250,000 events/s; <= 2 ms", integrity_rows),
        ("CLI start", NO_TARGET, cli_rows),
        ("TUI first paint and refresh", "< 1 s; < 100 ms", tui_rows),
    ]
    rows: list[Row] = []
    with log_path.open("a") as log:
        for title, goal, step in steps:
            rows.extend(_guarded(title, goal, functools.partial(step, env, sizes), log))
    return rows


def _guarded(title: str, goal: str, step: Callable[[], list[Row]], log: TextIO) -> list[Row]:
    """Run one step; its failure becomes a row (the other steps still run)."""
    print(f"throughput: {title} ...", flush=True)
    started = time.monotonic()
    try:
        with contextlib.redirect_stdout(log):  # the bench helpers' own report lines
            rows = step()
    except FAILURES as exc:
        rows = [_failed(title, goal, exc)]
    print(f"throughput: {title} done in {time.monotonic() - started:.0f} s", flush=True)
    return rows


def _failed(measure: str, goal: str, exc: BaseException) -> Row:
    """A measurement that could not be taken: a missed target, with the reason as its value."""
    lines = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
    return report.target(DRILL, measure, f"not measured: {reason}", False, goal)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


# -- the gateway -------------------------------------------------------------------------------------------


def gateway_rows(env: DrillEnv, sizes: Sizes) -> list[Row]:
    import bench.gateway_bench as gb

    workdir = env.folder("throughput-gateway")
    services = gb.Services(env.database("throughput_gateway"), env.redis.url, env.kafka.bootstrap_servers)
    gb.create_metering_topic(env.kafka)
    targets = gb.make_targets(gb.make_agent(services.database_url))
    try:
        gb.launch(targets, workdir, services)
        rows = _gateway_latency(targets, sizes)
        runs = f"{sizes.load_rounds} x " if sizes.load_rounds > 1 else ""
        measure = f"gateway throughput, {sizes.connections} connections, {runs}{sizes.load_seconds:g} s"
        try:
            rows.append(_gateway_load(targets, sizes, workdir, measure))
        except FAILURES as exc:
            rows.append(_failed(measure, f">= {gb.TARGET_THROUGHPUT_RATIO:g} x pass-through", exc))
    finally:
        for target in reversed(targets):
            gb.stop(target.proc)
    return rows


def _gateway_latency(targets: list[Any], sizes: Sizes) -> list[Row]:
    """Added latency at concurrency 1, the three targets interleaved in blocks of 100."""
    import uvloop

    import bench.gateway_bench as gb

    direct, passthrough, caracal = targets
    uvloop.run(gb.latency_round(targets, sizes.latency_requests, sizes.latency_warmup, 100))
    errors = f" ({caracal.errors} answers not 200)" if caracal.errors else ""
    rows = []
    for q, limit in (("p50", gb.TARGET_P50_MS), ("p99", gb.TARGET_P99_MS)):
        series = "latency_p50" if q == "p50" else "latency_p99"
        floor = getattr(direct, series)[0]
        added = getattr(caracal, series)[0] - floor
        pass_added = getattr(passthrough, series)[0] - floor
        rows.append(
            report.target(
                DRILL,
                f"gateway added latency {q}, concurrency 1 ({sizes.latency_requests:,} requests)",
                f"{added:.2f} ms{errors}",
                added <= limit and not caracal.errors,  # a quick refusal is not a quick call
                f"<= {limit:g} ms",
                baseline=f"pass-through adds {pass_added:.2f} ms (direct {q} {floor:.2f} ms)",
                ratio=report.ratio(added, pass_added) if pass_added > 0 else "",
            )
        )
    return rows


def _gateway_load(targets: list[Any], sizes: Sizes, workdir: Path, measure: str) -> Row:
    """Requests per second at ``sizes.connections`` connections, medians over the rounds: direct, then
    pass-through, then caracal, and back in the reverse order, so that a drift in the machine's load (other
    work starting or ending) does not fall on one target only."""
    import uvloop

    import bench.gateway_bench as gb

    direct, passthrough, caracal = targets
    wrk = shutil.which("wrk") is not None
    failed_before = caracal.errors
    for round_no in range(sizes.load_rounds):
        for target in targets if round_no % 2 == 0 else reversed(targets):
            if wrk:
                rps, p99, bad = gb.run_wrk(workdir, target, sizes.connections, sizes.load_seconds)
            else:
                rps, p99, bad = uvloop.run(_aiohttp_load(target, sizes.connections, sizes.load_seconds))
            target.rps.append(rps)
            target.wrk_p99.append(p99)
            target.errors += bad
    failed = caracal.errors - failed_before
    med = statistics.median
    ours, floor = med(caracal.rps), med(passthrough.rps)
    share = ours / floor if floor else 0.0
    return report.target(
        DRILL,
        f"{measure} ({'wrk' if wrk else 'aiohttp load loop: wrk not installed'})",
        f"{ours:,.0f} req/s (p99 {med(caracal.wrk_p99):.1f} ms"
        + (f", {failed:,} not 200)" if failed else ")"),
        share >= gb.TARGET_THROUGHPUT_RATIO and not failed,  # fast refusals are not throughput
        f">= {gb.TARGET_THROUGHPUT_RATIO:g} x pass-through",
        baseline=f"pass-through {floor:,.0f} req/s (direct {med(direct.rps):,.0f})",
        ratio=report.ratio(ours, floor),
    )


async def _aiohttp_load(target: Any, connections: int, seconds: float) -> tuple[float, float, int]:
    """``wrk``'s stand-in: ``connections`` keep-alive loops for ``seconds``: (req/s, p99 ms, failures)."""
    import aiohttp

    import bench.gateway_bench as gb

    headers = {"Authorization": f"Bearer {target.auth}", "Content-Type": "application/json"}
    latencies: list[float] = []
    failures = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        deadline = started + seconds

        async def loop() -> None:
            nonlocal failures
            while time.perf_counter() < deadline:
                begun = time.perf_counter()
                try:
                    async with session.post(target.url, data=gb.BODY, headers=headers) as reply:
                        await reply.read()
                        failures += reply.status != 200
                except aiohttp.ClientError:
                    failures += 1
                latencies.append((time.perf_counter() - begun) * 1000)

        await asyncio.gather(*(loop() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, gb.percentile(latencies, 0.99) if latencies else 0.0, failures


# -- the budget admission ----------------------------------------------------------------------------------


def admission_rows(env: DrillEnv, sizes: Sizes) -> list[Row]:
    admits, pings = asyncio.run(_admissions(env.redis.url, sizes.admissions))
    rows = []
    for q, pick in (("p50", statistics.median), ("p99", lambda v: _pct(v, 0.99))):
        value, floor = pick(admits), pick(pings)
        rows.append(
            report.info(
                DRILL,
                f"budget admission latency {q}, concurrency 1 (Redis, 2 scopes, {len(admits):,} admissions)",
                f"{value / 1000:.3f} ms",
                target=NO_TARGET,
                baseline=f"Redis PING {floor / 1000:.3f} ms",
                ratio=report.ratio(value, floor),
            )
        )
    return rows


async def _admissions(url: str, n: int, block: int = 100) -> tuple[list[float], list[float]]:
    """Admission latencies and PING round trips (us), in alternating blocks so that drift hits both."""
    import bench.budget_bench as bb
    from caracald.budget.redis_backend import RedisBudget
    from caracald.core.windows import TimeWindow, WindowSpec, WindowType

    backend = RedisBudget.from_url(url, namespace=f"drill-{uuid.uuid4().hex[:8]}")
    client = (
        backend._client
    )  # the admissions' own connection pool: the PING pays what they pay to reach Redis
    admits: list[float] = []
    pings: list[float] = []
    try:
        chosen = bb.scopes(WindowSpec(TimeWindow.DAILY, WindowType.CALENDAR, "Europe/Paris"))
        await bb.samples(backend, chosen, 0, warmup=200)
        for _ in range(50):
            await client.ping()
        while len(admits) < n:
            size = min(block, n - len(admits))
            admits.extend((await bb.samples(backend, chosen, size, warmup=0))[0])
            for _ in range(size):
                started = time.perf_counter()
                await client.ping()
                pings.append((time.perf_counter() - started) * 1e6)
    finally:
        await backend.close()
    return admits, pings


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the ledger writer and a replay ------------------------------------------------------------------------


def writer_rows(env: DrillEnv, sizes: Sizes) -> list[Row]:
    import bench.ledger_writer_bench as lw
    from caracald.bus.kafka import KafkaBatchConsumer, create_topics

    n = sizes.writer_events
    url = env.database("throughput_writer")
    agents = lw.add_agents(url, 200)
    config = {"bootstrap.servers": env.kafka.bootstrap_servers}
    suffix = uuid.uuid4().hex[:8]
    topic, dlq_topic, group = f"drill.metering.{suffix}", f"drill.dlq.{suffix}", f"drill-writer-{suffix}"
    create_topics(config, [topic], partitions=6, replication_factor=1, retention_ms=None)
    create_topics(config, [dlq_topic], partitions=1, replication_factor=1, retention_ms=None)

    replay_from = datetime.now(UTC) - timedelta(seconds=5)  # before the first record: the whole backlog
    producer = lw.bench_producer(config)
    rows: list[Row] = []
    try:
        payloads: list[bytes] = []
        _, left = lw.produce(producer, topic, n, agents, payloads)
        if left:
            raise RuntimeError(f"{left:,} events not acknowledged by Kafka")
        copy_rate = _copy_floor(env, agents, payloads)
        del payloads

        with tempfile.TemporaryDirectory(prefix="drill-keys-") as key_dir:
            # As caracald ledger-writer runs: batches of 1,000 (integrity.batch_size), sealed every 5 s.
            sealer = lw.make_sealer(url, Path(key_dir), 1000, 5.0).start()
            try:
                consumer = lw.TimedConsumer(KafkaBatchConsumer(config, group, [topic]))
                started, finished = lw.drain(consumer, url, producer, dlq_topic, 5000)
                applied = lw.ledger_count(url)
                sealed_at = lw.wait_sealed(url, sealer, 1000)
                if sealer.last_error is not None:
                    raise RuntimeError(f"sealing failed: {sealer.last_error}")
                if applied != n:
                    raise RuntimeError(f"{applied:,} ledger rows for {n:,} events")
                rate = applied / (finished - started)
                timing = f"{finished - started:.1f} s; all sealed at {sealed_at - started:.1f} s"
                rows.append(
                    report.target(
                        DRILL,
                        f"ledger-writer throughput, {n:,} events from Kafka, sealing on",
                        f"{rate:,.0f} events/s ({timing})",
                        rate >= lw.TARGET,
                        f">= {lw.TARGET:,} events/s",
                        baseline=f"COPY of the same rows {copy_rate:,.0f} events/s",
                        ratio=report.ratio(rate, copy_rate),
                    )
                )
                measure = f"replay throughput: {n:,} applied events re-read after `caracal replay start`"
                try:
                    rows += _replay(env, url, (topic, dlq_topic, group), producer, replay_from, rate, measure)
                except FAILURES as exc:
                    rows.append(_failed(measure, NO_TARGET, exc))
            finally:
                sealer.stop()
    finally:
        producer.close()
    return rows


def _replay(
    env: DrillEnv,
    url: str,
    names: tuple[str, str, str],
    producer: Any,
    at: datetime,
    first_rate: float,
    measure: str,
) -> list[Row]:
    """Rewind the writer's group with the CLI, drain the whole backlog again; the ledger must not change."""
    import bench.ledger_writer_bench as lw
    from caracald.bus.kafka import KafkaBatchConsumer

    topic, dlq_topic, group = names
    before = _ledger_digest(url)
    reset_seconds = _replay_reset(env, url, group, topic, at)
    consumer = lw.TimedConsumer(
        KafkaBatchConsumer({"bootstrap.servers": env.kafka.bootstrap_servers}, group, [topic])
    )
    started, finished = lw.drain(consumer, url, producer, dlq_topic, 5000)
    after = _ledger_digest(url)
    expected = before[0]  # every event was applied once: each is read again
    rate = consumer.records / (finished - started) if finished > started else 0.0
    return [
        report.info(
            DRILL,
            measure,
            f"{rate:,.0f} events/s (the CLI's reset took {reset_seconds:.1f} s)",
            target=NO_TARGET,
            baseline=f"first drain {first_rate:,.0f} events/s",
            ratio=report.ratio(rate, first_rate),
        ),
        report.invariant(
            DRILL,
            "replay changed nothing (ledger rows, amounts, spend totals)",
            f"unchanged; {consumer.records:,} events re-read"
            if after == before
            else f"before {before}, after {after}; {consumer.records:,} events re-read",
            after == before and consumer.records == expected,
            f"unchanged; {expected:,} events re-read",
        ),
    ]


def _copy_floor(env: DrillEnv, agents: list[uuid.UUID], payloads: list[bytes]) -> float:
    """Events per second that PostgreSQL takes the writer's rows at, with nothing else in the way.

    The writer's rows (:func:`~caracald.consumers.ledger_writer.ledger_row` of each payload, decoded before
    the clock starts) are ``COPY``'d into the ledger of an empty database, a transaction per 5,000 as the
    writer commits them, with the same indexes, foreign key and spend-totals trigger. This is the honest
    floor: the writer cannot store an event for less, and PostgreSQL is its critical path
    (docs/benchmarks.md, the profile). Kafka's raw consume rate would be a far looser bound, several times
    the writer's, so a ratio against it would hide where the time goes; against the COPY, the ratio is what
    polling, decoding, committing offsets and sealing cost on top of storing.
    """
    import psycopg

    from caracald.consumers.ledger_writer import COLUMNS, ledger_row

    url = env.database("throughput_copy")
    now = datetime.now(UTC)
    lines = [ledger_row(payload)[1] for payload in payloads]
    with psycopg.connect(url, autocommit=True, options="-c synchronous_commit=on") as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO agents (agent_id, name, owner, status, created_at, updated_at) "
                "VALUES (%s, %s, 'drill@example.com', 'active', %s, %s)",
                [(a, f"drill-agent-{i}", now, now) for i, a in enumerate(agents)],
            )
        statement = f"COPY ledger_events ({', '.join(COLUMNS)}) FROM STDIN"
        started = time.perf_counter()
        for at in range(0, len(lines), 5000):
            with conn.transaction(), conn.cursor() as cur, cur.copy(statement) as copy:
                copy.write(b"".join(lines[at : at + 5000]))
        seconds = time.perf_counter() - started
    return len(lines) / seconds


def _ledger_digest(url: str) -> tuple[int, Decimal, int, Decimal]:
    """What a replay must not change: the rows and their amounts, and the spend totals kept from them."""
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM ledger_events), (SELECT coalesce(sum(cost), 0) FROM ledger_events),"
            " (SELECT coalesce(sum(ledger_events), 0) FROM spend_totals),"
            " (SELECT coalesce(sum(total), 0) FROM spend_totals)"
        ).fetchone()
    assert row is not None
    return int(row[0]), Decimal(row[1]), int(row[2]), Decimal(row[3])


def _replay_reset(env: DrillEnv, url: str, group: str, topic: str, at: datetime) -> float:
    """``caracal replay start ... --execute`` as an operator types it; its wall time."""
    argv = [
        str(BIN / "caracal"),
        "--database-url",
        url,
        "--actor",
        "drill",
        "replay",
        "start",
        "--from-timestamp",
        at.isoformat(),
        "--consumer-group",
        group,
        "--topic",
        topic,
        "--execute",
        "--yes",
    ]
    cli_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CARACAL")},
        "CARACAL__BUS__KIND": "kafka",
        "CARACAL_KAFKA_BOOTSTRAP_SERVERS": env.kafka.bootstrap_servers,
    }
    deadline = time.monotonic() + 60
    while True:
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=cli_env, timeout=120, check=False)
        seconds = time.perf_counter() - started
        if done.returncode == 0:
            return seconds
        # The writer that just left may still be listed as a member for a moment: Kafka refuses until then.
        if "live members" not in done.stderr or time.monotonic() > deadline:
            raise RuntimeError(f"caracal replay start exited {done.returncode}: {done.stderr.strip()[-300:]}")
        time.sleep(1.0)


# -- verify-range and verify-event -------------------------------------------------------------------------


def integrity_rows(env: DrillEnv, sizes: Sizes) -> list[Row]:
    import psycopg

    import bench.merkle_bench as mb

    url = env.database("throughput_merkle")
    with psycopg.connect(url) as conn:
        trusted = mb.load_and_seal(conn, sizes.verify_events)
        wall, client, server_cpu, events = mb.verify_range(conn, trusted)
        scan_seconds, scanned = _scan(conn)
        ids = [r[0] for r in conn.execute("SELECT event_id FROM ledger_events").fetchall()]
        conn.rollback()
    rate, scan_rate = events / wall, scanned / scan_seconds
    # What the two processes (verifier, PostgreSQL backend) would give with a core each: the load-free figure.
    cores = f"; {events / max(client, server_cpu):,.0f}/s from CPU time on 2 free cores" if server_cpu else ""
    rows = [
        report.target(
            DRILL,
            f"verify-range throughput, {events:,} sealed events read from PostgreSQL (best of 2)",
            f"{rate:,.0f} events/s ({wall:.2f} s{cores})",
            rate >= mb.VERIFY_TARGET,
            f">= {mb.VERIFY_TARGET:,} events/s",
            baseline=f"sequential read of the same rows {scan_rate:,.0f} rows/s",
            ratio=report.ratio(rate, scan_rate),
        )
    ]
    sample = random.Random(env.seed).sample(ids, min(sizes.verify_samples, len(ids)))
    measure = f"verify-event latency p50 ({len(sample):,} events)"
    try:
        latencies, _, _ = mb.verify_event_latencies(url, trusted, sample)
        lookups = _lookups(url, sample)
    except FAILURES as exc:
        return [*rows, _failed(measure, f"<= {mb.EVENT_TARGET_MS:g} ms", exc)]
    p50, p99 = statistics.median(latencies), latencies[max(int(len(latencies) * 0.99) - 1, 0)]
    floor = statistics.median(lookups)
    rows.append(
        report.target(
            DRILL,
            measure,
            f"{p50:.2f} ms (p99 {p99:.2f} ms)",
            p50 <= mb.EVENT_TARGET_MS,
            f"<= {mb.EVENT_TARGET_MS:g} ms",
            baseline=f"primary-key read of the event {floor:.2f} ms",
            ratio=report.ratio(p50, floor),
        )
    )
    return rows


def _scan(conn: Any, runs: int = 2) -> tuple[float, int]:
    """A plain sequential read of every ledger row to the client (binary COPY), best of ``runs``."""
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy("COPY ledger_events TO STDOUT (FORMAT binary)") as copy:
            for _block in copy:
                pass
        best = min(best, time.perf_counter() - started)
    conn.rollback()
    row = conn.execute("SELECT count(*) FROM ledger_events").fetchone()
    conn.rollback()
    return best, int(row[0])


def _lookups(url: str, sample: list[int]) -> list[float]:
    """Each event read by its key, on an autocommit connection as verify_event's: latencies in ms."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        query = "SELECT * FROM ledger_events WHERE event_id = %s"
        for event_id in sample[:10]:  # prepared after a few runs, as verify_event's statement
            conn.execute(query, (event_id,)).fetchone()
        latencies = []
        for event_id in sample:
            started = time.perf_counter()
            conn.execute(query, (event_id,)).fetchone()
            latencies.append((time.perf_counter() - started) * 1000)
    return latencies


# -- the CLI's start -----------------------------------------------------------------------------------------


def cli_rows(env: DrillEnv, sizes: Sizes) -> list[Row]:
    # No CARACAL_* settings reach it (--help reads no configuration anyway); a fixed width for rich.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CARACAL")} | {"COLUMNS": "100"}
    caracal = [str(BIN / "caracal"), "--help"]
    python = [sys.executable, "-c", "pass"]
    ours: list[float] = []
    floor: list[float] = []
    for i in range(sizes.cli_runs + 1):  # the first of each warms the page cache and is not counted
        for argv, into in ((caracal, ours), (python, floor)):
            started = time.perf_counter()
            subprocess.run(argv, capture_output=True, env=clean, timeout=60, check=True)
            if i:
                into.append(time.perf_counter() - started)
    value, base = statistics.median(ours), statistics.median(floor)
    return [
        report.info(
            DRILL,
            f"CLI start: `caracal --help`, median of {sizes.cli_runs} (there is no --version)",
            _ms(value),
            target=NO_TARGET,
            baseline=f"`python -c pass` {_ms(base)}",
            ratio=report.ratio(value, base),
        )
    ]


# -- the dashboard -------------------------------------------------------------------------------------------


def tui_rows(env: DrillEnv, sizes: Sizes) -> list[Row]:
    import bench.tui_bench as tb
    from caracal_ops.cli.context import CliState
    from caracal_tui.live import LiveSource

    url = env.database("throughput_tui")
    tb.populate(url, sizes.tui_agents)
    measured = asyncio.run(
        tb.measure(lambda: LiveSource(CliState(database_url=url, actor="drill")), sizes.tui_refreshes)
    )
    empty_first, empty_refresh = asyncio.run(_empty_app(sizes.tui_refreshes))
    first = float(measured["first_paint"])  # type: ignore[arg-type]
    refresh = float(measured["refresh_p50"])  # type: ignore[arg-type]
    agents = f"{sizes.tui_agents:,} agents in PostgreSQL"
    return [
        report.target(
            DRILL,
            f"TUI first paint, Agents view, {agents}",
            _ms(first),
            first < 1.0,
            "< 1 s",
            baseline=f"empty Textual app's first frame {_ms(empty_first)}",
            ratio=report.ratio(first, empty_first),
        ),
        report.target(
            DRILL,
            f"TUI refresh p50 ({sizes.tui_refreshes} refreshes), {agents}",
            f"{_ms(refresh)} (queries {_ms(float(measured['fetch_p50']))})",  # type: ignore[arg-type]
            refresh < 0.1,
            "< 100 ms",
            baseline=f"empty Textual app's refresh {_ms(empty_refresh)}",
            ratio=report.ratio(refresh, empty_refresh),
        ),
    ]


async def _empty_app(refreshes: int) -> tuple[float, float]:
    """An empty Textual app at the dashboard's size: its first frame, and the median of a refresh with nothing
    to fetch or draw (the dashboard's path: a worker thread, a hop back to the UI thread, a widget updated),
    waited for as ``tui_bench`` waits for the dashboard's."""
    from textual.app import App, ComposeResult
    from textual.widgets import Static

    import bench.tui_bench as tb

    class Empty(App[None]):
        drawn = 0

        def compose(self) -> ComposeResult:
            yield Static("")

        def refresh_now(self) -> None:
            self.run_worker(self._fetch, thread=True)

        def _fetch(self) -> None:
            self.call_from_thread(self._draw)

        def _draw(self) -> None:
            self.query_one(Static).update(str(self.drawn))
            self.drawn += 1

    started = time.perf_counter()
    app = Empty()
    async with app.run_test(size=tb.SIZE) as pilot:
        first = time.perf_counter() - started
        await pilot.pause(0.2)
        walls = []
        for _ in range(refreshes):
            before = app.drawn
            begun = time.perf_counter()
            app.refresh_now()
            while app.drawn == before:  # noqa: ASYNC110 - as tui_bench polls the dashboard
                await asyncio.sleep(0.002)
            walls.append(time.perf_counter() - begun)
            await pilot.pause()
    return first, statistics.median(walls)


# -- alone ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _services(args: argparse.Namespace) -> Iterator[DrillEnv]:
    from bench.drills.env import start

    env = start(
        postgres_uri=args.postgres_uri,
        redis_url=args.redis_url,
        kafka_bootstrap=args.kafka_bootstrap,
        quick=args.quick,
        seed=args.seed,
    )
    try:
        yield env
    finally:
        env.close()
        from tests.harness import stop_all

        stop_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about 3 minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--postgres-uri", help="a running PostgreSQL (superuser URI)")
    parser.add_argument("--redis-url", help="a running Redis")
    parser.add_argument("--kafka-bootstrap", help="a running Kafka broker")
    args = parser.parse_args(argv)
    with _services(args) as env:
        started = time.monotonic()
        load = os.getloadavg()[0]
        rows = run(env)
        print()
        print(report.markdown(rows))
        print(
            f"\nthroughput drill: {time.monotonic() - started:.0f} s; load average (1 min) {load:.2f} at the "
            f"start, {os.getloadavg()[0]:.2f} at the end, on {os.cpu_count()} CPUs"
        )
    return 1 if report.broken(rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
