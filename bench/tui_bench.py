"""The dashboard's first paint and refresh time with 1,000 agents: from the fake source, from real PostgreSQL.

    .venv/bin/python bench/tui_bench.py                       # fake source, then a throw-away PostgreSQL
    .venv/bin/python bench/tui_bench.py --database-url postgresql://...   # an existing (empty) database
    .venv/bin/python bench/tui_bench.py --fake-only

The app runs headless at 160x48 and opens on the Agents view (the one that grows with the agents). Measured:

* first paint: from starting the app until the Agents view has drawn its first snapshot (every agent with
  its budgets) on screen, and until the first frame at all;
* refresh: from asking for a refresh (``r``) until the new snapshot is drawn, repeated; split into the
  source's part (in a worker thread: the queries), the drawing (on the UI thread: the view takes the snapshot)
  and the paint (on the UI thread: until the frame that shows it is composed, where the table lays out its
  lines). "Drawn" is that frame: the app records a refresh's timing only once it is composed.

The PostgreSQL run creates 1,000 agents (a tenth delegated under others), a daily policy each and a monthly
one for every third, 100 ledger events per agent in the current day and one per agent and hour in the 30 days
before (``--history-days``), all sealed into Merkle batches as a running deployment's are. Not part of the
test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from caracal_ops.cli.context import CliState
from caracal_tui.app import CaracalApp
from caracal_tui.fake import FakeSource
from caracal_tui.live import LiveSource
from caracal_tui.sources import DataSource
from caracald.admin import agents as agent_admin
from caracald.admin import policies as policy_admin
from caracald.core.ledger import LedgerEvent, LedgerEventType
from caracald.core.money import Money
from caracald.core.signing import generate_key
from caracald.integrity import keys, sealer
from caracald.store import ledger as ledger_store
from caracald.store.database import Database
from caracald.store.migrate import migrate

AGENTS = 1000
#: A month of past spend: a monthly budget then sums weeks of totals, as it does in a real deployment.
HISTORY_DAYS = 30
SIZE = (160, 48)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(make_source: Callable[[], DataSource], refreshes: int) -> dict[str, object]:
    started = time.perf_counter()
    app = CaracalApp(make_source(), refresh_seconds=0, initial_view="agents", strict=True)
    first_frame: float | None = None
    async with app.run_test(size=SIZE) as pilot:
        first_frame = time.perf_counter() - started
        while not any(t.view == "agents" and t.key == "agents" for t in app.timings):
            if app.screen.last_error:  # type: ignore[attr-defined]
                raise SystemExit(f"the agents did not load: {app.screen.last_error}")  # type: ignore[attr-defined]
            await pilot.pause(0.001)
        first_paint = time.perf_counter() - started
        first = next(t for t in app.timings if t.key == "agents")
        await pilot.pause(0.2)
        walls, fetches, renders, paints, fetch_cpu, render_cpu, paint_cpu = [], [], [], [], [], [], []
        for _ in range(refreshes):
            before = len(app.timings)
            begun = time.perf_counter()
            app.refresh_now()  # what ``r`` and the timer call
            while not any(t.key == "agents" for t in list(app.timings)[before:]):  # noqa: ASYNC110 - a list, no event
                # Poll without running the app's message pump a thousand times a second: that busy loop
                # holds the GIL against the worker thread the source runs in, which no operator's terminal
                # does. 2 ms of resolution is plenty against a 100 ms target.
                await asyncio.sleep(0.002)
            walls.append(time.perf_counter() - begun)
            timing = next(t for t in list(app.timings)[before:] if t.key == "agents")
            fetches.append(timing.fetch_seconds)
            renders.append(timing.render_seconds)
            paints.append(timing.paint_seconds)
            fetch_cpu.append(timing.fetch_cpu)
            render_cpu.append(timing.render_cpu)
            paint_cpu.append(timing.paint_cpu)
            while not app.idle:
                await pilot.pause(0.001)
        rows = app.screen.query_one("#agents").row_count  # type: ignore[attr-defined]
    return {
        "rows": rows,
        "first_frame": first_frame,
        "first_paint": first_paint,
        "first_fetch": first.fetch_seconds,
        "first_render": first.render_seconds,
        "refresh_p50": statistics.median(walls),
        "refresh_p95": pct(walls, 0.95),
        "fetch_p50": statistics.median(fetches),
        "render_p50": statistics.median(renders),
        "render_p95": pct(renders, 0.95),
        "paint_p50": statistics.median(paints),
        "fetch_cpu_p50": statistics.median(fetch_cpu),
        "render_cpu_p50": statistics.median(render_cpu),
        "paint_cpu_p50": statistics.median(paint_cpu),
        "first_fetch_cpu": first.fetch_cpu,
        "first_render_cpu": first.render_cpu,
    }


def report(label: str, result: dict[str, object]) -> None:
    ms = {k: v * 1000 for k, v in result.items() if isinstance(v, float)}
    print(f"{label}: {result['rows']} rows")
    print(
        f"  first paint {ms['first_paint']:7.1f} ms  (first frame {ms['first_frame']:.1f} ms; "
        f"source {ms['first_fetch']:.1f} ms, drawing {ms['first_render']:.1f} ms)"
    )
    print(
        f"  refresh     p50 {ms['refresh_p50']:6.1f} ms  p95 {ms['refresh_p95']:6.1f} ms  "
        f"(source p50 {ms['fetch_p50']:.1f} ms; "
        f"drawing p50 {ms['render_p50']:.1f} ms, p95 {ms['render_p95']:.1f} ms; "
        f"paint p50 {ms['paint_p50']:.1f} ms)"
    )
    print(
        f"  CPU time    refresh: source {ms['fetch_cpu_p50']:.1f} ms"
        f" + drawing {ms['render_cpu_p50']:.1f} ms + paint {ms['paint_cpu_p50']:.1f} ms; "
        f"first load: source {ms['first_fetch_cpu']:.1f} ms + drawing {ms['first_render_cpu']:.1f} ms"
    )


def populate(url: str, agents: int = AGENTS, history_days: int = HISTORY_DAYS) -> None:
    """Fill the database with ``agents`` agents, unless it holds them already (a database filled by an earlier
    run): 100 events each in the current day, and one an hour in the ``history_days`` before it."""
    migrate(url)
    now = datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    with Database(url) as db:
        with db.read() as conn:
            row = conn.execute("SELECT count(*) AS n FROM agents").fetchone()
        if row is not None and int(row["n"]) >= agents:
            print(f"(the database already holds {row['n']} agents: used as it is)")
            return
        ids: list[uuid.UUID] = []
        for index in range(agents):
            parent = ids[index % 50] if index >= 100 and index % 10 == 0 else None
            created = agent_admin.create_agent(
                db,
                name=f"agent-{index:04d}",
                owner=f"team-{index % 20}@example.com",
                actor="bench",
                parent_id=parent,
            )
            ids.append(created.agent.agent_id)
        for index, agent_id in enumerate(ids):
            limit = "1000000" if index < 100 else "500"
            terms = policy_admin.parse_terms(limit, "USD", "daily", "calendar", "UTC")
            policy_admin.create_policy(db, agent_id, terms, change_reason="bench", actor="bench")
            if index % 3 == 0 and index >= 100:
                monthly = policy_admin.parse_terms("5000", "USD", "monthly", "calendar", "UTC")
                policy_admin.create_policy(db, agent_id, monthly, change_reason="bench", actor="bench")
        seconds = max(int((now - day).total_seconds()) - 1, 1)
        for start in range(0, len(ids), 100):
            events = [
                LedgerEvent(
                    uuid.uuid4(),
                    LedgerEventType.SETTLEMENT,
                    agent_id,
                    day + timedelta(seconds=(n * 7919 + i) % seconds),
                    Money(Decimal("0.0125"), "USD"),
                    resource="openai/v1/chat/completions",
                    model="gpt-4o-mini",
                    input_tokens=1000,
                    output_tokens=200,
                    request_id=uuid.uuid4(),
                )
                for i, agent_id in enumerate(ids[start : start + 100])
                for n in range(100)
            ]
            with db.transaction() as conn:
                ledger_store.insert_events(conn, events)
        # The history, as the ledger writer would leave it (the spend totals come from the same trigger);
        # one statement, as a thousand agents' month would take minutes event by event.
        with db.transaction() as conn:
            conn.execute("SET LOCAL statement_timeout = 0")  # a bulk load, not a request
            conn.execute(
                """
                INSERT INTO ledger_events (idempotency_key, event_type, agent_id, request_id, occurred_at,
                                           resource, model, input_tokens, output_tokens, cost, currency)
                SELECT gen_random_uuid(), 'settlement', a.agent_id, gen_random_uuid(),
                       h.hour + make_interval(secs => (abs(hashtext(a.agent_id::text)) %% 3600)),
                       'openai/v1/chat/completions', 'gpt-4o-mini', 1000, 200, 0.0125, 'USD'
                  FROM agents a
                 CROSS JOIN generate_series(%(first)s::timestamptz, %(last)s::timestamptz, '1 hour')
                            AS h(hour)
                """,
                {"first": day - timedelta(days=history_days), "last": day - timedelta(hours=1)},
            )
    # A deployment's ledger is sealed as it is written (the ledger writer places each event in the Merkle
    # tree and a sealer signs the batches): so is this one, or the Overview's sealing probe, which runs with
    # every refresh, would count the whole ledger as waiting each time.
    key = generate_key(keys.new_key_name(), "ed25519")
    with psycopg.connect(url) as conn:
        keys.register(conn, key.public(), datetime.now(UTC))
        conn.commit()
        sealer.seal_pending(conn, key, max_age=timedelta(0))
        conn.commit()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", help="An empty database to fill (default: a throw-away server)")
    parser.add_argument("--fake-only", action="store_true")
    parser.add_argument("--refreshes", type=int, default=20)
    parser.add_argument(
        "--history-days",
        type=int,
        default=HISTORY_DAYS,
        help="Days of past spend (one event per agent and hour) before today's (default: %(default)s)",
    )
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {AGENTS} agents; terminal {SIZE}")

    fake = asyncio.run(measure(lambda: FakeSource(agents=AGENTS, clock=None, live=True), args.refreshes))
    report("fake source (values change on every refresh)", fake)
    if args.fake_only:
        return

    service = None
    url = args.database_url
    if url is None:
        from tests.harness.postgres import PostgresService

        service = PostgresService.start()
        service.create_database("tui_bench")
        url = service.admin_uri("tui_bench")
    try:
        begun = time.perf_counter()
        populate(url, history_days=args.history_days)
        print(
            f"(filled PostgreSQL in {time.perf_counter() - begun:.1f} s: {AGENTS} agents, "
            f"{AGENTS * 100:,} events today and {AGENTS * 24 * args.history_days:,} in the "
            f"{args.history_days} days before, sealed)"
        )
        live = asyncio.run(
            measure(lambda: LiveSource(CliState(database_url=url, actor="bench")), args.refreshes)
        )
        report("PostgreSQL (LiveSource)", live)
    finally:
        if service is not None:
            service.stop()


if __name__ == "__main__":
    main()
