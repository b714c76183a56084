"""Crash drill: ``kill -9`` of every daemon, at random moments, while agents keep calling.

Under a steady load (callers spread over both gateways, budgets large enough never to refuse), each daemon
of the deployment (both gateway processes, the ledger writer, the metrics aggregator, the audit logger) is
killed with SIGKILL ``kills_per_daemon`` times, in a shuffled order, at random intervals; the local platform
starts it again after a random pause, so kills also land while a daemon is starting, and several daemons can
be down at once. Then the load stops, the holds of the calls a killed gateway never settled expire (their
time to live, then the surviving gateways' expiry sweep), the consumers drain the bus, and the books are
audited (:mod:`bench.drills.accounting`): lost events, duplicated effects, holds left open in the ledger and
in Redis, the aggregator's counts; then ``caracal merkle verify-range`` over the whole ledger.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from bench.drills import report
from bench.drills.accounting import Accounting, account, wait_drained
from bench.drills.deployment import Agent, Deployment
from bench.drills.load import Reply, SteadyLoad, statuses
from caracald.budget.redis_backend import RedisBudget

DRILL = "crash"
RECOVERED = re.compile(r"recovered (\d+) journalled charge")
CALLERS = 12


def make_agents(deployment: Deployment) -> list[Agent]:
    """Two parents with five children each, all with budgets the drill cannot exhaust."""
    agents = []
    for _ in range(2):
        parent = deployment.agent(limit=Decimal(100_000))
        agents += [deployment.agent(limit=Decimal(10_000), parent=parent) for _ in range(5)]
    return agents


def redis_holds(deployment: Deployment) -> int:
    async def count() -> int:
        budget = RedisBudget.from_url(deployment.env.redis.url)
        try:
            return await budget.holds_in_flight()
        finally:
            await budget.close()

    return asyncio.run(count())


def journal_recoveries(deployment: Deployment) -> int:
    """Charges found unrecorded in a killed gateway's journal and recorded by the next (from the logs)."""
    total = 0
    for name in deployment.members:
        if name.startswith("gateway"):
            total += sum(int(n) for n in RECOVERED.findall(deployment.log(name, 1_000_000)))
    return total


def verify_range(deployment: Deployment, since: datetime) -> tuple[bool, str]:
    """``caracal merkle verify-range`` from ``since`` to now: (PASSED, what it printed)."""
    done = deployment.cli(
        "merkle", "verify-range", "--start-time", since.isoformat(), "-o", "json", check=False, timeout=600
    )
    try:
        verdict = json.loads(done.stdout)
    except ValueError:
        return False, (done.stdout + done.stderr).strip()[-300:]
    passed = done.returncode == 0 and verdict.get("integrity") == "PASSED"
    return passed, f"{verdict.get('integrity')}: {verdict.get('events_checked', 0):,} events, " + (
        f"{verdict.get('batches_checked', 0):,} batches"
    )


def audit(
    deployment: Deployment, drill: str, agents: list[Agent], replies: list[Reply], since: datetime
) -> tuple[float, Accounting, list[report.Row]]:
    """Every daemon up, every hold past its time to live, the bus drained; then the books' invariants:
    (the seconds that took, the books, their rows)."""
    began = time.monotonic()
    deployment.wait_healthy()
    # a hold admitted just before its gateway died expires after its time to live; the sweep runs every ttl/10
    time.sleep(deployment.hold_ttl_seconds * 1.3 + 2)
    wait_drained(deployment, [a.agent_id for a in agents])
    took = time.monotonic() - began
    books = account(deployment, [a.agent_id for a in agents], replies)
    holds = redis_holds(deployment)
    passed, verdict = verify_range(deployment, since)
    for problem in (books.lost + books.duplicated + books.aggregate_mismatches)[:10]:
        print(f"  problem: {problem}", flush=True)
    return (
        took,
        books,
        [
            report.invariant(drill, "lost events", len(books.lost), not books.lost, "0"),
            report.invariant(drill, "duplicated events", len(books.duplicated), not books.duplicated, "0"),
            report.invariant(
                drill,
                "holds left open after expiry (ledger / Redis)",
                f"{books.open_holds_ledger} / {holds}",
                books.open_holds_ledger == 0 and holds == 0,
                "0 / 0",
            ),
            report.invariant(
                drill,
                "aggregator counts = ledger",
                len(books.aggregate_mismatches) or "equal",
                not books.aggregate_mismatches,
                "equal",
            ),
            report.invariant(drill, "merkle verify-range", verdict, passed, "PASSED"),
        ],
    )


def run(deployment: Deployment, *, kills_per_daemon: int = 20, seed: int = 0) -> list[report.Row]:
    rng = random.Random(seed)
    agents = make_agents(deployment)
    deployment.wait_cached()
    since = datetime.now(UTC) - timedelta(minutes=1)
    plan = [name for name in deployment.members for _ in range(kills_per_daemon)]
    rng.shuffle(plan)
    kills: Counter[str] = Counter()
    restarts: list[tuple[float, str]] = []  # (when, daemon)
    load = SteadyLoad(deployment.gateway_urls, agents, callers=CALLERS, seed=seed).start()
    began = time.monotonic()
    try:
        time.sleep(2)
        while plan or restarts:
            now = time.monotonic()
            for due, name in [r for r in restarts if r[0] <= now]:
                restarts.remove((due, name))
                deployment.restart(name)
            down = {name for _, name in restarts}
            ready = [name for name in plan if name not in down]
            if ready:
                name = ready[0]
                plan.remove(name)
                if deployment.kill(name) is not None:
                    kills[name] += 1
                restarts.append((time.monotonic() + rng.uniform(0.2, 2.0), name))
                time.sleep(rng.uniform(0.2, 1.2))
            else:
                time.sleep(0.05)
        kill_seconds = time.monotonic() - began
        time.sleep(3)  # the load goes on a little while everything is back
    finally:
        replies = load.stop()
    print(
        f"  {sum(kills.values())} kills in {kill_seconds:.0f} s; calls {dict(statuses(replies))}", flush=True
    )
    recovery, books, checks = audit(deployment, DRILL, agents, replies, since)
    fewest = min(kills.values()) if kills else 0
    return [
        report.invariant(
            DRILL,
            "kill -9 per daemon (2 gateways, 3 consumers)",
            ", ".join(f"{name} {n}" for name, n in sorted(kills.items())),
            fewest >= kills_per_daemon,
            f">= {kills_per_daemon} each",
        ),
        report.info(
            DRILL,
            "calls during the kills",
            f"{len(replies):,}: {books.admitted_calls:,} admitted, "
            f"{sum(r.status == 0 for r in replies):,} unanswered (gateway down)",
        ),
        report.info(
            DRILL, "events on the bus / in the ledger", f"{books.bus_events:,} / {books.ledger_events:,}"
        ),
        *checks,
        report.info(DRILL, "dead letters", books.dead_letters),
        report.info(
            DRILL, "charges recorded from a killed gateway's journal", journal_recoveries(deployment)
        ),
        report.info(DRILL, "back to clean books after the last kill", f"{recovery:.0f} s"),
    ]
