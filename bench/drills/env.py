"""The services every drill runs on: one PostgreSQL, one Redis and one Apache Kafka broker, real servers.

Started from the test harness (``tests/harness``: each a child process on free loopback ports, its data in a
temporary folder, stopped and removed at exit), or reused when ``--postgres-uri``, ``--redis-url`` and
``--kafka-bootstrap`` name running ones (then the outage drills, which stop servers, are skipped). Each drill
takes its own migrated database (:meth:`DrillEnv.database`) so that no drill's data shows in another's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from caracald.store.migrate import migrate
from tests.harness.kafka import KafkaService
from tests.harness.postgres import PostgresService
from tests.harness.redis_server import RedisService

#: The broker a deployment runs: the C2 compiler on (the harness's default, C1 only, starts faster).
KAFKA_JAVA_OPTS = "-XX:TieredStopAtLevel=4 -XX:CICompilerCount=2"


@dataclass
class DrillEnv:
    postgres: PostgresService
    redis: RedisService
    kafka: KafkaService
    workdir: Path
    quick: bool = False
    seed: int = 0
    _databases: list[str] = field(default_factory=list)

    @property
    def managed(self) -> bool:
        """True when the drills own the servers (and may stop and start them)."""
        return self.postgres.managed and self.redis.managed and self.kafka.managed

    def database(self, purpose: str) -> str:
        """A new, migrated database for one drill; its superuser URI."""
        name = f"caracal_{purpose}_{uuid.uuid4().hex[:8]}"
        url = self.postgres.create_database(name)
        migrate(url)
        self._databases.append(name)
        return url

    def folder(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def close(self) -> None:
        for name in self._databases:
            with contextlib.suppress(Exception):  # a server already stopped: its folder goes with it
                self.postgres.drop_database(name)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start(
    *,
    postgres_uri: str | None = None,
    redis_url: str | None = None,
    kafka_bootstrap: str | None = None,
    quick: bool = False,
    seed: int = 0,
) -> DrillEnv:
    print("starting services: PostgreSQL, Redis, Kafka ...", flush=True)
    postgres = PostgresService.external(postgres_uri) if postgres_uri else PostgresService.start()
    redis = RedisService.external(redis_url) if redis_url else RedisService(persistent=True).start()
    if kafka_bootstrap:
        kafka = KafkaService.external(kafka_bootstrap)
    else:
        os.environ.setdefault("CARACAL_TEST_KAFKA_JAVA_OPTS", KAFKA_JAVA_OPTS)
        kafka = KafkaService().launch().wait_ready()
    workdir = Path(tempfile.mkdtemp(prefix="caracal-drills-"))
    return DrillEnv(postgres, redis, kafka, workdir, quick=quick, seed=seed)
