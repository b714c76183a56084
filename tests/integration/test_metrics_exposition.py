"""The four daemons' real ``/metrics``: valid for ``promtool check metrics``, and covering what ``deploy/`` queries.

One deployment for the whole module, started once: ``caracald gateway`` (``budget.backend: redis`` on the
test Redis, in front of the fake provider), ``caracald ledger-writer`` (sealing Merkle batches with a key),
``caracald metrics-aggregator`` and ``caracald audit-logger``, all on the test PostgreSQL with its event-log
bus (the consumers run the same code and export the same metrics on Kafka). Real traffic goes through them
first, so labelled series exist: an admitted call, a refused key and a denial at the gateway, metering events
and audit events (and one undecodable record of each) on the bus. Then each daemon's ``/metrics`` is scraped
once and:

* ``promtool check metrics`` accepts it with no error and no lint problem;
* every metric a Grafana dashboard or a Prometheus rule queries is exported by one of the daemons, apart from
  :data:`NOT_FROM_CARACAL`, the series Prometheus makes itself.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx2 as httpx
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from caracald.bus import pg_log
from caracald.bus.audit import AuditEmitter
from caracald.core.audit import AuditEntry, AuditEvent, AuditEventType
from caracald.core.events import AUDIT_TOPIC
from tests.deploytools import metric_family, metric_references, rule_expressions
from tests.e2e.fake_upstream import OPENAI_KEY
from tests.e2e.gateway_harness import FakeUpstreamThread, make_agent, set_model_price
from tests.harness import tail
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.postgres import PostgresService
from tests.harness.redis_server import RedisService
from tests.integration.conftest import Cli
from tests.integration.pipeline import (
    CONSUMERS,
    add_agents,
    event_log_committed,
    event_log_end,
    make_events,
    send_events,
    start_daemon,
    stop_daemon,
    unsealed_count,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration

DAEMONS = ["gateway", *CONSUMERS]

#: Metrics ``deploy/`` may query that no Caracal daemon exports, with what exports them. Keep it short:
#: anything ``caracal_*`` (and the process metrics of prometheus-client) must come from a daemon.
NOT_FROM_CARACAL = {
    "up": "Prometheus itself: the health of each scrape of a target (1 scraped, 0 failed)",
}

#: Sample-name suffixes of each metric type, as the text format writes them.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "info": ("_info",),
}


@dataclass(frozen=True)
class Scrape:
    daemon: str
    text: str
    families: dict[str, Metric]

    def series(self) -> dict[str, str]:
        """Every name the scrape can be queried by (sample names included) -> its family."""
        names: dict[str, str] = {}
        for name, family in self.families.items():
            names[name] = name
            for suffix in _SUFFIXES.get(family.type, ()):
                names[name + suffix] = name
        return names

    def samples(self, name: str) -> list[dict[str, str]]:
        """The label sets of the samples called ``name`` (``x_total``, ``x_bucket``...)."""
        return [
            sample.labels
            for family in self.families.values()
            for sample in family.samples
            if sample.name == name
        ]


def parse(daemon: str, text: str) -> Scrape:
    families = {family.name: family for family in text_string_to_metric_families(text)}
    return Scrape(daemon, text, families)


def scrape(url: str) -> str:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    return response.text


def _audit_event(i: int) -> AuditEvent:
    entry = AuditEntry(
        datetime.now(UTC), "tester@example.com", AuditEventType.OPS_PROCEDURE, f"test.metrics.{i}", details={}
    )
    return AuditEvent.new(entry)


def _bus_traffic(url: str) -> None:
    """Metering and audit events on the event log, each with one record the consumers cannot decode."""
    producer = pg_log.PgLogProducer(url)
    try:
        send_events(producer, [*make_events(add_agents(url, 2), 20), (b"k", b"not an event")])
    finally:
        producer.close()
    emitter = AuditEmitter(pg_log.PgLogProducer(url))
    try:
        for i in range(5):
            emitter.send(_audit_event(i))
        assert emitter.flush(30) == 0
        emitter.producer.send(AUDIT_TOPIC, b"{}").result(10)
    finally:
        emitter.close()


def _gateway_traffic(gateway: str, api_key: str) -> None:
    chat = {"model": "gpt-metrics", "messages": [{"role": "user", "content": "how much"}]}
    path = f"{gateway}/openai/v1/chat/completions"
    admitted = httpx.post(path, json=chat, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    assert admitted.status_code == 200, admitted.text
    refused = httpx.post(path, json=chat, headers={"Authorization": "Bearer ck_not_a_key"}, timeout=30)
    assert refused.status_code == 401, refused.text
    unpriced = {**chat, "model": "gpt-without-a-price"}
    denied = httpx.post(path, json=unpriced, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    assert denied.status_code == 422 and denied.json()["error"]["code"] == "unpriced", denied.text


def _metric_value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


@pytest.fixture(scope="module")
def scrapes(
    postgres_service: PostgresService,
    migrated_template: str,
    redis_service: RedisService,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Scrape]]:
    workdir = tmp_path_factory.mktemp("metrics")
    name = f"t_metrics_{uuid.uuid4().hex[:12]}"
    postgres_service.create_database(name, template=migrated_template)
    url = postgres_service.admin_uri(name)
    try:
        with FakeUpstreamThread() as upstream, contextlib.ExitStack() as running:
            gateway_port, gateway_metrics = free_port(), free_port()
            config = write_config(
                workdir / "caracal.yaml",
                url,
                redis={"url": redis_service.url},
                budget={"backend": "redis"},
                integrity={"key_dir": str(workdir / "keys"), "batch_size": 10, "batch_max_age_seconds": 0.5},
                gateway={
                    "host": LOOPBACK,
                    "metrics_port": gateway_metrics,
                    "cache_refresh_seconds": 0.2,
                    "upstreams": {
                        "openai": {"base_url": upstream.url, "api_key": OPENAI_KEY, "flavor": "openai"}
                    },
                },
            )
            cli = Cli(url, env={"CARACAL_CONFIG": str(config)})
            cli.ok("merkle", "generate-key")
            set_model_price(cli, "gpt-metrics", "10", "20")
            agent = make_agent(cli, "metrics-agent", allow=(f"{upstream.url}/*",))

            metrics_urls: dict[str, str] = {"gateway": f"http://{LOOPBACK}:{gateway_metrics}/metrics"}
            logs: dict[str, Path] = {}
            procs: dict[str, subprocess.Popen[bytes]] = {}
            for daemon in CONSUMERS:
                port = free_port()
                metrics_urls[daemon] = f"http://{LOOPBACK}:{port}/metrics"
                args = [
                    "--listen-host",
                    LOOPBACK,
                    "--health-port",
                    str(free_port()),
                    "--metrics-port",
                    str(port),
                ]
                logs[daemon] = workdir / f"{daemon}.log"
                procs[daemon] = start_daemon(daemon, config, *args, log=logs[daemon])
                running.callback(stop_daemon, procs[daemon], signal.SIGTERM, 60)
            logs["gateway"] = workdir / "gateway.log"
            procs["gateway"] = start_daemon(
                "gateway", config, "--port", str(gateway_port), log=logs["gateway"]
            )
            running.callback(stop_daemon, procs["gateway"], signal.SIGTERM, 60)
            gateway = f"http://{LOOPBACK}:{gateway_port}"

            def healthy() -> bool:
                for daemon, proc in procs.items():
                    assert proc.poll() is None, f"{daemon} exited:\n{tail(logs[daemon], 60)}"
                try:
                    return httpx.get(f"{gateway}/health", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(healthy, timeout=120, what="the gateway to serve")
            wait_for(
                lambda: httpx.get(f"{gateway}/stats", timeout=5).json()["cache"]["agents"] >= 1,
                what="the gateway's cache to hold the agent",
            )
            _gateway_traffic(gateway, agent.api_key)
            _bus_traffic(url)

            for daemon, (group, topic) in CONSUMERS.items():
                wait_for(
                    lambda group=group, topic=topic: (
                        event_log_committed(url, group, topic) == event_log_end(url, topic)
                    ),
                    what=f"{daemon} to drain {topic}",
                )
            wait_for(
                lambda: unsealed_count(url) == 0,
                what="every ledger event sealed",
            )
            for daemon in CONSUMERS:
                group = CONSUMERS[daemon][0]
                wait_for(
                    lambda daemon=daemon, group=group: (
                        _metric_value(scrape(metrics_urls[daemon]), "caracal_kafka_consumer_lag", group=group)
                        is not None
                    ),
                    what=f"{daemon} to report its lag",
                )
            yield {daemon: parse(daemon, scrape(metrics_urls[daemon])) for daemon in DAEMONS}
            for daemon, proc in procs.items():
                assert proc.poll() is None, f"{daemon} exited:\n{tail(logs[daemon], 60)}"
    finally:
        postgres_service.drop_database(name)


# -- promtool check metrics ----------------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed (Debian package prometheus; .ci/services.sh installs it)")
    return path


def check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_flags_what_it_should() -> None:
    """The check below can fail: a counter without ``_total`` and a family without help are reported."""
    bad = "# TYPE requests counter\nrequests 1\n# HELP x_seconds s\n# TYPE x_seconds gauge\nx_seconds 2\n"
    result = check_metrics(bad)
    assert result.returncode != 0
    assert "_total" in result.stdout + result.stderr
    good = "# HELP x_seconds Seconds of x.\n# TYPE x_seconds gauge\nx_seconds 2\n"
    assert check_metrics(good).returncode == 0


@pytest.mark.parametrize("daemon", DAEMONS)
def test_promtool_check_metrics_accepts_the_daemons_metrics(daemon: str, scrapes: dict[str, Scrape]) -> None:
    result = check_metrics(scrapes[daemon].text)
    problems = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not problems, f"{daemon}:\n{problems}"


@pytest.mark.parametrize("daemon", DAEMONS)
def test_the_scrape_holds_the_traffics_labelled_series(daemon: str, scrapes: dict[str, Scrape]) -> None:
    """The checks above saw real, labelled samples, not just the families' help lines."""
    got = scrapes[daemon]
    if daemon == "gateway":
        statuses = {labels["status"] for labels in got.samples("caracal_gateway_requests_total")}
        assert {"200", "401"} <= statuses, statuses
        assert got.samples("caracal_gateway_request_duration_seconds_bucket")
        assert got.samples("caracal_gateway_auth_failures_total")
        assert got.samples("caracal_gateway_denials_total")
        assert got.samples("caracal_gateway_admission_duration_seconds_bucket")
        assert {labels["pool"] for labels in got.samples("caracal_database_connection_pool_size")} == {
            "primary"
        }
        assert got.samples("process_resident_memory_bytes")
        return
    group = CONSUMERS[daemon][0]
    outcomes = {
        labels["outcome"]
        for labels in got.samples("caracal_consumer_records_total")
        if labels["group"] == group
    }
    assert {"applied", "dead_lettered"} <= outcomes, outcomes
    assert {"group": group} in got.samples("caracal_consumer_ready")
    assert any(labels["group"] == group for labels in got.samples("caracal_kafka_consumer_lag"))
    assert any(
        labels["group"] == group
        for labels in got.samples("caracal_kafka_message_processing_duration_seconds_bucket")
    )
    assert any(labels["group"] == group for labels in got.samples("caracal_kafka_consumer_errors_total"))
    assert any(
        labels["operation"] for labels in got.samples("caracal_database_query_duration_seconds_bucket")
    )
    if daemon == "ledger-writer":
        created = got.samples("caracal_merkle_batches_created_total")
        assert created and _metric_value(got.text, "caracal_merkle_batches_created_total") >= 1  # type: ignore[operator]
        assert got.samples("caracal_merkle_batch_processing_duration_seconds_bucket")
    if daemon == "metrics-aggregator":
        assert got.samples("caracal_agent_spend_ledger_units_total")


# -- what deploy/ queries ------------------------------------------------------------------------------------


def exported(scrapes: dict[str, Scrape]) -> dict[str, set[str]]:
    """Every queryable name any daemon exports -> the daemons exporting it."""
    names: dict[str, set[str]] = {}
    for daemon, got in scrapes.items():
        for name in got.series():
            names.setdefault(name, set()).add(daemon)
    return names


def test_every_metric_deploy_queries_is_exported_by_a_daemon(scrapes: dict[str, Scrape]) -> None:
    names = exported(scrapes)
    missing = {
        name: sorted(places)
        for name, places in metric_references().items()
        if name not in names and name not in NOT_FROM_CARACAL
    }
    assert not missing, f"queried by deploy/ but exported by no daemon: {missing}"


def test_histogram_and_counter_series_map_to_their_family(scrapes: dict[str, Scrape]) -> None:
    series = scrapes["gateway"].series()
    family = "caracal_gateway_request_duration_seconds"
    assert series[f"{family}_bucket"] == series[f"{family}_count"] == series[family] == family
    assert metric_family(f"{family}_bucket") == family
    assert series["caracal_gateway_requests_total"] == "caracal_gateway_requests"
    assert "caracal_gateway_requests_bucket" not in series
    assert "caracal_gateway_degraded_total" not in series


def test_the_allow_list_is_only_what_caracal_cannot_export(scrapes: dict[str, Scrape]) -> None:
    names = exported(scrapes)
    references = metric_references()
    for name, exporter in NOT_FROM_CARACAL.items():
        assert exporter.strip()
        assert name in references, f"{name} is allowed but deploy/ does not query it"
        assert name not in names, f"{name} is exported by {names.get(name)}: drop it from the allow-list"
        assert not name.startswith(("caracal_", "process_", "python_")), name


def test_every_daemon_exports_what_the_memory_alert_divides(scrapes: dict[str, Scrape]) -> None:
    """``CaracalHighMemoryUsage`` covers every ``caracal-*`` job: each daemon must export its numerator."""
    (alert,) = (e for e in rule_expressions() if e.source.endswith(": CaracalHighMemoryUsage"))
    assert "process_resident_memory_bytes" in alert.expr
    for daemon, got in scrapes.items():
        (sample,) = got.samples("process_resident_memory_bytes")
        assert sample == {}, daemon
        value = _metric_value(got.text, "process_resident_memory_bytes")
        assert value is not None and value > 10 * 2**20, (daemon, value)
