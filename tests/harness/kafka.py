"""A real Apache Kafka broker (KRaft, broker and controller in one JVM) for the tests.

The broker's jars come from Maven Central, fetched with ``mvn`` once into the cache folder
(``$CARACAL_TEST_CACHE/kafka-<version>``, see :mod:`tests.harness.cache`) under a file lock.
Beside them the cache keeps, made once as well:

* ``template-formatted/`` -- a log folder formatted by ``kafka.tools.StorageTool``. The quorum is
  given as static ``controller.quorum.voters``, so a formatted folder holds no port;
* ``template-warm/`` -- the log folder of one training broker started from the formatted one,
  warmed up (consumer-offsets and transaction-state topics created, a consumer group and an
  idempotent producer used, then tidied) and stopped cleanly. Every broker starts from a copy of
  it: no storage-tool run (a JVM start) per broker, and the first consumer group of a session
  does not wait for the offsets topic to be made;
* ``cds-<key>.jsa`` -- the classes the training broker loaded, as a class-data-sharing archive,
  which takes a good second off every later JVM start (``key`` follows the JVM and the jars; a
  JVM that cannot use it just starts without it).

Run ``python -m tests.harness.kafka --fetch`` to do all that ahead of a test run.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.harness import (
    ServiceControlError,
    ServiceStartError,
    child_argv,
    make_workdir,
    register_cleanup,
    remove_tree,
    stop_process,
    tail,
)
from tests.harness.cache import cache_dir, cache_lock
from tests.harness.ports import LOOPBACK, free_ports, port_accepts

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient

KAFKA_VERSION = os.environ.get("CARACAL_TEST_KAFKA_VERSION", "4.4.0")
# Kafka logs through slf4j 1.7 and ships log4j2; this bridge joins the two.
LOG4J_SLF4J_BRIDGE = ("org.apache.logging.log4j", "log4j-slf4j-impl", "2.25.5")
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
NODE_ID = 1
READY_TIMEOUT = 60.0
_START_ATTEMPTS = 3

JAVA_HEAP = ["-Xms256m", "-Xmx512m"]
# Startup matters more than peak speed here (2 cores): the serial collector and one C1 compiler
# thread start the broker about twice as fast as the defaults (G1, C1 and C2), with less CPU.
JAVA_OPTS = [
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:CICompilerCount=1",
    "-XX:-UsePerfData",
    "-XX:+ExitOnOutOfMemoryError",
    "-Xshare:auto",
    "-Djava.awt.headless=true",
    "-Dlog4j2.disable.jmx=true",
]
EXTRA_JAVA_OPTS_ENV = "CARACAL_TEST_KAFKA_JAVA_OPTS"
CDS_ENV = "CARACAL_TEST_KAFKA_CDS"  # "0" turns the class-data-sharing archive off

LOG4J2_PROPERTIES = """\
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = warn
logger.statechange.name = state.change.logger
logger.statechange.level = warn
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = warn
"""

# Settings for a single, throw-away test broker. Internal topics get one replica and one
# partition (fast to create on first use); the log cleaner gets a small dedup buffer (the default
# 128 MiB would take a quarter of the heap); group session timeouts may be short for fault tests.
BROKER_SETTINGS: dict[str, str] = {
    "num.partitions": "3",
    "default.replication.factor": "1",
    "min.insync.replicas": "1",
    "auto.create.topics.enable": "false",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "share.coordinator.state.topic.num.partitions": "1",
    "group.initial.rebalance.delay.ms": "0",
    "group.min.session.timeout.ms": "1000",
    "group.consumer.min.session.timeout.ms": "2000",
    "group.consumer.session.timeout.ms": "10000",
    "group.consumer.min.heartbeat.interval.ms": "500",
    "group.consumer.heartbeat.interval.ms": "1000",
    # A broker restarted after SIGKILL must wait until its old session expires (9 s by default).
    "broker.heartbeat.interval.ms": "500",
    "broker.session.timeout.ms": "3000",
    "log.cleaner.dedupe.buffer.size": str(4 * 1024 * 1024),
    "num.network.threads": "2",
    "num.io.threads": "4",
    "num.recovery.threads.per.data.dir": "1",
    "background.threads": "4",
}

_log = logging.getLogger(__name__)
# librdkafka's own messages (connection retries while a broker starts): to logging, where pytest
# captures them, and not to stderr through logging's last-resort handler outside pytest.
_client_log = logging.getLogger(f"{__name__}.clients")
_client_log.addHandler(logging.NullHandler())


# --------------------------------------------------------------------------- distribution


@dataclass(frozen=True)
class KafkaDist:
    """The broker's files in the cache folder."""

    version: str
    home: Path
    libs: Path
    template: Path
    log4j_config: Path
    cds_archive: Path | None

    @property
    def classpath(self) -> str:
        return f"{self.libs}/*"


def kafka_home(version: str = KAFKA_VERSION) -> Path:
    return cache_dir() / f"kafka-{version}"


def _pom(version: str) -> str:
    group, artifact, bridge_version = LOG4J_SLF4J_BRIDGE
    return f"""\
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by tests/harness/kafka.py: the jars an Apache Kafka {version} broker needs. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>caracal.test</groupId>
  <artifactId>kafka-broker-libs</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <dependency>
      <groupId>{group}</groupId>
      <artifactId>{artifact}</artifactId>
      <version>{bridge_version}</version>
    </dependency>
  </dependencies>
</project>
"""


def find_java() -> str:
    """The ``java`` to run the broker with: ``$JAVA_HOME/bin/java``, else the one on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise ServiceStartError(
            "java not found: Kafka needs Java 17+ (apt-get install -y openjdk-17-jre-headless)"
        )
    return java


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fetch_libs(home: Path, version: str) -> None:
    """Fetch the jars with Maven into ``home/libs`` (caller holds the lock)."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceStartError(
            "mvn not found: the Kafka broker's jars are fetched with Maven (apt-get install -y maven)"
        )
    pom_text = _pom(version)
    (home / "pom.xml").write_text(pom_text)
    staging = home / "libs.partial"
    remove_tree(staging)
    log = home / "mvn.log"
    argv = [
        mvn,
        "-B",
        "-q",
        "-f",
        str(home / "pom.xml"),
        f"{DEPENDENCY_PLUGIN}:copy-dependencies",
        f"-DoutputDirectory={staging}",
        "-DincludeScope=runtime",
    ]
    with log.open("wb") as out:
        out.write(f"$ {shlex.join(argv)}\n".encode())
        out.flush()
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    if result.returncode != 0:
        raise ServiceStartError(
            f"fetching the Kafka {version} jars with Maven failed (exit {result.returncode}); "
            f"end of {log}:\n{tail(log)}"
        )
    if not (staging / f"kafka_2.13-{version}.jar").is_file():
        raise ServiceStartError(f"Maven ran but {staging} has no kafka_2.13-{version}.jar; see {log}")
    remove_tree(home / "libs")
    staging.rename(home / "libs")
    (home / "libs.ok").write_text(_digest(pom_text))


def _server_properties(*, port: int, controller_port: int, data_dir: Path, host: str = LOOPBACK) -> str:
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(NODE_ID),
        "controller.quorum.voters": f"{NODE_ID}@{host}:{controller_port}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data_dir),
        **BROKER_SETTINGS,
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def _format_template(home: Path, libs: Path, log4j_config: Path) -> Path:
    """Format a log folder once into ``home/template-formatted`` (caller holds the lock)."""
    final = home / "template-formatted"
    staging = home / "template-formatted.partial"
    remove_tree(staging)
    staging.mkdir()
    props = staging / "server.properties"
    # Ports are not recorded by a format with static voters; any will do.
    props.write_text(_server_properties(port=9092, controller_port=9093, data_dir=staging / "data"))
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    log = home / "format.log"
    argv = [
        find_java(),
        *JAVA_OPTS,
        f"-Dlog4j2.configurationFile={log4j_config}",
        "-cp",
        f"{libs}/*",
        "kafka.tools.StorageTool",
        "format",
        "-t",
        cluster_id,
        "-c",
        str(props),
    ]
    with log.open("wb") as out:
        out.write(f"$ {shlex.join(argv)}\n".encode())
        out.flush()
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    if result.returncode != 0 or not (staging / "data" / "meta.properties").is_file():
        raise ServiceStartError(
            f"formatting a Kafka log folder failed (exit {result.returncode}); end of {log}:\n{tail(log)}"
        )
    props.unlink()
    remove_tree(final)
    staging.rename(final)
    return final / "data"


def _cds_key(java: str, libs: Path) -> str:
    real = Path(java).resolve()
    parts = [str(real), *JAVA_OPTS]
    for candidate in (real.parent.parent / "lib" / "server" / "libjvm.so", real):
        if candidate.exists():
            stat = candidate.stat()
            parts.append(f"{candidate}:{stat.st_size}:{stat.st_mtime_ns}")
            break
    for jar in sorted(libs.glob("*.jar")):
        parts.append(f"{jar.name}:{jar.stat().st_size}")
    return _digest("\n".join(parts))


@contextlib.contextmanager
def _timed(what: str) -> Iterator[None]:
    """Tell on stderr how long a one-time preparation step took (they explain a slow run)."""
    started = time.monotonic()
    yield
    print(f"caracal test harness: {what} in {time.monotonic() - started:.1f} s", file=sys.stderr)


def _recently_failed(marker: Path, *, ttl: float = 24 * 3600.0) -> bool:
    """A failed training is not tried again for a day (it costs a broker start)."""
    try:
        return time.time() - marker.stat().st_mtime < ttl
    except OSError:
        return False


def _cds_enabled() -> bool:
    return os.environ.get(CDS_ENV, "1") != "0"


WARMUP = "caracal-harness-warmup"


def _warm_up(broker: KafkaService) -> None:
    """Use what tests use first, so the broker has it ready: the consumer-offsets and
    transaction-state topics, a producer-id block, a consumer group; then tidy up."""
    from confluent_kafka import Consumer, Producer

    bootstrap = broker.bootstrap_servers
    broker.create_topic(WARMUP, num_partitions=1)
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "logger": _client_log}
    )
    producer.produce(WARMUP, key=b"k", value=b"v")
    if producer.flush(60) != 0:
        raise RuntimeError("warm-up: an idempotent produce was not delivered")
    txn = Producer({"bootstrap.servers": bootstrap, "transactional.id": WARMUP, "logger": _client_log})
    txn.init_transactions(60)
    txn.begin_transaction()
    txn.produce(WARMUP, key=b"k", value=b"t")
    txn.commit_transaction(60)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": WARMUP,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "logger": _client_log,
        }
    )
    try:
        consumer.subscribe([WARMUP])
        deadline = time.monotonic() + 60
        while not consumer.consume(num_messages=10, timeout=0.5):
            if time.monotonic() > deadline:
                raise RuntimeError("warm-up: the consumer group got no message")
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    admin = broker.admin()
    admin.delete_consumer_groups([WARMUP], request_timeout=30)[WARMUP].result(timeout=30)
    broker.delete_topic(WARMUP)


def _train(dist: KafkaDist, home: Path, archive: Path | None) -> None:
    """Run one broker from the formatted folder, warm it up and stop it cleanly; keep its log
    folder as ``home/template-warm`` and, when ``archive`` is given, the classes it loaded as a
    class-data-sharing archive there. A failure is remembered for a day and is not fatal."""
    failed = home / "training.failed"
    partial = archive.with_name(f"{archive.stem}.{os.getpid()}.partial") if archive else None
    if partial is not None:
        partial.unlink(missing_ok=True)
    broker = KafkaService(_dist=dist, _cds_dump=partial)
    staging = home / "template-warm.partial"
    try:
        broker.start(timeout=READY_TIMEOUT * 2)
        _warm_up(broker)
        broker.stop(timeout=60)  # a CDS archive is written while the JVM exits
        if broker.data_dir is None or not (broker.data_dir / "meta.properties").is_file():
            raise RuntimeError("the warmed-up broker left no log folder")
        remove_tree(staging)
        staging.mkdir()
        shutil.copytree(broker.data_dir, staging / "data")
        for leftover in (staging / "data").glob("*-delete"):  # the deleted warm-up topic
            remove_tree(leftover)
        remove_tree(home / "template-warm")
        staging.rename(home / "template-warm")
        if archive is not None and partial is not None:
            if not partial.is_file() or partial.stat().st_size == 0:
                raise RuntimeError(f"the JVM wrote no CDS archive; end of its log:\n{broker.log_tail()}")
            partial.rename(archive)
            for stale in home.glob("cds-*.jsa"):  # made for another JVM or other JVM options
                if stale != archive:
                    stale.unlink(missing_ok=True)
        failed.unlink(missing_ok=True)
    except Exception as exc:
        failed.write_text(f"{exc!r}\n")
        print(
            f"caracal test harness: Kafka warm-up training failed, going on without it ({exc!r})",
            file=sys.stderr,
        )
    finally:
        broker.close()
        remove_tree(staging)
        if partial is not None:
            partial.unlink(missing_ok=True)


def ensure_kafka(version: str = KAFKA_VERSION, *, with_cds: bool | None = None) -> KafkaDist:
    """Make sure the cache folder has the broker's jars, log-folder template and CDS archive.

    Each step happens at most once per cache folder and version (the training again when the
    JVM changes); other processes wait on the lock meanwhile. Raises
    :class:`ServiceStartError` when the jars cannot be had or a log folder cannot be formatted.
    """
    home = kafka_home(version)
    home.mkdir(parents=True, exist_ok=True)
    libs = home / "libs"
    log4j_config = home / "log4j2.properties"
    want_cds = _cds_enabled() if with_cds is None else with_cds
    with cache_lock(f"kafka-{version}"):
        marker = home / "libs.ok"
        if not (marker.is_file() and marker.read_text() == _digest(_pom(version)) and libs.is_dir()):
            with _timed(f"fetched the Kafka {version} jars with Maven into {libs}"):
                _fetch_libs(home, version)
        if not log4j_config.is_file() or log4j_config.read_text() != LOG4J2_PROPERTIES:
            log4j_config.write_text(LOG4J2_PROPERTIES)
        formatted = home / "template-formatted" / "data"
        if not (formatted / "meta.properties").is_file():
            with _timed("formatted the Kafka log-folder template"):
                formatted = _format_template(home, libs, log4j_config)
        warm = home / "template-warm" / "data"
        archive = home / f"cds-{_cds_key(find_java(), libs)}.jsa" if want_cds else None
        missing = not (warm / "meta.properties").is_file() or (archive is not None and not archive.is_file())
        if missing and not _recently_failed(home / "training.failed"):
            base = KafkaDist(version, home, libs, formatted, log4j_config, None)
            with _timed("warmed up a Kafka broker once for the log-folder template and CDS archive"):
                _train(base, home, archive)
        template = warm if (warm / "meta.properties").is_file() else formatted
        usable_archive = archive if archive is not None and archive.is_file() else None
        return KafkaDist(version, home, libs, template, log4j_config, usable_archive)


# --------------------------------------------------------------------------- the broker


class KafkaService:
    """One Kafka broker+controller (KRaft combined mode) on two free loopback ports.

    ``bootstrap_servers`` is ``127.0.0.1:PORT``. A managed broker can be stopped (SIGTERM,
    controlled shutdown), killed (SIGKILL), paused/resumed (SIGSTOP/SIGCONT) and restarted on the
    same ports and log folder, with its topics and offsets. An external one
    (``CARACAL_TEST_KAFKA_BOOTSTRAP``) only offers ``bootstrap_servers`` and the client helpers.
    """

    def __init__(
        self,
        *,
        bootstrap_servers: str | None = None,
        host: str = LOOPBACK,
        version: str = KAFKA_VERSION,
        _dist: KafkaDist | None = None,
        _cds_dump: Path | None = None,
    ) -> None:
        self.managed = bootstrap_servers is None
        self.host = host
        self.version = version if _dist is None else _dist.version
        self.port: int | None = None
        self.controller_port: int | None = None
        self._bootstrap = bootstrap_servers
        self.workdir: Path | None = None
        self.startup_seconds: float | None = None  # first start: launch to ready
        self.last_start_seconds: float | None = None  # latest start or restart
        self._dist = _dist
        self._cds_dump = _cds_dump
        self._proc: subprocess.Popen[bytes] | None = None
        self._launched_at = 0.0
        self._log_offset = 0
        self._ready = False
        self._lock = threading.RLock()
        self._registered = False

    @classmethod
    def external(cls, bootstrap_servers: str) -> KafkaService:
        return cls(bootstrap_servers=bootstrap_servers)

    def __repr__(self) -> str:
        return f"KafkaService(bootstrap_servers={self._bootstrap!r}, managed={self.managed}, pid={self.pid})"

    # -- addresses and state

    @property
    def bootstrap_servers(self) -> str:
        if self._bootstrap is None:
            raise ServiceControlError("the Kafka broker has not been launched yet")
        return self._bootstrap

    @property
    def data_dir(self) -> Path | None:
        return self.workdir / "data" if self.workdir else None

    @property
    def log_path(self) -> Path | None:
        return self.workdir / "broker.log" if self.workdir else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def java_argv(self) -> list[str]:
        """The command line the broker is (or would be) started with."""
        dist = self._require_dist()
        assert self.workdir is not None
        argv = [find_java(), *JAVA_HEAP, *JAVA_OPTS]
        if self._cds_dump is not None:
            argv.append(f"-XX:ArchiveClassesAtExit={self._cds_dump}")
        elif dist.cds_archive is not None:
            argv.append(f"-XX:SharedArchiveFile={dist.cds_archive}")
        argv += shlex.split(os.environ.get(EXTRA_JAVA_OPTS_ENV, ""))
        argv += [
            f"-Dlog4j2.configurationFile={dist.log4j_config}",
            "-cp",
            dist.classpath,
            "kafka.Kafka",
            str(self.workdir / "server.properties"),
        ]
        return argv

    def _require_managed(self, what: str) -> None:
        if not self.managed:
            raise ServiceControlError(f"cannot {what} the external Kafka at {self._bootstrap}")

    def _require_dist(self) -> KafkaDist:
        if self._dist is None:
            self._dist = ensure_kafka(self.version)
        return self._dist

    # -- lifecycle

    def launch(self) -> KafkaService:
        """Start the JVM and return at once (see :meth:`wait_ready`). A no-op when running.

        The first launch fetches the jars when the cache has none, copies the log-folder
        template and picks the ports; later launches (restarts) keep ports and data.
        """
        self._require_managed("launch")
        with self._lock:
            if self.is_running:
                return self
            dist = self._require_dist()
            if self.workdir is None:
                self.workdir = make_workdir("kafka")
                if not self._registered:
                    register_cleanup(self.close)
                    self._registered = True
                with cache_lock(f"kafka-{dist.version}"):  # not while it is being remade
                    shutil.copytree(dist.template, self.workdir / "data")
                self._pick_ports()
            self._ready = False
            self._spawn()
        return self

    def _pick_ports(self) -> None:
        assert self.workdir is not None
        self.port, self.controller_port = free_ports(2, self.host)
        self._bootstrap = f"{self.host}:{self.port}"
        (self.workdir / "server.properties").write_text(
            _server_properties(
                port=self.port,
                controller_port=self.controller_port,
                data_dir=self.workdir / "data",
                host=self.host,
            )
        )

    def _spawn(self) -> None:
        assert self.log_path is not None
        assert self.workdir is not None
        argv = self.java_argv()
        with self.log_path.open("ab") as out:
            out.write(f"--- starting {shlex.join(argv)}\n".encode())
            out.flush()
            self._launched_at = time.monotonic()
            self._proc = subprocess.Popen(
                child_argv(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        self._log_offset = self.log_path.stat().st_size

    def _new_log_text(self) -> str:
        """What the current JVM wrote to the log so far."""
        assert self.log_path is not None
        with self.log_path.open("rb") as handle:
            handle.seek(self._log_offset)
            return handle.read().decode("utf-8", errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> KafkaService:
        """Wait until the broker answers metadata requests; raise with the log's end if not.

        On the very first start a port taken meanwhile by someone else is replaced and the
        broker started again (at most 3 times).
        """
        self._require_managed("wait for")
        with self._lock:
            if self._ready and self.is_running:
                return self
            if self._proc is None:
                self.launch()
            first_start = self.startup_seconds is None
            for attempt in range(1, _START_ATTEMPTS + 1):
                try:
                    self._wait_ready_once(timeout)
                    break
                except ServiceStartError:
                    bind_error = "Address already in use" in self._new_log_text()
                    if first_start and bind_error and attempt < _START_ATTEMPTS:
                        stop_process(self._require_proc(), timeout=10, sig=signal.SIGKILL)
                        self._pick_ports()
                        self._spawn()
                        continue
                    raise
            self._ready = True
            elapsed = time.monotonic() - self._launched_at
            self.last_start_seconds = elapsed
            if first_start:
                self.startup_seconds = elapsed
            _log.info("Kafka broker ready at %s after %.2f s", self._bootstrap, elapsed)
        return self

    def _require_proc(self) -> subprocess.Popen[bytes]:
        assert self._proc is not None
        return self._proc

    def _wait_ready_once(self, timeout: float) -> None:
        proc = self._require_proc()
        assert self.port is not None
        assert self.log_path is not None
        deadline = time.monotonic() + timeout
        admin: AdminClient | None = None
        last_error = "no answer yet"
        while True:
            if proc.poll() is not None:
                raise ServiceStartError(
                    f"the Kafka broker exited with code {proc.returncode} while starting; "
                    f"end of {self.log_path}:\n{tail(self.log_path)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stop_process(proc, timeout=10, sig=signal.SIGKILL)
                raise ServiceStartError(
                    f"the Kafka broker at {self._bootstrap} was not ready within {timeout:.0f} s "
                    f"({last_error}); end of {self.log_path}:\n{tail(self.log_path)}"
                )
            if admin is None:
                if not port_accepts(self.port, self.host):
                    time.sleep(0.05)
                    continue
                admin = self.admin(**{"reconnect.backoff.ms": 50, "reconnect.backoff.max.ms": 250})
            try:
                metadata = admin.list_topics(timeout=min(2.0, max(remaining, 0.1)))
            except Exception as exc:  # KafkaException while the broker is not serving yet
                last_error = repr(exc)
                continue
            if metadata.brokers:
                return
            last_error = "metadata lists no broker"
            time.sleep(0.05)

    def start(self, timeout: float = READY_TIMEOUT) -> KafkaService:
        """:meth:`launch` and :meth:`wait_ready`."""
        return self.launch().wait_ready(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Controlled shutdown (SIGTERM); SIGKILL after ``timeout`` s. Data and ports are kept."""
        self._require_managed("stop")
        with self._lock:
            self._ready = False
            if self._proc is not None:
                stop_process(self._proc, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would. Data and ports are kept."""
        self._require_managed("kill")
        with self._lock:
            self._ready = False
            if self._proc is not None:
                stop_process(self._proc, timeout=0, sig=signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP the broker: connections stay open but nothing answers."""
        self._require_managed("pause")
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused broker."""
        self._require_managed("resume")
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = READY_TIMEOUT, *, kill: bool = False) -> KafkaService:
        """Stop (or kill, with ``kill=True``) and start again on the same ports and log folder."""
        self._require_managed("restart")
        with self._lock:
            if kill:
                self.kill()
            else:
                self.stop()
            return self.start(timeout)

    def close(self) -> None:
        """Stop the broker and remove its folder. Idempotent."""
        if not self.managed:
            return
        with self._lock:
            self._ready = False
            if self._proc is not None:
                stop_process(self._proc, timeout=30)
            remove_tree(self.workdir)
            self.workdir = None

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines) if self.log_path else "<no log>"

    # -- client helpers

    def client_config(self, **overrides: Any) -> dict[str, Any]:
        """A librdkafka config for this broker; ``overrides`` use dotted names via ``**{...}``."""
        return {"bootstrap.servers": self.bootstrap_servers, **overrides}

    def admin(self, **overrides: Any) -> AdminClient:
        """A ``confluent_kafka.admin.AdminClient`` for this broker (logs go to :mod:`logging`)."""
        from confluent_kafka.admin import AdminClient

        return AdminClient(self.client_config(logger=_client_log, **overrides))

    def create_topic(
        self,
        name: str,
        num_partitions: int = 3,
        *,
        config: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Create topic ``name`` (one replica) and wait until the broker has it."""
        from confluent_kafka.cimpl import NewTopic

        topic = NewTopic(name, num_partitions=num_partitions, replication_factor=1, config=config or {})
        admin = self.admin()  # must outlive the future: a destroyed handle fails it
        futures = admin.create_topics([topic], operation_timeout=timeout, request_timeout=timeout)
        futures[name].result(timeout=timeout)

    def delete_topic(self, name: str, *, timeout: float = 30.0) -> None:
        admin = self.admin()
        futures = admin.delete_topics([name], operation_timeout=timeout, request_timeout=timeout)
        futures[name].result(timeout=timeout)


def start_kafka(timeout: float = READY_TIMEOUT) -> KafkaService:
    """Start a managed broker on free ports and wait until it is ready."""
    return KafkaService().start(timeout)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.kafka", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--fetch", action="store_true", help="fetch the jars and prepare the cache, then exit"
    )
    parser.add_argument(
        "--start", action="store_true", help="start a broker, print its address, stop on Ctrl-C"
    )
    parser.add_argument(
        "--kafka-version", default=KAFKA_VERSION, help=f"Kafka version (default {KAFKA_VERSION})"
    )
    args = parser.parse_args(argv)
    if not (args.fetch or args.start):
        parser.error("nothing to do: give --fetch or --start")
    started = time.monotonic()
    dist = ensure_kafka(args.kafka_version)
    print(
        f"Kafka {dist.version}: {len(list(dist.libs.glob('*.jar')))} jars in {dist.libs}, "
        f"CDS archive {dist.cds_archive or 'none'} (ready in {time.monotonic() - started:.1f} s)"
    )
    if args.start:

        def interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, interrupt)
        broker = KafkaService(version=args.kafka_version).start()
        print(f"bootstrap.servers={broker.bootstrap_servers} (ready in {broker.startup_seconds:.2f} s)")
        print(f"log: {broker.log_path}")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
        broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
