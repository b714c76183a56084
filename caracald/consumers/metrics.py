"""Prometheus metrics of the consumers, with the names the runbook's alerts and dashboards use.

The ``caracal_kafka_*`` metrics are reported by consumers on either bus (Kafka or the embedded event log),
since both run the same code. All metrics live in prometheus-client's default registry.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

CONSUMER_LAG = Gauge(
    "caracal_kafka_consumer_lag",
    "Records in a topic partition that the consumer group has not committed yet.",
    ["group", "topic", "partition"],
)
MESSAGE_PROCESSING_DURATION = Histogram(
    "caracal_kafka_message_processing_duration_seconds",
    "Seconds from polling a batch to committing its offsets (every message of a batch shares the value; "
    "one observation per batch).",
    ["group"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
CONSUMER_ERRORS = Counter(
    "caracal_kafka_consumer_errors_total",
    "Errors met by a consumer group, by type (decode errors, rejected records, outages, commit failures).",
    ["group", "error_type"],
)
CONSUMER_RECORDS = Counter(
    "caracal_consumer_records_total",
    "Records a consumer group handled, by outcome (applied, duplicate, dead_lettered).",
    ["group", "outcome"],
)
CONSUMER_READY = Gauge(
    "caracal_consumer_ready",
    "1 while the consumer group member can read the bus and write the store, else 0.",
    ["group"],
)
DLQ_SIZE = Gauge("caracal_dlq_size", "Dead letters waiting for triage (status pending).")
DLQ_OLDEST_AGE = Gauge(
    "caracal_dlq_oldest_message_age_seconds",
    "Age of the oldest dead letter waiting for triage (0 when there is none).",
)
DATABASE_QUERIES = Counter(
    "caracal_database_queries_total",
    "Queries sent to PostgreSQL, by operation and outcome (ok, error).",
    ["operation", "outcome"],
)
DATABASE_QUERY_DURATION = Histogram(
    "caracal_database_query_duration_seconds",
    "Seconds a PostgreSQL operation took (a batch insert counts as one).",
    ["operation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


@contextmanager
def database_query(operation: str) -> Iterator[None]:
    """Count and time one database operation."""
    started = time.perf_counter()
    outcome = "error"
    try:
        yield
        outcome = "ok"
    finally:
        DATABASE_QUERIES.labels(operation, outcome).inc()
        DATABASE_QUERY_DURATION.labels(operation).observe(time.perf_counter() - started)


_reported_lag: dict[str, set[tuple[str, int]]] = {}


def report_lag(group: str, lags: Mapping[tuple[str, int], int]) -> None:
    """Set the lag gauges of ``group``; partitions it no longer owns stop being reported."""
    previous = _reported_lag.get(group, set())
    for topic, partition in previous - set(lags):
        with contextlib.suppress(KeyError):
            CONSUMER_LAG.remove(group, topic, str(partition))
    for (topic, partition), lag in lags.items():
        CONSUMER_LAG.labels(group, topic, str(partition)).set(lag)
    _reported_lag[group] = set(lags)


def report_dlq(pending: int, oldest_age_seconds: float | None) -> None:
    DLQ_SIZE.set(pending)
    DLQ_OLDEST_AGE.set(max(oldest_age_seconds or 0.0, 0.0))
