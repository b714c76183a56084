"""The embedded deployment's bus: an append-only ``event_log`` table in Caracal's own PostgreSQL.

Topics are rows tagged with a topic name; each topic has one logical partition (0). Consumers read after
the offset their group committed in ``consumer_offsets`` and go through the same
:class:`~caracald.bus.base.BatchConsumer` code path as on Kafka.

**Offsets are assigned in commit order.** A plain bigserial would not do: sequence values are handed out when
a row is inserted, but transactions commit in any order, so a consumer could read offset 11, commit it, and
never see offset 10 whose transaction commits a moment later. Migration 0002 therefore assigns ``log_offset``
in a ``BEFORE INSERT`` trigger that first takes a transaction-scoped advisory lock for the row's topic:
producers of one topic are serialised from their first insert until they commit, so a row becomes visible
only after every row of that topic with a lower offset (the lock is released after the commit is visible).
Every insert, whoever makes it, goes through the trigger. The price is that producers of one topic do not
commit in parallel; :class:`PgLogProducer` groups concurrent sends into one transaction, which keeps that
cheap. (Reading only rows older than ``pg_snapshot_xmin`` would avoid the lock, but then any long write
transaction on the server stalls every consumer, and positions need two parts; the lock is simpler to reason
about.) A rolled-back insert leaves a hole in the offsets, which is harmless: offsets are positions, not
counters (Kafka has holes too).

**One consumer per group and topic.** A consumer holds a session-level advisory lock per (group, topic) it
reads, the event log's version of a partition assignment; another member of the group stands by and takes
over when the owner's session ends.

A statement-level trigger sends ``NOTIFY caracal_event_log, '<topic>'`` on insert, so idle consumers wake at
once instead of polling.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from datetime import datetime, timedelta
from typing import Any, Final, Literal

import psycopg
from psycopg.rows import dict_row, tuple_row

from caracald.bus.base import (
    BusUnavailableError,
    CommitFailedError,
    DeliveryError,
    Headers,
    Record,
    next_offsets,
)

PARTITION: Final = 0
NOTIFY_CHANNEL: Final = "caracal_event_log"
#: First key of the two-key advisory locks of the event log (the second is ``hashtext`` of a name). The
#: producers' per-topic lock (class 0x0CA7E100, taken by the trigger of migration 0002) and the consumers'
#: per-(group, topic) lock (this one) live in different classes.
CONSUMER_LOCK_CLASS: Final = 0x0CA7E101

_log = logging.getLogger(__name__)

ProducerRow = tuple[str, bytes | None, bytes, Headers]


def encode_headers(headers: Headers) -> str:
    """Headers as the event log stores them: a JSON list of ``[name, base64(value)]``."""
    return json.dumps([[name, base64.b64encode(value).decode()] for name, value in headers])


def decode_headers(raw: Any) -> list[tuple[str, bytes]]:
    if not raw:
        return []
    items = json.loads(raw) if isinstance(raw, str | bytes) else raw
    return [(str(name), base64.b64decode(value)) for name, value in items]


def append_records(conn: psycopg.Connection[Any], rows: Iterable[ProducerRow]) -> int:
    """Insert records (topic, key, value, headers) in the caller's transaction; return how many.

    The rows are inserted sorted by topic (stable, so each topic keeps its order), so that transactions
    writing several topics take the per-topic locks in one global order and never deadlock each other.
    """
    ordered = sorted(rows, key=lambda row: row[0])
    if not ordered:
        return 0
    with (
        conn.cursor() as cur,
        cur.copy("COPY event_log (topic, key, payload, headers) FROM STDIN") as copy,
    ):
        for topic, key, value, headers in ordered:
            copy.write_row((topic, key, value, encode_headers(headers)))
    return len(ordered)


class _Pending:
    __slots__ = ("future", "row")

    def __init__(self, row: ProducerRow) -> None:
        self.row = row
        self.future: Future[None] = Future()


class PgLogProducer:
    """Appends records to the event log from a background thread, one transaction per group of sends.

    A send's future is resolved when its transaction has committed, or failed with
    :class:`~caracald.bus.base.BusUnavailableError` when PostgreSQL could not take it (the caller decides
    whether to retry or spool). Concurrent sends are grouped: at most ``max_batch`` per transaction.
    """

    def __init__(
        self,
        url: str,
        *,
        max_batch: int = 2000,
        connect_timeout: int = 5,
        application_name: str = "caracal-event-log-producer",
    ) -> None:
        self.url = url
        self.max_batch = max_batch
        self._connect_timeout = connect_timeout
        self._application_name = application_name
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._conn: psycopg.Connection[Any] | None = None
        self._closed = False
        self._outstanding = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="caracal-pg-log-producer", daemon=True)
        self._thread.start()

    def send(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> Future[None]:
        if self._closed:
            raise BusUnavailableError("the event-log producer is closed")
        pending = _Pending((topic, key, value, list(headers)))
        with self._idle:
            self._outstanding += 1
        self._queue.put(pending)
        return pending.future

    def flush(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._outstanding:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._idle.wait(remaining)
            return self._outstanding

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        if self._conn is not None:
            self._conn.close()

    # -- the writer thread

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # seen again once this batch is written
                    break
                batch.append(item)
            error = self._write(batch)
            for pending in batch:
                if error is None:
                    pending.future.set_result(None)
                else:
                    pending.future.set_exception(error)
            with self._idle:
                self._outstanding -= len(batch)
                self._idle.notify_all()

    def _write(self, batch: list[_Pending]) -> Exception | None:
        try:
            conn = self._connection()
            with conn.transaction():
                append_records(conn, (p.row for p in batch))
            return None
        except psycopg.Error as exc:
            self._drop_connection()
            _log.warning("event log append failed: %s", _first_line(exc))
            if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
                return BusUnavailableError(f"the event log is unavailable: {_first_line(exc)}")
            return DeliveryError(f"the event log refused {len(batch)} record(s): {_first_line(exc)}")

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=self._connect_timeout,
                application_name=self._application_name,
                # A send is acknowledged once its commit returns, so the commit must be durable by then; and a
                # producer stuck mid-transaction must not hold its topic's lock for long.
                options="-c synchronous_commit=on -c idle_in_transaction_session_timeout=30000",
            )
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


class PgLogConsumer:
    """A :class:`~caracald.bus.base.BatchConsumer` over the event log, for one group and some topics.

    ``start`` says where a group without a committed offset begins: at the oldest record ("earliest", like
    ``auto.offset.reset=earliest``) or after the newest ("latest").
    """

    def __init__(
        self,
        url: str,
        group: str,
        topics: Sequence[str],
        *,
        start: Literal["earliest", "latest"] = "earliest",
        connect_timeout: int = 5,
        lock_retry_seconds: float = 1.0,
    ) -> None:
        if not topics:
            raise ValueError("a consumer needs at least one topic")
        self.url = url
        self._group = group
        self.topics = list(dict.fromkeys(topics))
        self.start = start
        self._connect_timeout = connect_timeout
        self._lock_retry = lock_retry_seconds
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._positions: dict[str, int] = {}  # owned topic -> next offset to read
        # owned topic -> the offset this consumer last saw committed (None: no row yet); a commit expects it
        self._committed: dict[str, int | None] = {}
        # owned topic -> the claim its records are read under (see Record.epoch)
        self._epochs: dict[str, int] = {}
        self._epoch = 0
        self._last_lock_attempt = 0.0
        self._next_topic = 0

    @property
    def group(self) -> str:
        return self._group

    @property
    def assignment(self) -> list[str]:
        """The topics this consumer currently owns within its group."""
        return list(self._positions)

    # -- connection and ownership

    def _forget_all(self) -> None:
        self._positions.clear()
        self._committed.clear()
        self._epochs.clear()

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._conn is None or self._conn.closed:
            self._forget_all()
            try:
                conn = psycopg.connect(
                    self.url,
                    autocommit=True,
                    row_factory=tuple_row,
                    connect_timeout=self._connect_timeout,
                    application_name=f"caracal-consumer:{self._group}",
                )
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            except psycopg.Error as exc:
                raise BusUnavailableError(f"the event log is unavailable: {_first_line(exc)}") from None
            self._conn = conn
            self._last_lock_attempt = 0.0
        return self._conn

    def _broken(self, exc: psycopg.Error) -> BusUnavailableError:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._forget_all()
        return BusUnavailableError(f"the event log is unavailable: {_first_line(exc)}")

    def _claim_topics(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        """Take the (group, topic) locks not held yet; load the committed offset of each topic taken."""
        if len(self._positions) == len(self.topics):
            return
        now = time.monotonic()
        if now - self._last_lock_attempt < self._lock_retry:
            return
        self._last_lock_attempt = now
        for topic in self.topics:
            if topic in self._positions:
                continue
            row = conn.execute(
                "SELECT pg_try_advisory_lock(%s, hashtext(%s))",
                (CONSUMER_LOCK_CLASS, f"{self._group}\x1f{topic}"),
            ).fetchone()
            if not row or not row[0]:
                continue
            committed = conn.execute(
                "SELECT committed_offset FROM consumer_offsets "
                "WHERE consumer_group = %s AND topic = %s AND partition = %s",
                (self._group, topic, PARTITION),
            ).fetchone()
            self._committed[topic] = int(committed[0]) if committed is not None else None
            self._epoch += 1
            self._epochs[topic] = self._epoch
            if committed is not None:
                self._positions[topic] = int(committed[0])
            elif self.start == "latest":
                newest = conn.execute(
                    "SELECT max(log_offset) FROM event_log WHERE topic = %s", (topic,)
                ).fetchone()
                self._positions[topic] = int(newest[0]) + 1 if newest and newest[0] is not None else 0
            else:
                self._positions[topic] = 0
            _log.info(
                "consumer group %s now reads %s from offset %d", self._group, topic, self._positions[topic]
            )

    # -- BatchConsumer

    def poll_batch(self, max_records: int, timeout: float) -> list[Record]:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            conn = self._connection()
            try:
                self._claim_topics(conn)
                records = self._fetch(conn, max_records)
                if records:
                    return records
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                # Wake on the next insert (or to retry the locks a standby does not hold).
                wait = (
                    min(remaining, self._lock_retry) if len(self._positions) < len(self.topics) else remaining
                )
                for _ in conn.notifies(timeout=wait, stop_after=1):
                    pass
            except psycopg.Error as exc:
                raise self._broken(exc) from None

    def _fetch(self, conn: psycopg.Connection[tuple[Any, ...]], max_records: int) -> list[Record]:
        owned = list(self._positions)
        if not owned:
            return []
        records: list[Record] = []
        # Start with a different topic each time, so that one busy topic cannot starve the others.
        for i in range(len(owned)):
            topic = owned[(self._next_topic + i) % len(owned)]
            room = max_records - len(records)
            if room <= 0:
                break
            rows = conn.execute(
                "SELECT log_offset, key, payload, headers, produced_at FROM event_log "
                "WHERE topic = %s AND log_offset >= %s ORDER BY log_offset LIMIT %s",
                (topic, self._positions[topic], room),
            ).fetchall()
            epoch = self._epochs[topic]
            for offset, key, payload, headers, produced_at in rows:
                records.append(
                    Record(
                        topic,
                        PARTITION,
                        int(offset),
                        key,
                        bytes(payload),
                        decode_headers(headers),
                        produced_at,
                        epoch,
                    )
                )
            if rows:
                self._positions[topic] = int(rows[-1][0]) + 1
        self._next_topic += 1
        return records

    def commit(self, records: Sequence[Record]) -> None:
        """Commit what ``records`` read, per topic, over the offset this consumer last saw committed.

        Refused (:class:`CommitFailedError`, the records will be read again) for a topic this consumer no
        longer owns, for records read before it re-claimed their topic, and for a topic whose committed
        offset someone else changed (an offset reset for a replay): then the topic is read again from the
        offset committed now. The topics that pass are committed in any case.
        """
        current = [r for r in records if self._epochs.get(r.topic) == r.epoch]
        refused = sorted({r.topic for r in records} - {r.topic for r in current})
        positions = next_offsets(current)
        fenced: list[str] = []
        if positions:
            conn = self._conn
            if conn is None or conn.closed:
                raise CommitFailedError("the event-log connection was lost; the records will be read again")
            try:
                with conn.transaction():
                    for (topic, partition), offset in positions.items():
                        row = conn.execute(
                            """
                            INSERT INTO consumer_offsets AS o
                                   (consumer_group, topic, partition, committed_offset)
                            VALUES (%s, %s, %s, %s)
                            ON CONFLICT (consumer_group, topic, partition)
                            DO UPDATE SET committed_offset = EXCLUDED.committed_offset, committed_at = now()
                            WHERE o.committed_offset IS NOT DISTINCT FROM %s::bigint
                            RETURNING committed_offset
                            """,
                            (self._group, topic, partition, offset, self._committed.get(topic)),
                        ).fetchone()
                        if row is None:
                            fenced.append(topic)
            except psycopg.Error as exc:
                self._broken(exc)
                raise CommitFailedError(f"cannot commit offsets: {_first_line(exc)}") from None
            for (topic, _partition), offset in positions.items():
                if topic not in fenced:
                    self._committed[topic] = offset
        for topic in fenced:
            # Read it again from what is committed now, under a new claim.
            self._release(topic)
        if fenced:
            self._last_lock_attempt = 0.0
            raise CommitFailedError(
                f"the offsets of group {self._group} on {', '.join(sorted(fenced))} were changed by "
                "someone else (an offset reset?); reading again from the offset committed now"
            )
        if refused:
            raise CommitFailedError(
                f"consumer group {self._group} read these records of {', '.join(refused)} under an "
                "earlier claim (it no longer owns the topic, or re-claimed it since); they will be read again"
            )

    def _release(self, topic: str) -> None:
        """Forget a topic's position (it is claimed again, from the committed offset, on the next poll).

        The session's advisory lock is kept: taking it again on the next claim just nests it.
        """
        self._positions.pop(topic, None)
        self._committed.pop(topic, None)
        self._epochs.pop(topic, None)

    def seek(self, topic: str, offset: int) -> None:
        """Read ``topic`` from ``offset`` on (the topic must be owned; see :attr:`assignment`)."""
        if topic not in self._positions:
            raise CommitFailedError(f"consumer group {self._group} does not own {topic}")
        self._positions[topic] = offset

    def lag(self) -> dict[tuple[str, int], int]:
        conn = self._conn
        if conn is None or conn.closed:
            return {}
        lags: dict[tuple[str, int], int] = {}
        try:
            for topic in list(self._positions):
                committed = conn.execute(
                    "SELECT committed_offset FROM consumer_offsets "
                    "WHERE consumer_group = %s AND topic = %s AND partition = %s",
                    (self._group, topic, PARTITION),
                ).fetchone()
                start = int(committed[0]) if committed else 0
                row = conn.execute(
                    "SELECT count(*) FROM (SELECT 1 FROM event_log WHERE topic = %s AND log_offset >= %s "
                    "LIMIT 10000000) pending",
                    (topic, start),
                ).fetchone()
                lags[(topic, PARTITION)] = int(row[0]) if row else 0
        except psycopg.Error as exc:
            self._broken(exc)
            return {}
        return lags

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()  # ends the session, and with it the group locks
            self._conn = None
        self._forget_all()


def committed_offsets(conn: psycopg.Connection[Any], group: str) -> dict[tuple[str, int], int]:
    """What ``group`` committed, per (topic, partition): the next offset it will read."""
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(
            "SELECT topic, partition, committed_offset FROM consumer_offsets WHERE consumer_group = %s",
            (group,),
        ).fetchall()
    return {(str(topic), int(partition)): int(offset) for topic, partition, offset in rows}


def reset_offsets(conn: psycopg.Connection[Any], group: str, topic: str, offset: int = 0) -> None:
    """Make ``group`` read ``topic`` again from ``offset`` (a replay). Stop the group's consumers first."""
    conn.execute(
        """
        INSERT INTO consumer_offsets (consumer_group, topic, partition, committed_offset)
        VALUES (%s, %s, %s, %s)
        ON CONFLICT (consumer_group, topic, partition)
        DO UPDATE SET committed_offset = EXCLUDED.committed_offset, committed_at = now()
        """,
        (group, topic, PARTITION, offset),
    )


def end_offset(conn: psycopg.Connection[Any], topic: str) -> int:
    """The offset the next record of ``topic`` will have at least: one past the newest (0 when empty)."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute("SELECT max(log_offset) FROM event_log WHERE topic = %s", (topic,)).fetchone()
    return int(row[0]) + 1 if row and row[0] is not None else 0


def offset_for_time(conn: psycopg.Connection[Any], topic: str, at: datetime) -> int:
    """The first offset of ``topic`` produced at or after ``at`` (Kafka's ``offsets_for_times``); the end
    offset when every record is older."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(
            "SELECT min(log_offset) FROM event_log WHERE topic = %s AND produced_at >= %s", (topic, at)
        ).fetchone()
    if row and row[0] is not None:
        return int(row[0])
    return end_offset(conn, topic)


def pending_count(conn: psycopg.Connection[Any], topic: str, offset: int) -> int:
    """Records of ``topic`` at or after ``offset``."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(
            "SELECT count(*) FROM event_log WHERE topic = %s AND log_offset >= %s", (topic, offset)
        ).fetchone()
    return int(row[0]) if row else 0


def _lock_name(group: str, topic: str) -> str:
    return f"{group}\x1f{topic}"


def group_members(conn: psycopg.Connection[Any], group: str, topic: str) -> list[dict[str, Any]]:
    """The sessions holding ``group``'s lock on ``topic``: its live consumer (one at most), as
    ``{"pid", "application_name", "client_addr", "backend_start"}``."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            """
            SELECT a.pid, a.application_name, host(a.client_addr) AS client_addr, a.backend_start
              FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
               AND l.classid = %s::int4::oid AND l.objid = hashtext(%s)::oid
             ORDER BY a.pid
            """,
            (CONSUMER_LOCK_CLASS, _lock_name(group, topic)),
        ).fetchall()
    return [dict(r) for r in rows]


def try_lock_group(conn: psycopg.Connection[Any], group: str, topic: str) -> bool:
    """Take ``group``'s consumer lock on ``topic`` for this session, as a consumer would: no consumer of
    the group can read the topic until :func:`unlock_group` (or the session ends). False when one does."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(
            "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (CONSUMER_LOCK_CLASS, _lock_name(group, topic))
        ).fetchone()
    return bool(row and row[0])


def unlock_group(conn: psycopg.Connection[Any], group: str, topic: str) -> None:
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            "SELECT pg_advisory_unlock(%s, hashtext(%s))", (CONSUMER_LOCK_CLASS, _lock_name(group, topic))
        )


def groups(conn: psycopg.Connection[Any]) -> list[str]:
    """Every consumer group that committed an offset on the event log."""
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute("SELECT DISTINCT consumer_group FROM consumer_offsets ORDER BY 1").fetchall()
    return [str(r[0]) for r in rows]


def prune(conn: psycopg.Connection[Any], retention: timedelta) -> int:
    """Delete records older than ``retention`` that every group reading their topic has committed past.

    A topic no group has committed anything for is kept whole. Returns how many records were deleted.
    """
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            """
            WITH floor AS (
                SELECT topic, min(committed_offset) AS safe FROM consumer_offsets GROUP BY topic
            )
            DELETE FROM event_log e USING floor f
             WHERE e.topic = f.topic AND e.log_offset < f.safe AND e.produced_at < now() - %s
            """,
            (retention,),
        )
        return max(cur.rowcount, 0)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
