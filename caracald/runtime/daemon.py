"""The shell every consumer daemon runs in: signals, health and metrics endpoints, systemd notifications.

``caracald ledger-writer``, ``metrics-aggregator`` and ``audit-logger`` each build their consume loop and
hand it to :func:`run_consumer`, which

* serves ``/healthz`` (liveness: the loop is turning, also while it waits out an outage; 503 once it has
  not turned for ``stale_after`` seconds) and ``/readyz`` (readiness: it can read the bus and write its
  store) on the health port, 8080 by default, with a small JSON body saying why;
* serves Prometheus's ``/metrics`` (prometheus-client's default registry) on the metrics port, 9090;
* sends ``READY=1`` to systemd once the loop has polled the bus for the first time (it is consuming), and
  ``WATCHDOG=1`` from the loop itself (its ``on_beat`` hook, called on every turn), never from a thread of
  its own, so a stuck loop stops the pings and systemd restarts the daemon;
* turns SIGTERM and SIGINT into a graceful stop: the batch in hand is applied and committed, then the loop
  ends, everything is closed and the process exits 0 (``STOPPING=1`` is sent first);
* dumps every thread's stack to its log on SIGUSR1 (what a stuck daemon is doing);
* tunes the interpreter for a consumer: the GIL switch interval and the garbage collector's thresholds
  (:func:`tune_interpreter`).

A port that cannot be bound (in use) is reported in the log and the daemon runs on without that endpoint:
consuming matters more than being observed, and the probes failing will say so.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Protocol

from caracald.runtime.sdnotify import Notifier, Watchdog

_log = logging.getLogger(__name__)

DEFAULT_HEALTH_PORT = 8080
DEFAULT_METRICS_PORT = 9090

#: A consumer daemon's GIL switch interval, against CPython's 5 ms. A consumer polls and decodes on one thread
#: while another waits on its database, and that one needs the GIL back for a moment after every wait (each
#: chunk of a COPY, each result). At 5 ms a turn the ledger writer's database stage spent about a quarter of
#: its time waiting for the GIL: 11,400 events/s against 14,500 at 1 ms (bench/ledger_writer_bench.py).
CONSUMER_SWITCH_INTERVAL = 0.001
#: The cyclic garbage collector's thresholds for a consumer daemon (CPython's: 700, 10, 10). A batch holds
#: thousands of records alive at once, so at 700 new objects a pass the collector scanned each batch several
#: times over and promoted it to the older generations to be scanned again: 4 to 5 us per record polled.
#: Batches are freed by reference counting anyway; cycles are rare and still collected.
CONSUMER_GC_THRESHOLDS = (50_000, 20, 100)


def tune_interpreter() -> None:
    """Tune this process for consuming: the GIL switch interval and the garbage collector's thresholds, with
    everything built so far (modules, clients, connections) kept out of the collector's full passes."""
    sys.setswitchinterval(CONSUMER_SWITCH_INTERVAL)
    gc.set_threshold(*CONSUMER_GC_THRESHOLDS)
    gc.freeze()


class LoopHealth(Protocol):
    ready: bool
    last_poll: float | None
    last_commit: float | None
    last_heartbeat: float
    last_error: str | None
    started_at: float

    def live(self, *, now: float | None = None, stale_after: float = 60.0) -> bool: ...


class ConsumerLoop(Protocol):
    """What the shell needs of a consume loop (the ledger writer and the :class:`ConsumerRunner`)."""

    group: str
    health: Any  # LoopHealth
    on_beat: Callable[[], None] | None

    def run(self) -> None: ...

    def stop(self) -> None: ...


def configure_logging(level: str = "INFO") -> None:
    """JSON-free, one line per record on stderr (journald and kubectl logs add their own timestamps)."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("psycopg.pool").setLevel(logging.WARNING)


def health_report(health: LoopHealth, *, stale_after: float = 60.0) -> dict[str, Any]:
    now = time.time()
    return {
        "live": health.live(now=now, stale_after=stale_after),
        "ready": bool(health.ready),
        "seconds_since_heartbeat": round(now - health.last_heartbeat, 3),
        "seconds_since_poll": None if health.last_poll is None else round(now - health.last_poll, 3),
        "seconds_since_commit": None if health.last_commit is None else round(now - health.last_commit, 3),
        "last_error": health.last_error,
        "uptime_seconds": round(now - health.started_at, 3),
    }


class HealthServer:
    """``/healthz`` and ``/readyz`` for one loop, on a thread of its own."""

    def __init__(self, name: str, health: LoopHealth, host: str, port: int, *, stale_after: float = 60.0):
        self.name = name
        self.health = health
        self.stale_after = stale_after
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                report = health_report(server.health, stale_after=server.stale_after)
                report["daemon"] = server.name
                if path in ("/healthz", "/livez"):
                    ok = report["live"]
                elif path == "/readyz":
                    ok = report["live"] and report["ready"]
                else:
                    self.send_error(404)
                    return
                report["status"] = "ok" if ok else "unavailable"
                body = json.dumps(report).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # probes every few seconds would flood the log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="caracal-health", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class MetricsServer:
    """Prometheus's ``/metrics`` from the default registry."""

    def __init__(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, addr=host)
        self.port = int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class ReadyNotifier:
    """The loop's ``on_beat``: READY=1 once it has polled, then rate-limited WATCHDOG=1 pings."""

    def __init__(self, loop: ConsumerLoop, notifier: Notifier, status: str) -> None:
        self.loop = loop
        self.notifier = notifier
        self.watchdog = Watchdog(notifier)
        self.status = status
        self.sent_ready = False
        self._lock = threading.Lock()

    def __call__(self) -> None:
        if not self.sent_ready and self.loop.health.last_poll is not None:
            with self._lock:
                if not self.sent_ready:
                    self.sent_ready = True
                    self.notifier.ready(self.status)
        self.watchdog.feed()


def run_consumer(
    name: str,
    loop: ConsumerLoop,
    *,
    close: Callable[[], None],
    host: str = "0.0.0.0",  # noqa: S104 - probes and scrapers come from outside the pod or host
    health_port: int | None = DEFAULT_HEALTH_PORT,
    metrics_port: int | None = DEFAULT_METRICS_PORT,
    status: str | None = None,
    install_signals: bool = True,
) -> int:
    """Run ``loop`` until SIGTERM/SIGINT (or it ends); returns the exit code (0 after a clean stop)."""
    tune_interpreter()
    servers: list[HealthServer | MetricsServer] = []
    if health_port is not None:
        try:
            health = HealthServer(name, loop.health, host, health_port).start()
            servers.append(health)
            _log.info("%s: /healthz and /readyz on %s:%d", name, host, health.port)
        except OSError as exc:
            _log.error("%s: cannot serve /healthz and /readyz on %s:%d: %s", name, host, health_port, exc)
    if metrics_port is not None:
        try:
            metrics = MetricsServer(host, metrics_port)
            servers.append(metrics)
            _log.info("%s: /metrics on %s:%d", name, host, metrics.port)
        except OSError as exc:
            _log.error("%s: cannot serve /metrics on %s:%d: %s", name, host, metrics_port, exc)
    notifier = Notifier.from_environment()
    loop.on_beat = ReadyNotifier(loop, notifier, status or f"{name}: consuming")
    with contextlib.suppress(ValueError, OSError, AttributeError):  # not the main thread, or no SIGUSR1
        # `kill -USR1 <pid>` writes every thread's stack to the log: what a stuck daemon is doing
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    if install_signals:

        def handler(signum: int, frame: FrameType | None) -> None:
            loop.stop()  # first: whatever the handler interrupted, the loop is told
            _log.info("%s: signal %d: finishing the batch in hand, then stopping", name, signum)
            notifier.stopping(f"{name}: stopping")

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
    code = 0
    try:
        loop.run()
    except Exception:
        _log.exception("%s: the consume loop failed", name)
        code = 1
    finally:
        notifier.stopping(f"{name}: stopping")
        try:
            close()
        finally:
            for server in servers:
                server.close()
            notifier.close()
    _log.info("%s stopped", name)
    return code
