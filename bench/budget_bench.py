"""Budget admission latency and throughput against a local Redis (and the in-process backend).

    .venv/bin/python bench/budget_bench.py                     # starts a throw-away redis-server
    .venv/bin/python bench/budget_bench.py --redis-url redis://127.0.0.1:6379/0

Each request is admitted against two scopes (an agent's and its parent's, calendar daily) and then
settled; a third run uses rolling monthly windows (721 hourly buckets read per scope). Prints
latency percentiles at concurrency 1 and throughput at concurrency 32. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from caracald.budget.base import AdmissionRequest, BudgetBackend, Scope
from caracald.budget.local_backend import LocalBudget
from caracald.budget.redis_backend import RedisBudget
from caracald.core.money import Money
from caracald.core.windows import WindowSpec

HOLD = Money(Decimal("0.001"), "USD")
ACTUAL = Money(Decimal("0.0007"), "USD")


def scopes(window: WindowSpec) -> tuple[Scope, ...]:
    agent, parent = uuid.uuid4(), uuid.uuid4()
    limit = Money(Decimal("1000000"), "USD")
    return (Scope(uuid.uuid4(), agent, limit, window), Scope(uuid.uuid4(), parent, limit, window))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_pair(backend: BudgetBackend, chosen: tuple[Scope, ...]) -> tuple[float, float]:
    at = datetime.now(UTC)
    request = AdmissionRequest(uuid.uuid4(), chosen[0].agent_id, chosen, HOLD, at, timedelta(minutes=5))
    start = time.perf_counter()
    admission = await backend.admit(request)
    admitted = time.perf_counter()
    assert admission.admitted
    await backend.settle(request.request_id, ACTUAL, at)
    return admitted - start, time.perf_counter() - start


async def samples(
    backend: BudgetBackend, chosen: tuple[Scope, ...], n: int, warmup: int = 200
) -> tuple[list[float], list[float]]:
    """``n`` admit+settle pairs one after the other: the admissions' and the pairs' latencies, in us."""
    for _ in range(warmup):  # warm up: connections, script cache
        await one_pair(backend, chosen)
    admits, pairs = [], []
    for _ in range(n):
        a, p = await one_pair(backend, chosen)
        admits.append(a * 1e6)
        pairs.append(p * 1e6)
    return admits, pairs


async def sequential(backend: BudgetBackend, chosen: tuple[Scope, ...], n: int) -> None:
    admits, pairs = await samples(backend, chosen, n)
    print(
        f"  concurrency 1, {n} pairs: admit p50 {statistics.median(admits):7.0f} us"
        f"  p99 {pct(admits, 0.99):7.0f} us"
        f" | admit+settle p50 {statistics.median(pairs):7.0f} us  p99 {pct(pairs, 0.99):7.0f} us"
    )


async def concurrent(backend: BudgetBackend, chosen: tuple[Scope, ...], workers: int, n: int) -> None:
    per_worker = n // workers
    latencies: list[float] = []

    async def worker() -> None:
        for _ in range(per_worker):
            _, pair = await one_pair(backend, chosen)
            latencies.append(pair * 1e6)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    elapsed = time.perf_counter() - start
    done = per_worker * workers
    print(
        f"  concurrency {workers}, {done} pairs: {done / elapsed:7.0f} admit+settle pairs/s"
        f" ({2 * done / elapsed:7.0f} scripts/s) | pair p50 {statistics.median(latencies):7.0f} us"
        f"  p99 {pct(latencies, 0.99):7.0f} us"
    )


async def run(label: str, make: Callable[[], BudgetBackend], window: WindowSpec, n: int) -> None:
    print(f"{label}, {window}:")
    backend = make()
    try:
        chosen = scopes(window)
        await sequential(backend, chosen, n)
        await concurrent(backend, chosen, 32, n)
    finally:
        await backend.close()


async def main(url: str, n: int) -> None:
    daily = WindowSpec("daily", "calendar", "Europe/Paris")
    monthly = WindowSpec("monthly", "rolling")
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    await run("redis", lambda: RedisBudget.from_url(url, namespace=namespace), daily, n)
    await run("redis", lambda: RedisBudget.from_url(url, namespace=namespace), monthly, n // 2)
    await run("local", LocalBudget, daily, n)


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("-n", type=int, default=5000, help="admit+settle pairs per run (default 5000)")
    args = parser.parse_args()
    if args.redis_url:
        asyncio.run(main(args.redis_url, args.n))
        return
    from tests.harness.redis_server import start_redis

    service = start_redis()
    try:
        asyncio.run(main(service.url, args.n))
    finally:
        service.close()


if __name__ == "__main__":
    cli()
