"""Session-wide fixtures: real PostgreSQL, Redis and Kafka for the integration tests.

Fixtures (all session-scoped, started on first use, stopped when the session ends):

* ``postgres_service`` -> :class:`tests.harness.postgres.PostgresService`
  (``.uri``, ``.admin_uri(db)``, ``.connect(db)``, ``.create_database(name, template=None)``,
  ``.drop_database(name)``);
* ``redis_service`` -> :class:`tests.harness.redis_server.RedisService`
  (``.url``, ``.host``, ``.port``, ``.stop()``, ``.kill()``, ``.start()``, ``.restart()``);
* ``kafka_service`` -> :class:`tests.harness.kafka.KafkaService`
  (``.bootstrap_servers``, ``.stop()``, ``.kill()``, ``.pause()``/``.resume()``, ``.restart()``,
  ``.admin()``, ``.create_topic(name, num_partitions)``).

A session that uses none of a service never starts it. When the collected tests need Kafka or
PostgreSQL, they are started right after collection, in the background, so that the broker's
JVM boots while the first tests run; the fixture then only waits for it.

Reusing services that run elsewhere (nothing is started, stopped or deleted then, and the
control methods -- stop, kill, restart -- raise ``ServiceControlError``; check ``.managed``):

* ``CARACAL_TEST_POSTGRES_URI`` -- a superuser libpq URI, e.g. ``postgresql://postgres@localhost/postgres``;
* ``CARACAL_TEST_REDIS_URL`` -- e.g. ``redis://127.0.0.1:6379/0``;
* ``CARACAL_TEST_KAFKA_BOOTSTRAP`` -- e.g. ``127.0.0.1:9092`` (``auto.create.topics.enable`` should be
  false and internal topics need replication factor 1 on a single broker).

Other knobs: ``CARACAL_TEST_CACHE`` (cache folder for the Kafka jars, default
``~/.cache/caracal-test``), ``CARACAL_TEST_KAFKA_VERSION``, ``CARACAL_TEST_KAFKA_JAVA_OPTS``
(extra JVM options) and ``CARACAL_TEST_KAFKA_CDS=0`` (no class-data-sharing archive).

A service that cannot start fails the tests that need it, with the reason and the end of its
log; it is never skipped. Tests that stop or kill a service must start it again before they end
(a session fixture is not re-created).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from types import FrameType
from typing import Generic, TypeVar

import pytest

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # so that ``tests.harness`` imports however pytest is started
    sys.path.insert(0, str(_ROOT))

from tests.harness import stop_all  # noqa: E402
from tests.harness.kafka import KafkaService  # noqa: E402
from tests.harness.postgres import PostgresService  # noqa: E402
from tests.harness.redis_server import RedisService  # noqa: E402

POSTGRES_URI_ENV = "CARACAL_TEST_POSTGRES_URI"
REDIS_URL_ENV = "CARACAL_TEST_REDIS_URL"
KAFKA_BOOTSTRAP_ENV = "CARACAL_TEST_KAFKA_BOOTSTRAP"

T = TypeVar("T")


class _LazyService(Generic[T]):
    """One service per session: made on first :meth:`get`, or earlier by :meth:`prestart`."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._future: Future[T] | None = None
        self._lock = threading.Lock()

    def prestart(self, *, background: bool) -> None:
        with self._lock:
            if self._future is not None:
                return
            self._future = Future()
        if background:
            threading.Thread(target=self._run, name="caracal-service-start", daemon=True).start()
        else:
            self._run()

    def _run(self) -> None:
        assert self._future is not None
        try:
            self._future.set_result(self._make())
        except Exception as exc:  # raised again by get(), in the test that needs the service
            self._future.set_exception(exc)
        except BaseException as exc:  # Ctrl-C while starting: fail the fixture, stop the run
            self._future.set_exception(exc)
            raise

    def get(self) -> T:
        self.prestart(background=False)
        assert self._future is not None
        return self._future.result()


def _make_postgres() -> PostgresService:
    uri = os.environ.get(POSTGRES_URI_ENV)
    return PostgresService.external(uri) if uri else PostgresService.start()


def _make_redis() -> RedisService:
    url = os.environ.get(REDIS_URL_ENV)
    return RedisService.external(url) if url else RedisService().start()


def _make_kafka() -> KafkaService:
    bootstrap = os.environ.get(KAFKA_BOOTSTRAP_ENV)
    # Launch only: the JVM boots while other things happen; the fixture waits for it.
    return KafkaService.external(bootstrap) if bootstrap else KafkaService().launch()


_postgres: _LazyService[PostgresService] = _LazyService(_make_postgres)
_redis: _LazyService[RedisService] = _LazyService(_make_redis)
_kafka: _LazyService[KafkaService] = _LazyService(_make_kafka)


def _sigterm_to_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A SIGTERM (CI timeout, kill) would end Python without any cleanup and leave servers behind;
    # as a KeyboardInterrupt it takes pytest's normal way out, which tears the services down.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
        signal.SIG_DFL,
        None,
    ):
        signal.signal(signal.SIGTERM, _sigterm_to_keyboard_interrupt)


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly or not session.items:
        return
    needed: set[str] = set()
    for item in session.items:
        needed.update(getattr(item, "fixturenames", ()))
    if "kafka_service" in needed:
        # In this (main) thread, so the JVM gets the parent-death signal; it returns at once
        # unless the jars must be fetched first.
        _kafka.prestart(background=False)
    if "postgres_service" in needed:
        _postgres.prestart(background=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # After the fixtures' own teardown (trylast): stop every service the harness started.
    stop_all()


@pytest.fixture(scope="session")
def postgres_service() -> PostgresService:
    """A PostgreSQL server; superuser URIs via ``.uri`` and ``.admin_uri(dbname)``."""
    return _postgres.get()


@pytest.fixture(scope="session")
def redis_service() -> RedisService:
    """A Redis server; ``.url`` is ``redis://127.0.0.1:PORT/0``."""
    return _redis.get()


@pytest.fixture(scope="session")
def kafka_service() -> KafkaService:
    """A Kafka broker (KRaft combined mode, one node); ``.bootstrap_servers`` is ``127.0.0.1:PORT``."""
    service = _kafka.get()
    return service.wait_ready() if service.managed else service


# Hypothesis' per-example deadline measures wall time, which a busy 2-core machine stretches at random:
# correctness properties must not fail on timing.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("caracal", deadline=None)
_hypothesis_settings.load_profile("caracal")
