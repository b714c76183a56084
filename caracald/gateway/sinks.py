"""Where the gateway's metering events go.

The gateway only needs ``async emit(event)``; the bus package provides the durable sinks (Kafka, the
PostgreSQL event log, the local spool). :class:`LedgerSink` writes events straight into the ledger table
(idempotent by the event's deterministic id), group-committed on a thread of its own so a slow database never
starves the rest of the process; it serves tests and the embedded gateway when no bus sink is configured.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

from caracald.core.events import MeteringEvent
from caracald.store.database import Database
from caracald.store.ledger import insert_events


@runtime_checkable
class EventSink(Protocol):
    async def emit(self, event: MeteringEvent) -> None:
        """Deliver one event (at least once); raise when it cannot be accepted."""
        ...


class LedgerSink:
    """Straight into the ledger table, group-committed: events emitted while a write is running share the
    next transaction, so the database sees one commit per batch however many requests are in flight."""

    def __init__(self, db: Database, *, max_batch: int = 500) -> None:
        self._db = db
        self._max_batch = max_batch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caracal-ledger-sink")
        self._pending: list[tuple[MeteringEvent, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.written = 0

    def _write(self, events: list[MeteringEvent]) -> int:
        with self._db.transaction() as conn:
            return insert_events(conn, [event.to_ledger_event() for event in events])

    async def emit(self, event: MeteringEvent) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((event, future))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_pending())
        await future

    async def _write_pending(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            try:
                self.written += await loop.run_in_executor(self._pool, self._write, [e for e, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    @property
    def depth(self) -> int:
        """Events waiting for their write."""
        return len(self._pending)

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        self._pool.shutdown(wait=True)


class MemorySink:
    """Keeps events in a list (tests and dry runs)."""

    def __init__(self) -> None:
        self.events: list[MeteringEvent] = []

    async def emit(self, event: MeteringEvent) -> None:
        self.events.append(event)
