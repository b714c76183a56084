"""``bench/proof.py``'s drills in small, so the proof keeps working: a round of concurrent calls and one
``kill -9`` of every daemon, on a real two-gateway deployment on the local platform (Redis, Kafka and
PostgreSQL of the test session). Every invariant row must hold. The full drills (1,000 calls per round,
100 kills, outages, tampering, fuzzing) are ``make proof``'s, not the suite's."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.drills import concurrency, crash, report
from bench.drills.deployment import Deployment
from bench.drills.env import DrillEnv
from tests.harness.kafka import KafkaService
from tests.harness.postgres import PostgresService
from tests.harness.redis_server import RedisService

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deployment(
    postgres_service: PostgresService, redis_service: RedisService, kafka_service: KafkaService
) -> Iterator[Deployment]:
    env = DrillEnv(
        postgres_service, redis_service, kafka_service, Path(tempfile.mkdtemp(prefix="caracal-proof-"))
    )
    running = Deployment(env)
    try:
        yield running.start()
    finally:
        running.close()
        env.close()
        shutil.rmtree(env.workdir, ignore_errors=True)


def held(rows: list[report.Row], *measures: str) -> None:
    """No invariant broke, and each of ``measures`` was checked (and held)."""
    assert not report.broken(rows), report.markdown(rows)
    checked = {row.measure for row in rows if row.verdict is report.Verdict.HELD}
    assert set(measures) <= checked, (measures, report.markdown(rows))


def test_concurrent_calls_admit_exactly_what_budgets_afford(deployment: Deployment) -> None:
    held(
        concurrency.run(deployment, rounds=1, seed=1),
        "overspend (ledger, every policy)",
        "admitted / exactly affordable",
    )


def test_every_daemon_killed_loses_nothing(deployment: Deployment) -> None:
    held(
        crash.run(deployment, kills_per_daemon=1, seed=1),
        "kill -9 per daemon (2 gateways, 3 consumers)",
        "lost events",
        "duplicated events",
        "holds left open after expiry (ledger / Redis)",
        "merkle verify-range",
    )
