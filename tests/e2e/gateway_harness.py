"""A real gateway (uvicorn, on a free port) in front of the fake upstream, against a test database.

Both servers run on one event loop in a background thread, so tests drive them with ordinary blocking
clients (the official SDKs, httpx, raw sockets). ``GatewayHarness.run(coro)`` runs a coroutine on that
loop (to reach the cache or the budget backend); ``settled()`` waits until every hold is settled and every
metering event written.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

from caracald.budget.base import BudgetBackend
from caracald.budget.local_backend import LocalBudget
from caracald.gateway.app import GatewayDeps, GatewayState, create_app
from caracald.gateway.cache import PostgresSnapshotSource
from caracald.gateway.journal import ChargeJournal
from caracald.gateway.sinks import EventSink, LedgerSink
from caracald.gateway.switches import PostgresSwitch
from caracald.runtime.config import GatewayConfig, UpstreamConfig
from caracald.store.database import Database
from tests.clitools import block
from tests.e2e.fake_upstream import ANTHROPIC_KEY, OPENAI_KEY, FakeUpstream
from tests.harness.ports import LOOPBACK, free_port
from tests.integration.conftest import Cli

T = TypeVar("T")


@dataclass(frozen=True)
class AgentKey:
    agent_id: str
    api_key: str
    name: str


def gateway_config(upstream_port: int, **overrides: Any) -> GatewayConfig:
    base = f"http://{LOOPBACK}:{upstream_port}"
    settings: dict[str, Any] = {
        "host": LOOPBACK,
        "port": free_port(),
        "metrics_port": free_port(),
        "upstreams": {
            "openai": UpstreamConfig(base_url=base, api_key=OPENAI_KEY, flavor="openai"),
            "anthropic": UpstreamConfig(
                base_url=base, api_key=ANTHROPIC_KEY, auth="x-api-key", flavor="anthropic"
            ),
            "search": UpstreamConfig(base_url=f"{base}/search-api", flavor="generic"),
        },
        "cache_refresh_seconds": 0.2,
        "upstream_timeout_seconds": 30,
        **overrides,
    }
    return GatewayConfig(**settings)


class GatewayHarness:
    def __init__(
        self,
        database_url: str,
        *,
        budget: BudgetBackend | None = None,
        sink: EventSink | None = None,
        journal: ChargeJournal | bool = True,
        switch_poll_seconds: float = 0.2,
        **config: Any,
    ) -> None:
        self.database_url = database_url
        self.switch_poll_seconds = switch_poll_seconds
        self.fake = FakeUpstream()
        self.upstream_port = free_port()
        self.config = gateway_config(self.upstream_port, **config)
        self.db = Database(database_url)
        self.budget: BudgetBackend = budget or LocalBudget()
        self.sink: EventSink = sink or LedgerSink(self.db)
        # As a deployed gateway runs (with a spool folder): a charge journal, in a folder of its own.
        self._journal_dir: tempfile.TemporaryDirectory[str] | None = None
        if journal is True:
            self._journal_dir = tempfile.TemporaryDirectory(prefix="caracal-journal-")
            journal = ChargeJournal(Path(self._journal_dir.name) / "charges.journal")
        self.journal = journal if isinstance(journal, ChargeJournal) else None
        self.loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: uvicorn.Server | None = None
        self.state: GatewayState | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.config.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.config.metrics_port}/metrics"

    # -- life ---------------------------------------------------------------------------------------------

    def start(self) -> GatewayHarness:
        self.db.open()
        deps = GatewayDeps(
            config=self.config,
            snapshots=PostgresSnapshotSource(self.db),
            budget=self.budget,
            sink=self.sink,
            switches=[PostgresSwitch(self.db)],
            journal=self.journal,
            expiry_interval=0.5,
            switch_poll_seconds=self.switch_poll_seconds,
        )
        app = create_app(deps)
        self.state = app.state.gateway
        self._server = uvicorn.Server(
            uvicorn.Config(app, host=LOOPBACK, port=self.config.port, log_level="warning", lifespan="on")
        )
        started = threading.Event()

        async def main() -> None:
            await self.fake.start(LOOPBACK, self.upstream_port)
            started.set()
            assert self._server is not None
            await self._server.serve()
            await self.fake.stop()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(main())

        self._thread = threading.Thread(target=run, name="gateway-harness", daemon=True)
        self._thread.start()
        started.wait(10)
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
        self.db.close()
        if self._journal_dir is not None:
            assert self.journal is not None
            self.journal.close()
            self._journal_dir.cleanup()

    def __enter__(self) -> GatewayHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reaching in ----------------------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def refresh(self) -> None:
        """Reload the gateway's cache now instead of waiting for the next refresh."""
        assert self.state is not None
        assert self.run(self.state.cache.refresh())

    def settled(self, timeout: float = 15) -> None:
        """Wait until no hold is in flight and every background settlement and event is done."""
        assert self.state is not None
        state = self.state
        deadline = time.monotonic() + timeout
        while state.billing.holds_in_flight or state.billing.background_tasks:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{state.billing.holds_in_flight} holds and {state.billing.background_tasks} tasks left"
                )
            time.sleep(0.02)

    # -- the ledger -----------------------------------------------------------------------------------------

    def ledger(self, agent_id: str, *kinds: str) -> list[dict[str, Any]]:
        query = "SELECT * FROM ledger_events WHERE agent_id = %s"
        params: list[Any] = [agent_id]
        if kinds:
            query += " AND event_type = ANY(%s)"
            params.append(list(kinds))
        with self.db.read() as conn:
            return conn.execute(query + " ORDER BY event_id", params).fetchall()

    def spent(self, agent_id: str) -> Decimal:
        rows = self.ledger(agent_id, "settlement", "expiry", "adjustment")
        return sum((Decimal(r["cost"]) for r in rows), Decimal(0))


# -- setting agents up through the real CLI ----------------------------------------------------------------


def make_agent(
    cli: Cli,
    name: str,
    *,
    limit: str | None = "10.00",
    allow: tuple[str, ...] = ("http://127.0.0.1:*",),
    parent: str | None = None,
) -> AgentKey:
    extra = ["--parent-id", parent] if parent else []
    created = json.loads(
        cli.ok("agent", "create", "--name", name, "--owner", "t@example.com", "-o", "json", *extra).stdout
    )
    agent_id = created["agent_id"]
    if limit is not None:
        cli.ok("policy", "create", "--agent-id", agent_id, "--limit", limit, "--change-reason", "test budget")
    for pattern in allow:
        cli.ok("allowlist", "create", "--agent-id", agent_id, "--pattern", pattern)
    return AgentKey(agent_id, created["api_key"], name)


def set_model_price(
    cli: Cli, model: str, input_price: str, output_price: str, cached: str | None = None
) -> None:
    args = ["pricebook", "set", "--model", model, "--input", input_price, "--output", output_price]
    if cached is not None:
        args += ["--cached-input", cached]
    cli.ok(*args, "--effective-from", "2020-01-01T00:00:00Z")


def set_request_price(cli: Cli, pattern: str, per_request: str) -> None:
    cli.ok(
        "pricebook",
        "set",
        "--pattern",
        pattern,
        "--per-request",
        per_request,
        "--effective-from",
        "2020-01-01T00:00:00Z",
    )


def policy_id_of(cli: Cli, agent_id: str) -> str:
    return block(cli.ok("policy", "list", "--agent-id", agent_id).stdout).get("Policy ID", "")


def iter_sse(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()


class FakeUpstreamThread:
    """The fake upstream alone, on its own loop in a thread (for gateways run as separate processes)."""

    def __init__(self) -> None:
        self.fake = FakeUpstream()
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-upstream", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def __enter__(self) -> FakeUpstreamThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.start(LOOPBACK, self.port), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
