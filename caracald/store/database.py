"""Connection pools for the primary and the optional read replica."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from caracald.core.errors import StoreUnavailableError

Connection = psycopg.Connection[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class PoolSizes:
    min_size: int
    max_size: int


class Database:
    """A pool on the primary and, when configured, one on a read replica for read-only queries."""

    def __init__(
        self,
        url: str,
        *,
        read_replica_url: str | None = None,
        sizes: PoolSizes = PoolSizes(1, 4),
        connect_timeout: int = 5,
        statement_timeout_ms: int = 30_000,
    ) -> None:
        self.url = url
        self.read_replica_url = read_replica_url
        self._statement_timeout_ms = statement_timeout_ms
        kwargs = {
            "connect_timeout": connect_timeout,
            "row_factory": dict_row,
            "options": f"-c statement_timeout={statement_timeout_ms}",
            "application_name": "caracal",
        }
        self._primary: ConnectionPool[Connection] = ConnectionPool(
            url,
            min_size=sizes.min_size,
            max_size=sizes.max_size,
            kwargs=kwargs,
            open=False,
            timeout=connect_timeout,
            name="primary",
            # A connection the server ended (it restarted, failed over) is replaced when it is taken, not
            # handed out to fail the caller's first query after an outage.
            check=ConnectionPool.check_connection,
        )
        self._replica: ConnectionPool[Connection] | None = None
        if read_replica_url:
            self._replica = ConnectionPool(
                read_replica_url,
                min_size=sizes.min_size,
                max_size=sizes.max_size,
                kwargs=kwargs,
                open=False,
                timeout=connect_timeout,
                name="replica",
                check=ConnectionPool.check_connection,
            )

    def open(self) -> Database:
        try:
            self._primary.open(wait=True, timeout=self._primary.timeout)
            if self._replica is not None:
                self._replica.open(wait=True, timeout=self._replica.timeout)
        except PoolTimeout as exc:
            self.close()
            raise StoreUnavailableError(f"cannot connect to PostgreSQL: {self._why(exc)}") from None
        return self

    def _why(self, exc: PoolTimeout) -> str:
        """The pool only says it timed out; one direct attempt tells the operator why."""
        try:
            psycopg.connect(self.url, connect_timeout=2).close()
        except psycopg.Error as direct:
            return _describe(direct)
        return _describe(exc)

    def close(self) -> None:
        self._primary.close()
        if self._replica is not None:
            self._replica.close()

    def __enter__(self) -> Database:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A read-write transaction on the primary, committed when the block ends without error."""
        with self._connection(self._primary) as conn, conn.transaction():
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction, on the replica when one is configured."""
        pool = self._replica or self._primary
        with self._connection(pool) as conn, conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            yield conn

    @contextmanager
    def _connection(self, pool: ConnectionPool[Connection]) -> Iterator[Connection]:
        try:
            with pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise StoreUnavailableError(f"PostgreSQL is unavailable: {_describe(exc)}") from None
        except psycopg.errors.QueryCanceled:
            raise  # a statement timeout is the statement's problem, not the server's
        except psycopg.OperationalError as exc:
            raise StoreUnavailableError(f"PostgreSQL is unavailable: {_describe(exc)}") from None

    def ping(self) -> float:
        """Round-trip time of a trivial query on the primary, in seconds."""
        started = time.perf_counter()
        with self._connection(self._primary) as conn:
            conn.execute("SELECT 1")
        return time.perf_counter() - started

    def pool_stats(self) -> dict[str, int]:
        return dict(self._primary.get_stats())

    def pool_sizes(self) -> dict[str, int]:
        """Connections each pool holds, busy or idle: ``{"primary": n}``, plus ``"replica"`` if configured."""
        pools = {"primary": self._primary, "replica": self._replica}
        return {name: pool.get_stats()["pool_size"] for name, pool in pools.items() if pool is not None}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
