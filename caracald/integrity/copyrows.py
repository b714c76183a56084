"""Streaming query results as raw binary ``COPY`` rows: the bytes PostgreSQL sends, undecoded.

A binary ``COPY ... TO STDOUT`` row is a 16-bit field count, then per field a 32-bit length (-1 for NULL)
and the value in the type's binary send format. The verifier reads a million rows this way: a fixed-layout
row prefix is one ``struct`` unpack, and nothing is converted to Python objects on the way.

Inside a transaction the rows are read straight from libpq (``PGconn.get_copy_data``), which costs a
third of going through psycopg's ``Copy`` object per row: at a million rows that is most of a second.
Anywhere else (autocommit, a pipeline) psycopg's ``Copy`` is used.
"""

from __future__ import annotations

import contextlib
import select
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, Final

import psycopg
from psycopg import pq, sql

from caracald.integrity.batches import AnyConnection

SIGNATURE: Final = b"PGCOPY\n\xff\r\n\x00"
TRAILER: Final = b"\xff\xff"
_HEADER = struct.Struct(">11sii")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")


class CopyFormatError(RuntimeError):
    """The server sent something that is not binary COPY data."""


def row_length(data: bytes | memoryview, offset: int = 0) -> int:
    """Bytes taken by the row starting at ``offset`` (its field count first)."""
    (fields,) = _I16.unpack_from(data, offset)
    p = offset + 2
    for _ in range(fields):
        (length,) = _I32.unpack_from(data, p)
        p += 4 + max(length, 0)
    if p > len(data):
        raise CopyFormatError("a binary COPY row runs past its message")
    return p - offset


def _statement(conn: AnyConnection, query: str, params: Sequence[Any] | None) -> bytes:
    copy = sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(sql.SQL(query))
    text = psycopg.ClientCursor(conn).mogrify(copy, params)
    return text.encode(conn.info.encoding if conn.info.encoding != "ascii" else "utf-8")


def _raise_for(result: pq.abc.PGresult) -> None:
    sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
    message = (result.error_message or b"COPY failed").decode("utf-8", "replace").strip()
    error: type[psycopg.Error] = (
        psycopg.errors.lookup(sqlstate.decode()) if sqlstate else psycopg.DatabaseError
    )
    raise error(message)


def _header(data: bytes) -> bytes:
    signature, _flags, extension = _HEADER.unpack_from(data, 0)
    if signature != SIGNATURE:
        raise CopyFormatError("not a binary COPY stream")
    return data[_HEADER.size + extension :]


#: At most this many bytes of rows are read ahead by :meth:`Rows.pump`.
READ_AHEAD_BYTES: Final = 8 << 20


class _Ahead:
    """Rows taken off the socket before they were asked for (see :meth:`Rows.pump`)."""

    def __init__(self, pg: pq.abc.PGconn) -> None:
        self.pg = pg
        self.rows: deque[bytes] = deque()
        self.size = 0
        self.started = False
        #: What ``get_copy_data`` answered once the rows ended (-1), or failed (-2); None while they flow.
        self.end: int | None = None

    def pump(self) -> None:
        if not self.started or self.end is not None or self.size >= READ_AHEAD_BYTES:
            return
        pg = self.pg
        pg.consume_input()
        while self.size < READ_AHEAD_BYTES:
            size, message = pg.get_copy_data(1)
            if size > 0:
                self.rows.append(bytes(message))
                self.size += size
            else:
                if size < 0:
                    self.end = size
                return

    def take(self) -> tuple[int, bytes]:
        """The next message (size, bytes); a negative size once the rows have ended."""
        if self.rows:
            data = self.rows.popleft()
            self.size -= len(data)
            return len(data), data
        if self.end is not None:
            return self.end, b""
        pg = self.pg
        while True:
            size, message = pg.get_copy_data(1)
            if size != 0:
                break
            _wait_readable(pg)
        if size < 0:
            self.end = size
            return size, b""
        return size, bytes(message)


def _wait_readable(pg: pq.abc.PGconn) -> None:
    """Wait until the server has sent more, then take it in. libpq's own blocking reads keep Python's GIL
    (psycopg's C binding) and would stall every other thread of the process; ``select`` releases it."""
    select.select([pg.socket], [], [])
    pg.consume_input()


def _result(pg: pq.abc.PGconn) -> pq.abc.PGresult | None:
    """The next result, waited for without holding the GIL (see :func:`_wait_readable`)."""
    while pg.is_busy():
        _wait_readable(pg)
    return pg.get_result()


def _direct(conn: AnyConnection, statement: bytes, ahead: _Ahead) -> Iterator[bytes]:
    # No psycopg lock is held across the yields (a caller's rollback after an error must not hang); the
    # connection must not be used for anything else until the rows are consumed.
    pg = conn.pgconn
    pg.send_query(statement)
    result = _result(pg)
    if result is None or result.status != pq.ExecStatus.COPY_OUT:
        while _result(pg) is not None:
            pass
        if result is not None:
            _raise_for(result)
        raise psycopg.OperationalError("no result for COPY")
    ahead.started = True
    take = ahead.take
    done = False
    try:
        size, message = take()
        if size >= 0:
            first = _header(message)
            if first and first != TRAILER:
                yield first
            while True:
                size, data = take()
                if size < 0:
                    break
                if data != TRAILER:
                    yield data
        done = True
    finally:
        if not done:  # the caller stopped early: drain, so the connection stays usable
            with contextlib.suppress(psycopg.Error):
                while take()[0] >= 0:
                    pass
        failure = None
        while (result := _result(pg)) is not None:
            if result.status == pq.ExecStatus.FATAL_ERROR:
                failure = result
    if failure is not None:
        _raise_for(failure)


def _via_psycopg(conn: AnyConnection, statement: bytes) -> Iterator[bytes]:
    with conn.cursor() as cur, cur.copy(statement) as copy:
        messages = iter(copy)
        for message in messages:
            first = _header(bytes(message))
            if first and first != TRAILER:
                yield first
            break
        for message in messages:
            data = bytes(message)
            if data != TRAILER:
                yield data


class Rows(Iterator[bytes]):
    """The rows of one ``COPY``; :meth:`pump` reads those already sent on ahead."""

    def __init__(self, rows: Iterator[bytes], ahead: _Ahead | None) -> None:
        self._rows = rows
        self._ahead = ahead

    def __next__(self) -> bytes:
        return next(self._rows)

    def pump(self) -> None:
        """Take the rows PostgreSQL has sent so far off the socket (up to :data:`READ_AHEAD_BYTES`),
        without waiting for more. A caller busy with a large row calls it now and then, so the server
        goes on producing the next rows instead of waiting for room in the socket."""
        if self._ahead is not None:
            self._ahead.pump()


def rows(conn: AnyConnection, query: str, params: Sequence[Any] | None = None) -> Rows:
    """Each row of ``COPY (query) TO STDOUT (FORMAT binary)``, as the bytes from its field count on.

    PostgreSQL sends each row in a message of its own, so a message is taken as one row without parsing
    it; the callers parse the rows anyway and :func:`row_length` tells them where a row really ends.
    ``params`` are bound on the client (COPY takes no server-side parameters).
    """
    statement = _statement(conn, query, params)
    in_transaction = conn.info.transaction_status == pq.TransactionStatus.INTRANS
    plain = conn.pgconn.pipeline_status == pq.PipelineStatus.OFF and isinstance(conn, psycopg.Connection)
    if in_transaction and plain and not conn.autocommit:
        ahead = _Ahead(conn.pgconn)
        return Rows(_direct(conn, statement, ahead), ahead)
    return Rows(_via_psycopg(conn, statement), None)
