"""Ledger integrity: seal a million events into signed Merkle batches, then time verifying them.

    python bench/merkle_bench.py                      # 1,000,000 events
    python bench/merkle_bench.py --events 200000      # a quicker run

Without ``--database-url`` (or ``CARACAL_DATABASE_URL``) it starts a throw-away PostgreSQL with the test
harness (``fsync=off``). Each run uses a new database. Steps and what is printed:

1. insert the events with ``COPY`` (the fast path; as superuser, foreign key triggers are skipped);
2. seal them all (``seal_pending`` with batches of 1,000): events/s, and the signing cost per batch;
3. ``verify_range`` over everything, rows streamed from PostgreSQL (best of two runs): events/s (target
   250,000/s), with the CPU seconds of the verifier and of the PostgreSQL server (every backend: the
   verifier's and its helper sessions');
4. ``verify_event`` for 1,000 random events on an autocommit connection (one statement each, as a service
   answering proof requests would hold it): p50 and p99 latency (target 2 ms), CPU per event.

The machine's load average is printed before each timed step: on a shared machine the numbers mean little
without it.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from caracald.core.signing import KeyAlgorithm, VerifyingKey, generate_key  # noqa: E402
from caracald.integrity import keys, sealer, verifier  # noqa: E402
from caracald.store.migrate import migrate  # noqa: E402

VERIFY_TARGET = 250_000
EVENT_TARGET_MS = 2.0

_NULL = "\\N"
_COPY = (
    "COPY ledger_events (idempotency_key, event_type, agent_id, request_id, occurred_at, resource, model,"
    " input_tokens, output_tokens, cached_input_tokens, cost, currency, metadata) FROM STDIN"
)


def _database(url: str | None) -> tuple[str, object | None]:
    if url:
        return url, None
    from tests.harness.postgres import PostgresService

    service = PostgresService.start()
    name = f"merkle_bench_{uuid.uuid4().hex[:8]}"
    return service.create_database(name), service


def _insert(conn: psycopg.Connection[tuple[object, ...]], count: int) -> float:
    agents = [uuid.uuid4() for _ in range(20)]
    now = datetime.now(UTC)
    with conn.cursor() as cur:
        for i, agent in enumerate(agents):
            cur.execute(
                "INSERT INTO agents (agent_id, name, owner, status, created_at, updated_at)"
                " VALUES (%s, %s, 'bench@example.com', 'active', %s, %s)",
                (agent, f"bench-{i}-{agent.hex[:6]}", now, now),
            )
    conn.commit()
    with conn.cursor() as cur:
        try:
            cur.execute("SET session_replication_role = replica")  # skip the agent foreign key checks
        except psycopg.Error:
            conn.rollback()
    start = datetime(2025, 1, 1, tzinfo=UTC)
    started = time.perf_counter()
    with conn.cursor() as cur, cur.copy(_COPY) as copy:
        lines: list[str] = []
        for i in range(count):
            settled = i % 2 == 1
            tokens_in, tokens_out = random.randint(10, 4000), random.randint(1, 2000)
            cost = f"{(tokens_in * 3 + tokens_out * 15) / 1_000_000:.8f}" if settled else "0"
            occurred = (start + timedelta(milliseconds=i)).isoformat()
            lines.append(
                f"{uuid.uuid4()}\t{'settlement' if settled else 'reservation'}\t{agents[i % len(agents)]}\t"
                f"{uuid.uuid4()}\t{occurred}\thttps://api.openai.com/v1/chat/completions\tgpt-4o-mini\t"
                f"{tokens_in if settled else _NULL}\t{tokens_out if settled else _NULL}\t{_NULL}\t"
                f"{cost}\tUSD\t"
                f'{{"policy_ids": ["{agents[0]}"], "hold": "0.05"}}\n'
            )
            if len(lines) == 20_000:
                copy.write("".join(lines))
                lines = []
        if lines:
            copy.write("".join(lines))
    conn.commit()
    with conn.cursor() as cur:
        cur.execute("RESET session_replication_role")
    conn.commit()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=1000, help="events for the verify-event latency")
    parser.add_argument("--database-url", default=os.environ.get("CARACAL_DATABASE_URL"))
    parser.add_argument("--algorithm", default="ed25519", choices=["ed25519", "ecdsa-p256"])
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="verify what --database-url already holds (sealed by a run before)",
    )
    args = parser.parse_args(argv)

    url, service = _database(args.database_url)
    print(f"load average at start: {_load()}")
    try:
        migrate(url)
        with psycopg.connect(url) as conn:
            if args.reuse:
                with conn.cursor() as cur:
                    texts = [r[0] for r in cur.execute("SELECT public_key FROM merkle_keys").fetchall()]
                trusted = [VerifyingKey.from_text(t) for t in texts]
                conn.rollback()
            else:
                trusted = _load_and_seal(conn, args)

            print(f"load average before verify-range: {_load()}")
            wall, client, server_cpu, events = verify_range(conn, trusted)
            rate = events / wall
            verdict = "meets" if rate >= VERIFY_TARGET else "misses"
            print(
                f"verify-range:    {events:>10,} events in {wall:7.2f} s = {rate:>10,.0f}/s"
                f" ({verdict} the {VERIFY_TARGET:,}/s target)"
            )
            if server_cpu is not None:
                per_event = (client + server_cpu) / events * 1e6
                cores = os.cpu_count() or 1
                print(
                    f"  CPU: verifier {client:.2f} s, PostgreSQL {server_cpu:.2f} s (every server process):"
                    f" {per_event:.2f} us per event in all, so at most"
                    f" {events / (client + server_cpu) * cores:,.0f}/s on {cores} free cores"
                )

            with conn.cursor() as cur:
                ids = [r[0] for r in cur.execute("SELECT event_id FROM ledger_events").fetchall()]
            conn.rollback()
            _verify_events(url, trusted, random.sample(ids, min(args.samples, len(ids))))
    finally:
        if service is not None:
            service.stop()  # type: ignore[attr-defined]
    return 0


def verify_range(
    conn: psycopg.Connection[tuple[object, ...]], trusted: list[VerifyingKey], runs: int = 2
) -> tuple[float, float, float | None, int]:
    """``verify_all`` over the whole ledger, best of ``runs``: (wall seconds, verifier CPU seconds,
    PostgreSQL server CPU seconds or None, events checked)."""
    postmaster = _postmaster_pid(conn)
    best: tuple[float, float, float | None] | None = None
    for _ in range(runs):
        client0, server0 = time.process_time(), _server_cpu(postmaster)
        report = verifier.verify_all(conn, trusted)
        client, server = time.process_time() - client0, _server_cpu(postmaster)
        conn.rollback()
        assert report.ok, report.first_problem
        server_cpu = server - server0 if server is not None and server0 is not None else None
        if best is None or report.seconds < best[0]:
            best = (report.seconds, client, server_cpu)
    assert best is not None
    return (*best, report.events_checked)


def verify_event_latencies(
    url: str, trusted: list[VerifyingKey], sample: list[int]
) -> tuple[list[float], float, float | None]:
    """``verify_event`` for each event of ``sample`` on one autocommit connection: (latencies in ms, sorted;
    verifier CPU seconds; PostgreSQL backend CPU seconds or None)."""
    with psycopg.connect(url, autocommit=True) as conn:
        backend = conn.info.backend_pid
        for event_id in sample[:10]:  # the statement is prepared after a few runs, as in a long-lived service
            verifier.verify_event(conn, event_id, trusted)
        latencies = []
        client0, server0 = time.process_time(), _backend_cpu(backend)
        for event_id in sample:
            started = time.perf_counter()
            report = verifier.verify_event(conn, event_id, trusted)
            latencies.append((time.perf_counter() - started) * 1000)
            assert report.ok, report.first_problem
        client, server = time.process_time() - client0, _backend_cpu(backend)
    latencies.sort()
    server_cpu = server - server0 if server is not None and server0 is not None else None
    return latencies, client, server_cpu


def _verify_events(url: str, trusted: list[VerifyingKey], sample: list[int]) -> None:
    print(f"load average before verify-event: {_load()}")
    latencies, client, server_cpu = verify_event_latencies(url, trusted, sample)
    p50 = statistics.median(latencies)
    p99 = latencies[max(int(len(latencies) * 0.99) - 1, 0)]
    verdict = "meets" if p50 <= EVENT_TARGET_MS else "misses"
    verdict99 = "meets" if p99 <= EVENT_TARGET_MS else "misses"
    print(
        f"verify-event:    p50 {p50:.2f} ms ({verdict} the {EVENT_TARGET_MS} ms target),"
        f" p99 {p99:.2f} ms ({verdict99} it) over {len(latencies):,} events"
    )
    if server_cpu is not None:
        print(
            f"  CPU per event: verifier {client / len(latencies) * 1000:.2f} ms,"
            f" PostgreSQL {server_cpu / len(latencies) * 1000:.2f} ms"
        )


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f} (1, 5, 15 min) on {os.cpu_count()} CPUs"


def _postmaster_pid(conn: psycopg.Connection[tuple[object, ...]]) -> int | None:
    """The server's main process, when it runs on this machine."""
    row = conn.execute("SELECT current_setting('data_directory')").fetchone()
    try:
        return int((Path(str(row[0] if row else "")) / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _server_cpu(postmaster: int | None) -> float | None:
    """CPU seconds used so far by the whole server: every process it runs now (the verifier's backend and
    its helper sessions among them) and those that ended (counted into the postmaster when it reaps them)."""
    if postmaster is None:
        return None
    try:
        fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    except OSError:
        return None
    ticks = sum(int(f) for f in fields[11:15])  # its own time and its reaped children's
    total = ticks / os.sysconf("SC_CLK_TCK")
    for child in children:
        total += _backend_cpu(int(child)) or 0.0
    return total


def _backend_cpu(pid: int) -> float | None:
    """CPU seconds the PostgreSQL backend used so far (when it runs on this machine)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load_and_seal(
    conn: psycopg.Connection[tuple[object, ...]], args: argparse.Namespace
) -> list[VerifyingKey]:
    return load_and_seal(conn, args.events, batch_size=args.batch_size, algorithm=args.algorithm)


def load_and_seal(
    conn: psycopg.Connection[tuple[object, ...]],
    events: int,
    *,
    batch_size: int = 1000,
    algorithm: KeyAlgorithm = "ed25519",
) -> list[VerifyingKey]:
    """Insert ``events`` events and seal them all in batches of ``batch_size`` under a new key; its key."""
    seconds = _insert(conn, events)
    print(f"insert (COPY):   {events:>10,} events in {seconds:7.2f} s = {events / seconds:>10,.0f}/s")

    key = generate_key(keys.new_key_name(), algorithm)
    with tempfile.TemporaryDirectory() as key_dir:
        keys.write_key_files(Path(key_dir), key)
    keys.register(conn, key.public(), datetime.now(UTC))
    conn.commit()

    print(f"load average before seal: {_load()}")
    started, cpu0 = time.perf_counter(), time.process_time()
    result = sealer.seal_pending(conn, key, max_batch=batch_size, max_age=timedelta(0))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu0
    signing = sorted(b.signing_seconds for b in result.batches)
    per_batch = [b.seconds for b in result.batches]
    print(
        f"seal:            {result.events:>10,} events in {seconds:7.2f} s"
        f" = {result.events / seconds:>10,.0f}/s"
        f" ({len(result.batches):,} batches, {statistics.mean(per_batch) * 1000:.1f} ms each;"
        f" sealer CPU {cpu:.2f} s)"
    )
    p99 = signing[int(len(signing) * 0.99) - 1]
    print(
        f"signing ({algorithm}): median {statistics.median(signing) * 1e6:.1f} us per batch"
        f" (mean {statistics.mean(signing) * 1e6:.1f} us, p99 {p99 * 1e6:.1f} us)"
    )
    conn.autocommit = True
    conn.execute("VACUUM ANALYZE ledger_events")
    conn.execute("VACUUM ANALYZE merkle_batches")
    conn.autocommit = False
    return [key.public()]


if __name__ == "__main__":
    sys.exit(main())
