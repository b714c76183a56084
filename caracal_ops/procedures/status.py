"""``caracal status``: every component of a deployment, each checked on its own with a short timeout.

Checked: PostgreSQL (``caracal db health-check``), Kafka (brokers reachable, when configured), Redis (PING,
when configured), the gateway replicas (``GET /health`` on ``platform.gateway_urls``), the daemons on the
configured platform, each consumer group's lag (Kafka, or the event log's committed offsets), the DLQ's
pending records, and the last Merkle batch (verified with the public keys of ``integrity.key_dir``).

A check is ``ok``, ``warning`` (works, but look at it), ``down`` (does not work) or ``skipped`` (not
configured). The overall status is ``down`` when any check is.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from caracal_ops.platform.base import ComponentState, Platform
from caracald.core.errors import CaracalError
from caracald.core.events import AUDIT_TOPIC, METERING_TOPIC
from caracald.runtime.config import CaracalConfig
from caracald.store.database import Database

OK, WARNING, DOWN, SKIPPED = "ok", "warning", "down", "skipped"

#: Each consumer daemon's group and the topic it reads.
CONSUMER_GROUPS: tuple[tuple[str, str, str], ...] = (
    ("ledger-writer", "ledger-writer-group", METERING_TOPIC),
    ("metrics-aggregator", "metrics-aggregator-group", METERING_TOPIC),
    ("audit-logger", "audit-logger-group", AUDIT_TOPIC),
)
#: A consumer group this far behind is shown as a warning (the alert's threshold).
LAG_WARNING = 10_000
HTTP_TIMEOUT = 3.0


@dataclass
class Check:
    component: str
    status: str
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class StatusReport:
    checks: list[Check]

    @property
    def status(self) -> str:
        states = {c.status for c in self.checks}
        if DOWN in states:
            return DOWN
        return WARNING if WARNING in states else OK

    @property
    def down(self) -> list[Check]:
        return [c for c in self.checks if c.status == DOWN]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _guard(component: str, check: Callable[[], Check]) -> Check:
    try:
        return check()
    except Exception as exc:
        return Check(component, DOWN, _first_line(exc))


def check_postgresql(db: Callable[[], Database]) -> Check:
    from caracald.admin.database import health_check

    report = health_check(db())
    detail = (
        f"PostgreSQL {report.server_version}, {report.latency_ms:.1f} ms, "
        f"schema {report.schema_version}/{report.expected_schema_version}"
    )
    if report.problems:
        detail += "; " + "; ".join(report.problems)
    return Check(
        "postgresql",
        OK if report.healthy else WARNING,
        detail,
        {"latency_ms": round(report.latency_ms, 2), "schema_version": report.schema_version},
    )


def check_kafka(config: CaracalConfig) -> Check:
    if not config.kafka.bootstrap_servers:
        return Check("kafka", SKIPPED, "not configured (events go through PostgreSQL's event log)")
    from caracal_ops import kafka_admin

    brokers = kafka_admin.list_brokers(config.kafka)
    if not brokers:
        return Check("kafka", DOWN, "no broker reachable")
    return Check(
        "kafka",
        OK,
        f"{len(brokers)} broker(s): " + ", ".join(f"{b.host}:{b.port}" for b in brokers),
        {"brokers": len(brokers)},
    )


def check_redis(config: CaracalConfig) -> Check:
    if config.redis.url is None:
        return Check("redis", SKIPPED, "not configured")
    from redis import Redis

    client = Redis.from_url(
        config.redis.url.get_secret_value(), socket_timeout=HTTP_TIMEOUT, socket_connect_timeout=HTTP_TIMEOUT
    )
    try:
        client.ping()
    finally:
        client.close()
    return Check("redis", OK, "PING answered")


def http_get_json(url: str, timeout: float = HTTP_TIMEOUT) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of a GET; an HTTP error status is returned, not raised."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
            code, raw = int(answer.status), answer.read()
    except urllib.error.HTTPError as exc:
        code, raw = int(exc.code), exc.read()
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        body = {}
    return code, body if isinstance(body, dict) else {}


def check_gateways(
    config: CaracalConfig, get: Callable[[str], tuple[int, dict[str, Any]]] | None = None
) -> list[Check]:
    urls = list(config.platform.gateway_urls)
    if not urls:
        # No replicas listed: the gateway this configuration runs on this host (``caracald up`` or
        # ``caracald gateway``), as the dashboard shows it.
        return [_guard("gateway", lambda: _local_gateway(config, get))]
    checks = []
    for url in urls:
        name = f"gateway {url}"

        def one(url: str = url, name: str = name) -> Check:
            return _gateway_check(name, url, (get or http_get_json)(url.rstrip("/") + "/health"))

        checks.append(_guard(name, one))
    return checks


def _local_gateway(config: CaracalConfig, get: Callable[[str], tuple[int, dict[str, Any]]] | None) -> Check:
    url = config.gateway.local_url()
    try:
        answer = (get or http_get_json)(url + "/health")
    except (OSError, CaracalError) as exc:  # refused, unreachable, timed out
        start = "caracald up" if config.embedded_mode else "caracald gateway"
        return Check(
            "gateway",
            WARNING,
            f"none answering at {url} ({_first_line(exc)}); start it with `{start}`, or list remote "
            "replicas in platform.gateway_urls",
            {"url": url},
        )
    return _gateway_check("gateway", url, answer)


def _gateway_check(name: str, url: str, answer: tuple[int, dict[str, Any]]) -> Check:
    code, body = answer
    state = str(body.get("status", "unknown"))
    deny = bool(body.get("deny_all"))
    detail = f"HTTP {code}, {state}" + (", DENY-ALL ON" if deny else "")
    if code >= 500 or state == "unavailable":
        status = DOWN
    elif state != "ok" or deny:
        status = WARNING
    else:
        status = OK
    return Check(name, status, detail, {"url": url, "health": state, "deny_all": deny})


def check_daemons(platform: Platform, *, embedded: bool = False) -> list[Check]:
    """Each daemon on the platform. On the embedded default ``caracald up`` runs the gateway and the
    consumers in one process, so a daemon the platform did not start is no cause for a warning there."""
    checks = []
    for component in platform.components():

        def one(component: str = component) -> Check:
            found = platform.status(component)
            detail = f"{found.state}" + (f" ({found.detail})" if found.detail else "")
            if found.state is ComponentState.RUNNING:
                status = OK
            elif found.state is ComponentState.FAILED:
                status = DOWN
            elif embedded and found.state in (ComponentState.STOPPED, ComponentState.NOT_INSTALLED):
                status = SKIPPED
                detail += "; on the embedded default it runs inside `caracald up`"
            else:
                status = WARNING
            return Check(
                f"daemon {component}",
                status,
                detail,
                {"platform": platform.kind, "state": str(found.state), "ready": found.ready},
            )

        checks.append(_guard(f"daemon {component}", one))
    return checks


def check_consumer_lag(config: CaracalConfig, db: Callable[[], Database]) -> list[Check]:
    checks = []
    for _daemon, group, topic in CONSUMER_GROUPS:
        name = f"consumer {group}"

        def one(group: str = group, topic: str = topic, name: str = name) -> Check:
            if config.bus.kind == "kafka":
                from caracal_ops import kafka_admin
                from caracald.core.errors import NotFoundError

                try:
                    lags = kafka_admin.consumer_lag(config.kafka, group, [topic])
                except NotFoundError as exc:
                    return Check(name, WARNING, exc.message)
                lag = sum(p.lag for p in lags)
                committed = any(p.committed is not None for p in lags)
            else:
                from caracald.bus import pg_log

                with db().read() as conn:
                    offsets = pg_log.committed_offsets(conn, group)
                    start = offsets.get((topic, 0))
                    lag = pg_log.pending_count(conn, topic, start or 0)
                committed = start is not None
            if not committed:
                return Check(
                    name, WARNING if lag else OK, f"no committed offset yet; {lag} pending", {"lag": lag}
                )
            return Check(
                name,
                WARNING if lag > LAG_WARNING else OK,
                f"lag {lag:,} on {topic}",
                {"lag": lag, "topic": topic},
            )

        checks.append(_guard(name, one))
    return checks


def check_dlq(db: Callable[[], Database], now: datetime) -> Check:
    with db().read() as conn:
        row = conn.execute(
            "SELECT count(*) AS pending, min(failed_at) AS oldest FROM dlq_events WHERE status = 'pending'"
        ).fetchone()
    pending = int(row["pending"]) if row else 0
    oldest = row["oldest"] if row else None
    if not pending:
        return Check("dlq", OK, "empty", {"pending": 0})
    age = (now - oldest).total_seconds() if oldest else 0.0
    return Check(
        "dlq",
        WARNING,
        f"{pending:,} pending, oldest {age / 3600:.1f} h old (caracal dlq list)",
        {"pending": pending, "oldest_age_seconds": round(age, 1)},
    )


def check_merkle(config: CaracalConfig, db: Callable[[], Database]) -> Check:
    try:
        from caracald.integrity import batches, keys, verifier
    except ImportError:  # pragma: no cover - integrity not installed
        return Check("merkle", SKIPPED, "ledger integrity is not installed")
    key_dir = config.integrity.resolved_key_dir(
        embedded=config.embedded_mode, data_dir=config.embedded.data_dir
    )
    with db().read() as conn:
        last = batches.latest(conn)
        if last is None:
            return Check("merkle", OK, "no batch sealed yet")
        data: dict[str, Any] = {
            "batch_id": str(last.batch_id),
            "tree_size": last.tree_size,
            "root": "0x" + last.root_hash.hex(),
            "created_at": last.created_at,
        }
        trusted = keys.trusted_keys(key_dir)
        if not trusted:
            return Check(
                "merkle",
                WARNING,
                f"last batch {last.batch_id} (tree size {last.tree_size}) not verified: "
                f"no public key in {key_dir}",
                data,
            )
        report = verifier.verify_batch(conn, last.batch_id, trusted)
    data["verified"] = report.ok
    if not report.ok:
        problem = report.first_problem
        return Check(
            "merkle",
            DOWN,
            f"last batch {last.batch_id} FAILS verification: {problem.message if problem else 'unknown'}",
            data,
        )
    return Check("merkle", OK, f"last batch {last.batch_id} (tree size {last.tree_size}) verifies", data)


def collect(
    config: CaracalConfig,
    db: Callable[[], Database],
    platform: Callable[[], Platform] | None,
    *,
    now: datetime,
    http_get: Callable[[str], tuple[int, dict[str, Any]]] | None = None,
) -> StatusReport:
    """Every check, in the runbook's order; a check that raises is ``down`` with the error."""
    checks = [_guard("postgresql", lambda: check_postgresql(db))]
    database_up = checks[0].status != DOWN
    checks.append(_guard("kafka", lambda: check_kafka(config)))
    checks.append(_guard("redis", lambda: check_redis(config)))
    checks += check_gateways(config, http_get)
    if platform is not None:
        try:
            where = platform()
        except Exception as exc:
            checks.append(Check("platform", DOWN, _first_line(exc)))
        else:
            checks += check_daemons(where, embedded=config.embedded_mode)
    if database_up or config.bus.kind == "kafka":
        checks += check_consumer_lag(config, db)
    if database_up:
        checks.append(_guard("dlq", lambda: check_dlq(db, now)))
        checks.append(_guard("merkle", lambda: check_merkle(config, db)))
    else:
        for name in ("dlq", "merkle"):
            checks.append(Check(name, SKIPPED, "PostgreSQL is down"))
    return StatusReport(checks)
