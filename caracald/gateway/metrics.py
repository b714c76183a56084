"""Prometheus metrics of one gateway process, served on their own port (``gateway.metrics_port``).

Besides the gateway's own metrics, a registry this module creates carries prometheus-client's process,
platform and garbage-collector collectors (``process_resident_memory_bytes``, ``process_cpu_seconds_total``,
``process_open_fds``, ``python_info``, ``python_gc_*``), as the consumer daemons' default registry does: the
memory alert and the gateway dashboard read them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """The gateway's metrics in ``registry``; by default a new one, with the process collectors."""
        if registry is None:
            registry = CollectorRegistry()
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                registry.register(collector)
        self.registry = registry
        r = self.registry
        self.requests = Counter(
            "caracal_gateway_requests_total", "Requests answered.", ["route", "status"], registry=r
        )
        self.duration = Histogram(
            "caracal_gateway_request_duration_seconds",
            "Time from request to the end of the answer (streams included).",
            ["route"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.policy_evaluations = Counter(
            "caracal_policy_evaluations_total", "Budget admissions decided.", ["result"], registry=r
        )
        self.auth_failures = Counter(
            "caracal_gateway_auth_failures_total",
            "Requests refused by authentication.",
            ["reason"],
            registry=r,
        )
        self.admission_latency = Histogram(
            "caracal_gateway_admission_duration_seconds",
            "Time the budget backend took to admit or deny.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.denials = Counter("caracal_gateway_denials_total", "Requests denied.", ["reason"], registry=r)
        self.hold_age = Histogram(
            "caracal_gateway_hold_age_seconds",
            "Time from a hold's admission to its settlement.",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.holds_in_flight = Gauge(
            "caracal_gateway_holds_in_flight", "Holds this process admitted and has not settled.", registry=r
        )
        self.settlement_failures = Counter(
            "caracal_gateway_settlement_failures_total",
            "Settlements the budget backend did not take (the hold expires at its amount).",
            registry=r,
        )
        self.emit_failures = Counter(
            "caracal_gateway_event_emit_failures_total",
            "Metering events the sink refused.",
            ["kind"],
            registry=r,
        )
        self.hold_exceeded = Counter(
            "caracal_gateway_hold_exceeded_total", "Calls whose actual cost exceeded their hold.", registry=r
        )
        self.streams_cut = Counter(
            "caracal_gateway_streams_cut_total", "Streams cut because they used up their hold.", registry=r
        )
        self.client_disconnects = Counter(
            "caracal_gateway_client_disconnects_total", "Answers the client stopped reading.", registry=r
        )
        self.expired_holds = Counter(
            "caracal_gateway_expired_holds_total", "Holds expired and charged at their amount.", registry=r
        )
        self.degraded = Gauge(
            "caracal_gateway_degraded",
            "1 while serving from the cache with the store unreachable.",
            registry=r,
        )
        self.cache_age = Gauge(
            "caracal_gateway_cache_age_seconds", "Age of the policy cache's last good load.", registry=r
        )
        self.deny_all = Gauge("caracal_gateway_deny_all", "1 while the deny-all switch is on.", registry=r)
        self.pool_size = Gauge(
            "caracal_database_connection_pool_size",
            "Connections a PostgreSQL pool holds, busy or idle (at most database.pool_size + max_overflow).",
            ["pool"],
            registry=r,
        )

    def watch(
        self, *, degraded: Callable[[], float], cache_age: Callable[[], float], deny_all: Callable[[], float]
    ) -> None:
        self.degraded.set_function(degraded)
        self.cache_age.set_function(cache_age)
        self.deny_all.set_function(deny_all)

    def watch_pools(self, sizes: Callable[[], Mapping[str, int]]) -> None:
        """Report the connection pools ``sizes()`` names (pool name -> connections it holds)."""
        for name in sizes():
            self.pool_size.labels(name).set_function(partial(_pool_size, sizes, name))


def _pool_size(sizes: Callable[[], Mapping[str, int]], name: str) -> float:
    return float(sizes().get(name, 0))


class MetricsServer:
    """``/metrics`` on its own port, in a thread (prometheus_client's WSGI server)."""

    def __init__(self, metrics: GatewayMetrics, host: str, port: int) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        return None if self._server is None else int(self._server.server_port)

    def start(self) -> None:
        self._server, self._thread = start_http_server(
            self._port, addr=self._host, registry=self._metrics.registry
        )
        log.info("metrics on http://%s:%s/metrics", self._host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
