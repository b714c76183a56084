"""The distributed deployment the drills fire at, run on the local platform.

Two (or more) ``caracald gateway`` processes share one budget in Redis and send their metering events to
Kafka (``acks=all``, idempotent producer, each with its own local spool); ``caracald ledger-writer`` (sealing
Merkle batches with a signing key), ``metrics-aggregator`` and ``audit-logger`` consume them; all on one
PostgreSQL database of their own. The fake provider (``tests/e2e/fake_upstream.py``) answers upstream, in a
process of its own.

Every daemon is started, stopped and restarted through Caracal's own local platform
(:class:`caracal_ops.platform.local.LocalPlatform`: pid files, logs, process groups), as an operator on one
machine would run them: the first platform runs a gateway and the three consumers, each further one another
gateway on its own ports and spool (the local platform runs one replica of a component per data folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg
import yaml
from psycopg.rows import dict_row

from bench.drills.env import DrillEnv
from caracal_ops.platform.local import LocalPlatform, caracald_executable
from caracald.admin import agents as agent_admin
from caracald.admin import allowlists as allowlist_admin
from caracald.admin import policies as policy_admin
from caracald.store.database import Database
from tests.e2e.fake_upstream import OPENAI_KEY
from tests.harness import stop_process
from tests.harness.ports import LOOPBACK, free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ACTOR = "drills@example.com"
#: The generic upstream's path prefix and flat price: every call costs exactly this, so the number of calls a
#: budget affords is exact.
SEARCH = "search"
FLAT_PRICE = Decimal("0.01")
CONSUMERS = ("ledger-writer", "metrics-aggregator", "audit-logger")


@dataclass(frozen=True)
class Agent:
    agent_id: uuid.UUID
    api_key: str
    parent_id: uuid.UUID | None = None
    limit: Decimal | None = None


@dataclass
class Member:
    """One daemon process of the deployment: which platform runs it, and where it answers."""

    name: str
    platform: LocalPlatform
    component: str
    health_url: str
    metrics_url: str

    def pid(self) -> int | None:
        try:
            return int(json.loads(self.platform.pid_path(self.component).read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None

    def alive(self) -> bool:
        return self.platform.status(self.component).state.value == "running"


@dataclass
class Deployment:
    env: DrillEnv
    gateways: int = 2
    hold_ttl_seconds: int = 10
    database_url: str = ""
    config_path: Path = Path()
    members: dict[str, Member] = field(default_factory=dict)
    gateway_urls: list[str] = field(default_factory=list)
    upstream_url: str = ""
    _upstream: subprocess.Popen[bytes] | None = None
    _db: Database | None = None

    # -- life ---------------------------------------------------------------------------------------------

    def start(self) -> Deployment:
        home = self.env.folder(f"deployment-{uuid.uuid4().hex[:6]}")
        self.database_url = self.env.database("drills")
        self._db = Database(self.database_url)
        self._db.open()
        self._start_upstream(home)
        self.config_path = self._write_config(home)
        self.cli("kafka", "create-topics", "--partitions", "6", "--replication-factor", "1")
        self.cli("merkle", "generate-key")
        self.cli(
            "pricebook",
            "set",
            "--pattern",
            f"{self.upstream_url}/{SEARCH}-api/*",
            "--per-request",
            str(FLAT_PRICE),
            "--effective-from",
            "2020-01-01T00:00:00Z",
        )
        for index in range(self.gateways):
            self._add_platform(home, index)
        for member in self.members.values():
            print(f"  {member.platform.start(member.component)}", flush=True)
        self.wait_healthy()
        return self

    def close(self) -> None:
        for member in self.members.values():
            with contextlib.suppress(Exception):
                member.platform.stop(member.component)
        if self._upstream is not None:
            stop_process(self._upstream, timeout=10)
        if self._db is not None:
            self._db.close()

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def db(self) -> Database:
        assert self._db is not None, "start() first"
        return self._db

    def _start_upstream(self, home: Path) -> None:
        port = free_port()
        code = (
            f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.gateway_bench import serve_upstream; "
        )
        code += f"serve_upstream({port})"
        log = (home / "upstream.log").open("wb")
        self._upstream = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.upstream_url = f"http://{LOOPBACK}:{port}"
        _wait(lambda: _answers(self.upstream_url + "/"), 30, "the fake provider")

    def _write_config(self, home: Path) -> Path:
        config = {
            "database": {"url": self.database_url, "pool_size": 4, "max_overflow": 8},
            "kafka": {"bootstrap_servers": self.env.kafka.bootstrap_servers},
            "redis": {"url": self.env.redis.url},
            "budget": {"backend": "redis"},
            "bus": {"kind": "kafka"},
            "integrity": {"key_dir": str(home / "keys"), "batch_size": 500, "batch_max_age_seconds": 1},
            "platform": {"kind": "local", "stop_timeout_seconds": 20},
            "gateway": {
                "host": LOOPBACK,
                "hold_ttl_seconds": self.hold_ttl_seconds,
                "cache_refresh_seconds": 0.5,
                "upstream_timeout_seconds": 30,
                "upstreams": {
                    "openai": {"base_url": self.upstream_url, "api_key": OPENAI_KEY, "flavor": "openai"},
                    SEARCH: {"base_url": f"{self.upstream_url}/{SEARCH}-api", "flavor": "generic"},
                },
            },
        }
        path = home / "caracal.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def _add_platform(self, home: Path, index: int) -> None:
        """Platform ``index``: gateway ``index + 1`` (and, on the first, the consumers)."""
        folder = home / f"node-{index + 1}"
        port, metrics_port = free_port(), free_port()
        caracald = caracald_executable()
        commands = {"gateway": [*caracald, "gateway", "--port", str(port)]}
        ports: dict[str, tuple[int, int]] = {}
        if index == 0:
            for consumer in CONSUMERS:
                ports[consumer] = (free_port(), free_port())
                health, metrics = ports[consumer]
                commands[consumer] = [
                    *caracald,
                    consumer,
                    "--listen-host",
                    LOOPBACK,
                    "--health-port",
                    str(health),
                    "--metrics-port",
                    str(metrics),
                ]
        env = {
            "CARACAL_CONFIG": str(self.config_path),
            "CARACAL__GATEWAY__METRICS_PORT": str(metrics_port),
            # A spool per gateway: events a gateway could not hand to Kafka wait in its own folder.
            "CARACAL__BUS__SPOOL_DIR": str(folder / "spool"),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        platform = LocalPlatform(
            run_dir=folder / "run",
            log_dir=folder / "logs",
            commands=commands,
            env=env,
            stop_timeout=20,
            start_grace=0.5,
        )
        gateway_url = f"http://{LOOPBACK}:{port}"
        self.gateway_urls.append(gateway_url)
        name = f"gateway-{index + 1}"
        self.members[name] = Member(
            name, platform, "gateway", f"{gateway_url}/health", f"http://{LOOPBACK}:{metrics_port}/metrics"
        )
        for consumer, (health, metrics) in ports.items():
            self.members[consumer] = Member(
                consumer,
                platform,
                consumer,
                f"http://{LOOPBACK}:{health}/readyz",
                f"http://{LOOPBACK}:{metrics}/metrics",
            )

    # -- control ------------------------------------------------------------------------------------------

    def kill(self, name: str) -> int | None:
        """``kill -9`` the daemon's whole process group; its pid (None when it was not running)."""
        pid = self.members[name].pid()
        if pid is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        return pid

    def restart(self, name: str) -> str:
        """Start the daemon again (its pid file says it died: the platform starts a new one)."""
        member = self.members[name]
        return member.platform.start(member.component)

    def healthy(self, name: str) -> bool:
        member = self.members[name]
        return member.alive() and _answers(member.health_url)

    def wait_healthy(self, names: list[str] | None = None, timeout: float = 120) -> None:
        for name in names or list(self.members):
            member = self.members[name]
            _wait(
                lambda member=member: self.healthy(member.name),  # type: ignore[misc]
                timeout,
                f"{name} to be ready",
                lambda member=member: member.platform.logs(member.component, 40),  # type: ignore[misc]
            )

    def log(self, name: str, lines: int = 60) -> str:
        member = self.members[name]
        return member.platform.logs(member.component, lines)

    def cli(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``caracal ARGS`` with this deployment's configuration."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CARACAL")}
        env["CARACAL_CONFIG"] = str(self.config_path)
        done = subprocess.run(
            [str(BIN / "caracal"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"caracal {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done

    # -- agents -------------------------------------------------------------------------------------------

    def agent(self, *, limit: Decimal | None, parent: Agent | None = None, window: str = "daily") -> Agent:
        """A new agent with a calendar ``window`` budget of ``limit`` USD (none: None), allowed upstream."""
        created = agent_admin.create_agent(
            self.db,
            name=f"drill-{uuid.uuid4().hex[:12]}",
            owner=ACTOR,
            actor=ACTOR,
            parent_id=parent.agent_id if parent else None,
        )
        agent_id = created.agent.agent_id
        if limit is not None:
            terms = policy_admin.parse_terms(str(limit), "USD", window, "calendar", "UTC")
            policy_admin.create_policy(self.db, agent_id, terms, change_reason="drill budget", actor=ACTOR)
        allowlist_admin.create_entry(self.db, agent_id, f"{self.upstream_url}/*", "glob", actor=ACTOR)
        return Agent(agent_id, created.api_key, parent.agent_id if parent else None, limit)

    def wait_cached(self, timeout: float = 60) -> None:
        """Until every gateway's cache holds every agent of the store (new ones are seen on refresh)."""
        agents = int(self.rows("SELECT count(*) AS n FROM agents")[0]["n"])
        for url in self.gateway_urls:
            _wait(
                lambda url=url: httpx.get(f"{url}/stats", timeout=5).json()["cache"]["agents"] >= agents,  # type: ignore[misc]
                timeout,
                f"{url} to cache {agents} agents",
            )

    def lag(self, group: str) -> int:
        """What the consumer group has not committed yet (``caracal kafka consumer-lag``)."""
        done = self.cli("kafka", "consumer-lag", "--consumer-group", group, "-o", "json")
        return int(json.loads(done.stdout)["total_lag"])

    def stop(self, name: str) -> str:
        member = self.members[name]
        return member.platform.stop(member.component)

    # -- reading back ----------------------------------------------------------------------------------

    def rows(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        with psycopg.connect(self.database_url, row_factory=dict_row, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def _wait(
    condition: Callable[[], bool], timeout: float, what: str, detail: Callable[[], str] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):  # not there yet (a server still starting)
            if condition():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}" + (f":\n{detail()}" if detail else ""))
        time.sleep(0.2)
