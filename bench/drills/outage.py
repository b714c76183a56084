"""Outage drill: Kafka, Redis and PostgreSQL each stopped for a while (30 s) under load, in turn.

While callers keep calling both gateways (budgets that never refuse), each server is stopped cleanly and
started again after ``seconds``: Kafka (the broker's controlled shutdown), Redis (its append-only file keeps
the counters, as in production) and PostgreSQL (``pg_ctl stop -m fast``). For each outage the drill records
what the callers were answered while the server was down, what the gateways said of themselves (``/health``'s
status, and the depth of their local spool of events from ``/stats``), how long after the server came back the
service was back to normal (calls admitted, every gateway healthy, spools empty), and which daemons exited
(the local platform does not restart a daemon that exits; systemd's ``Restart=`` and Kubernetes do, so the
drill starts those again itself and reports them). Then Redis once more, restarted without its data: the
gateways must refuse until one of them has rebuilt the budget counters from the ledger, and then admit exactly
what a budget has left (checked on a budget that had spent 60 of its 100 calls before); the metrics
aggregator's aggregates, lost with that Redis, are counted again by the runbook's replay procedure. After the
last outage the load stops, the bus drains, and the books are audited as after the crash drill.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx2 as httpx

from bench.drills import report
from bench.drills.accounting import wait_drained
from bench.drills.crash import audit, make_agents
from bench.drills.deployment import FLAT_PRICE, Agent, Deployment
from bench.drills.load import SteadyLoad, burst, statuses

DRILL = "outage"
CALLERS = 8
REDIS_EMPTY = "Redis, restarted without its data"
#: The budget checked across the data loss: what it affords, and what is spent of it before.
TIGHT_CALLS, TIGHT_SPENT = 100, 60
AGGREGATOR, AGGREGATOR_GROUP = "metrics-aggregator", "metrics-aggregator-group"


@dataclass
class Outage:
    server: str
    answers: Counter[str] = field(default_factory=Counter)
    health: Counter[str] = field(default_factory=Counter)
    max_spool: int = 0
    back_after: float | None = None  # seconds from the restart to normal service (see _one)
    exited: list[str] = field(default_factory=list)

    def mode(self) -> str:
        """What the gateway did, in a word: spool (answered, events kept locally), degraded (answered from
        its cache), deny (refused), or a mix."""
        answered = self.answers.get("200", 0)
        total = sum(self.answers.values()) or 1
        if answered / total > 0.9:
            return "spool" if self.max_spool else "degraded" if self.health.get("degraded") else "served"
        return "deny" if answered == 0 else f"partial ({answered / total:.0%} admitted)"


SERVERS = ("Kafka", "Redis", "PostgreSQL", REDIS_EMPTY)


def _controls(deployment: Deployment) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    env = deployment.env

    def lose_redis() -> None:
        env.redis.stop()
        env.redis.forget_data()

    return {
        "Kafka": (env.kafka.stop, env.kafka.start),
        "Redis": (env.redis.stop, env.redis.start),
        "PostgreSQL": (env.postgres.halt, env.postgres.resume),
        REDIS_EMPTY: (lose_redis, env.redis.start),
    }


def rebuild_aggregates(deployment: Deployment, since: datetime) -> str:
    """The runbook's Event Replay Recovery for the metrics aggregator, whose aggregates (and the event ids it
    had counted) lived in the Redis that lost its data: stop it, move its group back to ``since`` (here the
    start of this drill: the aggregates checked are those of its agents), start it again; it counts those
    events once more. What it took."""
    began = time.monotonic()
    deployment.stop(AGGREGATOR)
    deployment.cli(
        "replay",
        "start",
        "--consumer-group",
        AGGREGATOR_GROUP,
        "--from-timestamp",
        since.isoformat(),
        "--execute",
        "--yes",
    )
    deployment.restart(AGGREGATOR)
    deadline = time.monotonic() + 300
    while deployment.lag(AGGREGATOR_GROUP) > 0 and time.monotonic() < deadline:
        time.sleep(1)
    lag = deployment.lag(AGGREGATOR_GROUP)
    took = f"{time.monotonic() - began:.0f} s"
    return f"caught up in {took}" if lag == 0 else f"{lag:,} events still to count after {took}"


def _tight_budget(deployment: Deployment) -> tuple[Agent, int]:
    """An agent that has spent 60 of the 100 calls its budget affords, all of it in the ledger."""
    agent = deployment.agent(limit=FLAT_PRICE * TIGHT_CALLS)
    deployment.wait_cached()
    spent = sum(r.admitted for r in burst(deployment.gateway_urls, [agent] * TIGHT_SPENT))
    wait_drained(deployment, [agent.agent_id])
    return agent, spent


def _probe(deployment: Deployment, outage: Outage | None = None) -> bool:
    """Sample every gateway's ``/health`` and spool into ``outage``; whether all are ok and not spooling."""
    settled = True
    for url in deployment.gateway_urls:
        try:
            health = str(httpx.get(f"{url}/health", timeout=2).json().get("status"))
            stats = httpx.get(f"{url}/stats", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            health, stats = "no answer", {}
        spooled = int(stats.get("spool_bytes") or 0)
        settled = settled and health == "ok" and not stats.get("spooling")
        if outage is not None:
            outage.health[health] += 1
            outage.max_spool = max(outage.max_spool, spooled)
    return settled


def _one(deployment: Deployment, load: SteadyLoad, server: str, seconds: float) -> Outage:
    stop, start = _controls(deployment)[server]
    outage = Outage(server)
    print(f"  stopping {server} for {seconds:.0f} s", flush=True)
    stop()
    down_at = time.monotonic()
    while time.monotonic() - down_at < seconds:
        _probe(deployment, outage)
        time.sleep(1)
    # what the callers got while it was down (the first second excepted: calls already under way)
    outage.answers = statuses([r for r in load.since(down_at + 1) if r.started < time.monotonic()])
    start()
    back = time.monotonic()
    print(f"  {server} is back ({time.monotonic() - down_at:.0f} s after it stopped)", flush=True)
    # back to normal: calls admitted again, every gateway healthy, and nothing left in their spools
    deadline = back + 180
    while time.monotonic() < deadline and outage.back_after is None:
        if any(r.admitted for r in load.since(back)) and _probe(deployment):
            outage.back_after = time.monotonic() - back
        time.sleep(0.2)
    for name in deployment.members:
        if not deployment.members[name].alive():
            outage.exited.append(name)
            deployment.restart(name)
    return outage


def run(deployment: Deployment, *, seconds: float = 30, seed: int = 0) -> list[report.Row]:
    if not deployment.env.managed:
        return [report.info(DRILL, "skipped", "the servers are not the drills' own: they cannot be stopped")]
    agents = make_agents(deployment)
    deployment.wait_cached()
    since = datetime.now(UTC) - timedelta(minutes=1)
    load = SteadyLoad(deployment.gateway_urls, agents, callers=CALLERS, seed=seed).start()
    outages = []
    after_loss: tuple[int, int] | None = None  # (admitted, affordable) on the tight budget after the loss
    aggregates_rebuilt = ""
    try:
        time.sleep(3)
        for server in SERVERS:
            tight = _tight_budget(deployment) if server == REDIS_EMPTY else None
            outages.append(_one(deployment, load, server, seconds))
            if tight is not None:
                agent, spent = tight
                again = burst(deployment.gateway_urls, [agent] * TIGHT_CALLS)
                after_loss = (sum(r.admitted for r in again), TIGHT_CALLS - spent)
            time.sleep(5)
    finally:
        replies = load.stop()
    if after_loss is not None:
        aggregates_rebuilt = rebuild_aggregates(deployment, since)
    drained_in, books, checks = audit(deployment, DRILL, agents, replies, since)
    rows = []
    for outage in outages:
        answers = ", ".join(f"{status} x{n:,}" for status, n in outage.answers.most_common())
        health = ", ".join(f"{status} x{n}" for status, n in outage.health.most_common())
        rows.append(
            report.info(
                DRILL,
                f"{outage.server} down {seconds:.0f} s: gateway answered",
                f"{outage.mode()}: {answers or 'no calls'}; /health {health};"
                f" spool up to {outage.max_spool:,} B",
            )
        )
        back = "never" if outage.back_after is None else f"{max(outage.back_after, 0):.1f} s"
        rows.append(
            report.invariant(
                DRILL,
                f"{outage.server}: back to normal after restart (admitting, healthy, spool empty)",
                back + (f"; exited: {', '.join(outage.exited)}" if outage.exited else ""),
                outage.back_after is not None,
                "< 180 s",
            )
        )
    if after_loss is not None:
        admitted, affordable = after_loss
        rows.append(
            report.invariant(
                DRILL,
                "after Redis lost its data: admitted / left in the budget",
                f"{admitted} / {affordable}",
                admitted == affordable,
                "equal (counters rebuilt from the ledger)",
            )
        )
    if aggregates_rebuilt:
        rows.append(
            report.info(
                DRILL, "aggregates lost with Redis: counted again (caracal replay start)", aggregates_rebuilt
            )
        )
    rows += [
        report.info(DRILL, "calls during the drill", f"{len(replies):,}: {books.admitted_calls:,} admitted"),
        *checks,
        report.info(DRILL, "books clean after the last restart", f"{drained_in:.0f} s"),
    ]
    return rows
