"""The gateway application: a Starlette app built from injected dependencies.

Routes: ``/openai/{path}``, ``/anthropic/{path}``, ``/u/{name}/{path}``, ``/proxy`` (target in
``X-Caracal-Target-URL``), ``/health`` and ``/stats``; anything else is a 404 in OpenAI's error shape.
``/metrics`` is served on ``gateway.metrics_port`` (its own server), not here.

The lifespan opens the upstream session (unless one is injected), loads the cache once, and runs the
background tasks: cache refresh, deny-all polling and hold expiry. Run one worker per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from caracald.budget.base import BudgetBackend
from caracald.gateway.billing import Billing
from caracald.gateway.cache import PolicyCache, SnapshotSource
from caracald.gateway.health import HealthEndpoints
from caracald.gateway.http_client import UpstreamClient
from caracald.gateway.journal import ChargeJournal
from caracald.gateway.metrics import GatewayMetrics, MetricsServer
from caracald.gateway.proxy import Gateway
from caracald.gateway.sinks import EventSink
from caracald.gateway.switches import DenyAllSwitch, SwitchSource
from caracald.gateway.upstream import make_client
from caracald.runtime.config import GatewayConfig

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class GatewayDeps:
    config: GatewayConfig
    snapshots: SnapshotSource
    budget: BudgetBackend
    sink: EventSink
    switches: list[SwitchSource] = field(default_factory=list)
    #: The providers' client; made (and closed) by the lifespan when None.
    http: UpstreamClient | None = None
    clock: Callable[[], datetime] = _utcnow
    metrics: GatewayMetrics | None = None
    #: Serve /metrics on ``config.metrics_port`` (host ``config.host``).
    serve_metrics: bool = True
    #: The write-ahead journal of charges (None: a killed process can lose the events of charges under way).
    journal: ChargeJournal | None = None
    #: Seconds between hold-expiry sweeps; None: a tenth of the hold TTL, at most 5.
    expiry_interval: float | None = None
    #: Seconds between deny-all polls (at most 1, so a switch reaches every replica within a second).
    switch_poll_seconds: float = 0.5


@dataclass
class GatewayState:
    deps: GatewayDeps
    cache: PolicyCache
    switch: DenyAllSwitch
    billing: Billing
    metrics: GatewayMetrics
    gateway: Gateway
    metrics_server: MetricsServer | None = None
    client: UpstreamClient | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


def create_app(deps: GatewayDeps) -> Starlette:
    config = deps.config
    metrics = deps.metrics or GatewayMetrics()
    cache = PolicyCache(
        deps.snapshots,
        refresh_seconds=config.cache_refresh_seconds,
        max_staleness_seconds=config.cache_max_staleness_seconds,
        clock=deps.clock,
    )
    switch = DenyAllSwitch(deps.switches, poll_seconds=min(deps.switch_poll_seconds, 1.0))
    billing = Billing(
        deps.budget,
        deps.sink,
        metrics,
        clock=deps.clock,
        hold_ttl=timedelta(seconds=config.hold_ttl_seconds),
        journal=deps.journal,
    )
    metrics.watch(
        degraded=lambda: 1.0 if cache.state == "degraded" else 0.0,
        cache_age=lambda: cache.age_seconds or 0.0,
        deny_all=lambda: 1.0 if switch.on else 0.0,
    )

    def client() -> UpstreamClient:
        if state.client is None:
            raise RuntimeError("the gateway's upstream client is not open (lifespan not started)")
        return state.client

    gateway = Gateway(
        config,
        cache=cache,
        switch=switch,
        billing=billing,
        metrics=metrics,
        clock=deps.clock,
        client=client,
    )
    state = GatewayState(deps, cache, switch, billing, metrics, gateway)
    health = HealthEndpoints(cache, switch, billing, deps.sink)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.client = deps.http or make_client(config)
        if deps.serve_metrics:
            state.metrics_server = MetricsServer(metrics, config.host, config.metrics_port)
            state.metrics_server.start()
        await cache.refresh()
        await switch.poll()
        await billing.recover()  # the charges a killed predecessor left unrecorded, before any new one
        interval = deps.expiry_interval or min(5.0, config.hold_ttl_seconds / 10)
        state.tasks = [
            asyncio.create_task(cache.run(), name="caracal-cache-refresh"),
            asyncio.create_task(switch.run(), name="caracal-deny-all-poll"),
            asyncio.create_task(billing.expire_loop(interval), name="caracal-hold-expiry"),
        ]
        try:
            yield
        finally:
            for task in state.tasks:
                task.cancel()
            await asyncio.gather(*state.tasks, return_exceptions=True)
            await billing.drain()
            if deps.http is None and state.client is not None:
                await state.client.close()
            state.client = None
            if state.metrics_server is not None:
                state.metrics_server.stop()

    endpoints = {
        name: gateway.endpoint(name) for name in ("openai", "anthropic", "named", "proxy", "unknown")
    }
    routes = [
        Route("/health", health.health, methods=["GET"]),
        Route("/stats", health.stats, methods=["GET"]),
        Route("/openai/{path:path}", endpoints["openai"]),
        Route("/anthropic/{path:path}", endpoints["anthropic"]),
        Route("/u/{name}/{path:path}", endpoints["named"]),
        Route("/proxy", endpoints["proxy"]),
        Route("/{path:path}", endpoints["unknown"]),
    ]
    app = GatewayApp(endpoints, routes=routes, lifespan=lifespan)
    app.state.gateway = state
    return app


class GatewayApp(Starlette):
    """Starlette, except that proxied requests skip its middleware and router and go straight to the gateway's
    endpoints, which answer every outcome (errors included) themselves. The routes above say the same; only
    ``/health``, ``/stats`` and the lifespan still go through Starlette."""

    def __init__(self, endpoints: dict[str, ASGIApp], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._endpoints = endpoints

    def _endpoint(self, path: str) -> ASGIApp | None:
        if path.startswith("/openai/"):
            return self._endpoints["openai"]
        if path.startswith("/anthropic/"):
            return self._endpoints["anthropic"]
        if path.startswith("/u/"):
            name, slash, _ = path[3:].partition("/")
            return self._endpoints["named" if name and slash else "unknown"]
        if path == "/proxy":
            return self._endpoints["proxy"]
        if path in ("/health", "/stats"):
            return None
        return self._endpoints["unknown"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            endpoint = self._endpoint(scope["path"])
            if endpoint is not None:
                scope["app"] = self
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
