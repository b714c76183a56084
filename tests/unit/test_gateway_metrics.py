"""The gateway's metrics registry: its own metrics, the process collectors, the connection pool gauge."""

from __future__ import annotations

from prometheus_client import PROCESS_COLLECTOR, CollectorRegistry, generate_latest

from caracald.gateway.metrics import GatewayMetrics


def test_a_new_registry_carries_the_process_and_python_collectors() -> None:
    metrics = GatewayMetrics()
    assert (metrics.registry.get_sample_value("process_resident_memory_bytes") or 0) > 0
    assert metrics.registry.get_sample_value("process_cpu_seconds_total") is not None
    assert metrics.registry.get_sample_value("python_gc_collections_total", {"generation": "0"}) is not None
    text = generate_latest(metrics.registry).decode()
    assert "python_info{" in text and "caracal_gateway_requests_total" in text


def test_a_given_registry_is_left_as_it_is() -> None:
    registry = CollectorRegistry()
    registry.register(PROCESS_COLLECTOR)  # as prometheus-client's default registry already does
    metrics = GatewayMetrics(registry)  # no "duplicated timeseries" error
    assert metrics.registry is registry
    assert registry.get_sample_value("python_gc_collections_total", {"generation": "0"}) is None


def test_the_pool_gauge_follows_the_pools() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    sizes = {"primary": 4, "replica": 2}
    metrics.watch_pools(lambda: dict(sizes))

    def reported(pool: str) -> float | None:
        return metrics.registry.get_sample_value("caracal_database_connection_pool_size", {"pool": pool})

    assert (reported("primary"), reported("replica")) == (4, 2)
    sizes["primary"] = 17
    del sizes["replica"]
    assert (reported("primary"), reported("replica")) == (17, 0)
