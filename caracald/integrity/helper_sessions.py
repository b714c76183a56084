"""Helper sessions: more PostgreSQL backends reading a verification's rows, on the verifier's own snapshot.

Checking a batch's rows costs PostgreSQL more CPU than the verifier (encoding every row's columns again to
compare them with its stored bytes, see :mod:`caracald.integrity.verifier`), and one session is one backend
process: one core. Helper sessions run the statements of the next chunks of batches while the verifier
checks the current one, each on a thread of its own that only moves the rows from its socket into a queue.

Every helper imports the verifier's snapshot (``pg_export_snapshot`` / ``SET TRANSACTION SNAPSHOT``), so it
reads exactly the ledger the verifier's own statements read. Only a verifier whose transaction is
``REPEATABLE READ`` or ``SERIALIZABLE`` (one view for the whole verification) gets helpers; any failure to
open them (no connection left on the server, say) leaves the verification on its own connection.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import tuple_row

from caracald.integrity import copyrows
from caracald.integrity.batches import AnyConnection

log = logging.getLogger(__name__)

#: Rows (COPY messages) a helper reads ahead of the verifier, per statement.
QUEUE_ROWS: Final = 256
_END: Final = object()
_SETTINGS: Final = (
    "SELECT set_config(name, value, true) FROM unnest(%s::text[], %s::text[]) AS s(name, value)"
)


class Prefetched(Iterator[bytes]):
    """The rows of one statement, read by a helper session into a queue; iterated like
    :class:`~caracald.integrity.copyrows.Rows`. Stopping early is fine: the helper reads on to the end of
    the statement and drops the rest, so its session stays usable."""

    def __init__(self) -> None:
        self._queue: queue.Queue[object] = queue.Queue(QUEUE_ROWS)
        self._abandoned = threading.Event()
        self._finished = False

    def __next__(self) -> bytes:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._finished = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        assert isinstance(item, bytes)
        return item

    def pump(self) -> None:
        """Nothing to do: the helper's thread takes the rows off its socket."""

    def abandon(self) -> None:
        """Nobody reads the rest: the helper drops it."""
        self._abandoned.set()
        while not self._finished:  # unblock a helper waiting for room
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            self._finished = item is _END or isinstance(item, BaseException)

    def _put(self, item: object) -> None:
        while not self._abandoned.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


class HelperSessions:
    """``count`` sessions sharing ``conn``'s snapshot, each with a thread; :meth:`submit` runs a statement
    on the next free one. Close them (``with``) before ``conn``'s transaction ends."""

    def __init__(self, sessions: list[psycopg.Connection[Any]]) -> None:
        self._free: queue.Queue[psycopg.Connection[Any]] = queue.Queue()
        for session in sessions:
            self._free.put(session)
        self._sessions = sessions
        self._pool = ThreadPoolExecutor(len(sessions), thread_name_prefix="caracal-verify-helper")
        self._submitted: list[Prefetched] = []

    @property
    def count(self) -> int:
        return len(self._sessions)

    @classmethod
    def open(cls, conn: AnyConnection, count: int, settings: Mapping[str, str]) -> HelperSessions | None:
        """Helpers for ``conn`` (in a ``REPEATABLE READ`` or ``SERIALIZABLE`` transaction), with
        ``settings`` applied to their transactions; None when that cannot be (logged)."""
        if count < 1 or not isinstance(conn, psycopg.Connection) or conn.autocommit:
            return None
        if conn.info.transaction_status != pq.TransactionStatus.INTRANS:
            return None
        with conn.cursor(row_factory=tuple_row) as cur:
            isolation = cur.execute("SELECT current_setting('transaction_isolation')").fetchone()
            if isolation is None or isolation[0] not in ("repeatable read", "serializable"):
                return None
            # Not under a savepoint: PostgreSQL exports no snapshot from a subtransaction.
            row = cur.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        snapshot = str(row[0])
        conninfo = _conninfo(conn)
        sessions: list[psycopg.Connection[Any]] = []
        try:
            for _ in range(count):
                session = psycopg.connect(conninfo)
                sessions.append(session)
                session.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                session.read_only = True
                session.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(snapshot))
                session.execute("SET LOCAL client_encoding TO 'UTF8'")
                session.execute(_SETTINGS, (list(settings), list(settings.values())))
        except psycopg.Error as exc:
            log.info("verifying on one session: no helper sessions (%s)", exc)
            for session in sessions:
                session.close()
            return None
        return cls(sessions)

    def submit(self, query: str, params: Sequence[Any]) -> Prefetched:
        """Run ``COPY (query) TO STDOUT (FORMAT binary)`` on a helper; its rows as they arrive."""
        rows = Prefetched()
        self._submitted.append(rows)
        self._pool.submit(self._run, rows, query, params)
        return rows

    def _run(self, rows: Prefetched, query: str, params: Sequence[Any]) -> None:
        session = self._free.get()
        try:
            for message in copyrows.rows(session, query, params):
                if not rows._abandoned.is_set():
                    rows._put(message)
            rows._put(_END)
        except BaseException as exc:  # handed to the reader, who raises it
            rows._put(exc)
        finally:
            self._free.put(session)

    def close(self) -> None:
        for rows in self._submitted:
            rows.abandon()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for rows in self._submitted:
            rows.abandon()
        for session in self._sessions:
            session.close()

    def __enter__(self) -> HelperSessions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _conninfo(conn: psycopg.Connection[Any]) -> str:
    """What ``conn`` connected with (its password included: the helpers are the same client)."""
    options = {
        option.keyword.decode(): option.val.decode()
        for option in conn.pgconn.info
        if option.val is not None and option.keyword != b"replication"
    }
    return make_conninfo("", **options)
