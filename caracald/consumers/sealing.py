"""Sealing from the ledger writer: the events it committed go into signed Merkle batches, periodically.

``caracald ledger-writer`` (and ``caracald up``) run a :class:`PeriodicSealer` next to the consume loop. Every
``interval`` seconds it loads the active signing key from ``integrity.key_dir`` and calls
:func:`caracald.integrity.sealer.seal_pending`, which seals every batch that is due (``integrity.batch_size``
events, or an event older than ``integrity.batch_max_age_seconds``). Any number of writers may do so at once:
the sealer's advisory lock lets one seal while the others return at once.

Without a signing key the writer still writes the ledger, and says once in its log that nothing is sealed
until ``caracal merkle generate-key`` makes one (it picks the key up on its next round, no restart needed).
A sealing failure (PostgreSQL away, a key the database does not know) is logged and retried on the next
round: the ledger writer itself is never stopped by it.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg

from caracald.core.errors import CaracalError, NotFoundError
from caracald.runtime.config import CaracalConfig

_log = logging.getLogger(__name__)

#: Seconds between sealing rounds. A round with nothing due costs a few index lookups; a batch the writer
#: filled waits at most this long to be sealed (and a backlog's last batches too).
DEFAULT_INTERVAL = 1.0


class PeriodicSealer:
    """Seals due batches every ``interval`` seconds on a thread of its own, until :meth:`stop`."""

    def __init__(
        self,
        database_url: str,
        key_dir: Path,
        *,
        batch_size: int = 1000,
        max_age: timedelta = timedelta(minutes=5),
        interval: float = DEFAULT_INTERVAL,
        connect_timeout: int = 5,
    ) -> None:
        self.database_url = database_url
        self.key_dir = key_dir
        self.batch_size = batch_size
        self.max_age = max_age
        self.interval = interval
        self.connect_timeout = connect_timeout
        self.sealed_events = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="caracal-sealer", daemon=True)
        self._said_no_key = False
        #: Kept between rounds (used by the sealing thread only): a new backend every second costs
        #: PostgreSQL more than the rounds with nothing to seal.
        self._conn: psycopg.Connection[Any] | None = None

    @classmethod
    def for_config(
        cls, config: CaracalConfig, database_url: str, *, interval: float = DEFAULT_INTERVAL
    ) -> PeriodicSealer:
        integrity = config.integrity
        return cls(
            database_url,
            integrity.resolved_key_dir(embedded=config.embedded_mode, data_dir=config.embedded.data_dir),
            batch_size=integrity.batch_size,
            max_age=timedelta(seconds=integrity.batch_max_age_seconds),
            interval=interval,
            connect_timeout=config.database.connect_timeout_seconds,
        )

    def start(self) -> PeriodicSealer:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():  # else the round in progress still uses it
            self._close()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._close()
            self._conn = psycopg.connect(
                self.database_url,
                autocommit=True,
                connect_timeout=self.connect_timeout,
                application_name="caracal-ledger-writer-sealer",
            )
        return self._conn

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.seal_once()

    def seal_once(self) -> int:
        """One round: seal what is due; returns how many events were sealed."""
        from caracald.integrity import keys, sealer

        try:
            key = keys.load_signing_key(self.key_dir)
        except NotFoundError as exc:
            if not self._said_no_key:
                _log.warning("ledger events are not sealed into Merkle batches: %s", exc)
                self._said_no_key = True
            return 0
        except (CaracalError, OSError) as exc:
            self._failed(f"cannot load the signing key: {exc}")
            return 0
        self._said_no_key = False
        try:
            conn = self._connection()
            # Wait for another sealer, not for a writer: a batch a writer may still be adding to is sealed
            # on a later round (by then it has a later batch after it, or the writer is idle), so the
            # writer never waits for the sealing.
            result = sealer.seal_pending(
                conn,
                key,
                max_batch=self.batch_size,
                max_age=self.max_age,
                wait=True,
                wait_for_writers=False,
            )
        except (psycopg.Error, OSError, CaracalError) as exc:
            self._close()  # the next round starts on a new connection
            self._failed(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            return 0
        if self.last_error is not None:
            _log.info("sealing works again")
            self.last_error = None
        if result.events:
            self.sealed_events += result.events
            _log.info("sealed %d event(s) into %d batch(es)", result.events, len(result.batches))
        return result.events

    def _failed(self, why: str) -> None:
        if why != self.last_error:
            _log.error("sealing failed (retrying every %g s): %s", self.interval, why)
        self.last_error = why
