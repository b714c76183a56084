"""Concurrency drill: 1,000 calls at once, across both gateways, against budgets they must share exactly.

Each round builds new agents: ten parents (a daily budget each) with ten children apiece (half of them with
a budget smaller than their share of the traffic, half larger), and one *hot* agent alone on its budget. Then
1,000 calls leave at once, spread over the two gateways: 600 over the children (six each), 400 at the hot
agent. Every call costs the same flat price, so what each budget affords is an exact count, whatever the
order of arrival: per family ``min(parent's calls, sum over children of min(calls, child's calls))``, and
``min(400, hot agent's calls)``.

Measured: calls admitted against that exact affordable count (fewer is a false refusal, more an overspend);
overspend read from the ledger after every event is written (settled spend above a policy's limit, for the
parent: over the whole family); admission latency p50/p99 (the gateways' own histogram of the budget
backend's answer, read before and after, interpolated as Prometheus' ``histogram_quantile`` does), and the
calls' latency as the callers saw it.
"""

from __future__ import annotations

import random
import statistics
import uuid
from collections import defaultdict
from decimal import Decimal

import httpx2 as httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.drills import report
from bench.drills.accounting import account, wait_drained
from bench.drills.deployment import FLAT_PRICE, Agent, Deployment
from bench.drills.load import burst, statuses

DRILL = "concurrency"
FAMILIES, CHILDREN = 10, 10
PARENT_CALLS = 40
SMALL_CHILD_CALLS, LARGE_CHILD_CALLS = 3, 30
CALLS_PER_CHILD = 6
HOT_CALLS, HOT_AFFORDS = 400, 100
ADMISSION_HISTOGRAM = "caracal_gateway_admission_duration_seconds"


def _budget(calls: int) -> Decimal:
    return FLAT_PRICE * calls


def _histogram(deployment: Deployment) -> dict[float, float]:
    """Cumulative bucket counts of the admission histogram, summed over the gateways."""
    buckets: dict[float, float] = defaultdict(float)
    for name, member in deployment.members.items():
        if not name.startswith("gateway"):
            continue
        text = httpx.get(member.metrics_url, timeout=10).text
        for family in text_string_to_metric_families(text):
            if family.name != ADMISSION_HISTOGRAM:
                continue
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    buckets[float(sample.labels["le"])] += sample.value
    return buckets


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    """``histogram_quantile(q, ...)`` of the observations between two reads, in seconds."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return float("nan")
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(cumulative - below, 1e-12)
        lower, below = bound, cumulative
    return lower


def _round(deployment: Deployment, rng: random.Random) -> tuple[list[Agent], list[Agent], int]:
    """New agents and 1,000 shuffled calls; the exact count the budgets afford."""
    calls: list[Agent] = []
    everyone: list[Agent] = []
    affordable = 0
    for _ in range(FAMILIES):
        parent = deployment.agent(limit=_budget(PARENT_CALLS))
        everyone.append(parent)
        family = 0
        for child_index in range(CHILDREN):
            affords = SMALL_CHILD_CALLS if child_index % 2 else LARGE_CHILD_CALLS
            child = deployment.agent(limit=_budget(affords), parent=parent)
            everyone.append(child)
            calls += [child] * CALLS_PER_CHILD
            family += min(CALLS_PER_CHILD, affords)
        affordable += min(PARENT_CALLS, family)
    hot = deployment.agent(limit=_budget(HOT_AFFORDS))
    everyone.append(hot)
    calls += [hot] * HOT_CALLS
    affordable += min(HOT_CALLS, HOT_AFFORDS)
    rng.shuffle(calls)
    return calls, everyone, affordable


def _overspend(deployment: Deployment, everyone: list[Agent]) -> Decimal:
    """Settled spend above each policy's limit, summed (the parent's policy carries its whole family)."""
    spent: dict[uuid.UUID, Decimal] = defaultdict(Decimal)
    for row in deployment.rows(
        "SELECT agent_id, sum(cost) AS spent FROM ledger_events"
        " WHERE agent_id = ANY(%s) AND event_type IN ('settlement', 'expiry', 'adjustment')"
        " GROUP BY agent_id",
        [[a.agent_id for a in everyone]],
    ):
        spent[row["agent_id"]] = Decimal(row["spent"])
    limits = {a.agent_id: a.limit for a in everyone if a.limit is not None}
    carried: dict[uuid.UUID, Decimal] = defaultdict(Decimal)
    for agent in everyone:
        carried[agent.agent_id] += spent[agent.agent_id]
        if agent.parent_id is not None:
            carried[agent.parent_id] += spent[agent.agent_id]
    return sum((max(Decimal(0), carried[a] - limits[a]) for a in limits), Decimal(0))


def run(deployment: Deployment, *, rounds: int = 3, seed: int = 0) -> list[report.Row]:
    rng = random.Random(seed)
    admitted = affordable = calls_sent = 0
    overspend = Decimal(0)
    latencies: list[float] = []
    unexpected: dict[str, int] = defaultdict(int)
    problems: list[str] = []
    before = _histogram(deployment)
    for number in range(1, rounds + 1):
        calls, everyone, exact = _round(deployment, rng)
        deployment.wait_cached()
        replies = burst(deployment.gateway_urls, calls)
        seen = statuses(replies)
        print(f"  round {number}: {dict(seen)} (affordable {exact})", flush=True)
        for status, count in seen.items():
            if status not in ("200", "402 budget_exhausted"):
                unexpected[status] += count
        wait_drained(deployment, [a.agent_id for a in everyone])
        books = account(deployment, [a.agent_id for a in everyone], replies)
        problems += books.lost + books.duplicated + books.aggregate_mismatches
        admitted += books.admitted_calls
        affordable += exact
        calls_sent += len(replies)
        overspend += _overspend(deployment, everyone)
        latencies += [r.seconds * 1000 for r in replies]
    after = _histogram(deployment)
    p50, p99 = quantile(0.5, before, after) * 1000, quantile(0.99, before, after) * 1000
    ordered = sorted(latencies)
    return [
        report.info(
            DRILL, "calls (all at once, 2 gateways)", f"{calls_sent:,} in {rounds} round(s) of 1,000"
        ),
        report.invariant(DRILL, "overspend (ledger, every policy)", f"${overspend}", overspend == 0, "$0"),
        report.invariant(
            DRILL,
            "admitted / exactly affordable",
            f"{admitted:,} / {affordable:,}",
            admitted == affordable,
            "equal",
        ),
        report.invariant(
            DRILL,
            "answers other than 200 / 402",
            dict(unexpected) or 0,
            not unexpected,
            "0",
        ),
        report.invariant(DRILL, "ledger problems (lost, duplicated)", len(problems), not problems, "0"),
        report.info(DRILL, "admission latency p50 in the burst (histogram)", f"{p50:.2f} ms"),
        report.info(DRILL, "admission latency p99 in the burst (histogram)", f"{p99:.2f} ms"),
        report.info(
            DRILL,
            "call latency p50 / p99 under the burst",
            f"{statistics.median(ordered):.0f} / {ordered[int(0.99 * (len(ordered) - 1))]:.0f} ms",
        ),
    ]
