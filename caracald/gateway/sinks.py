"""Where the gateway's metering events go.

The gateway only needs ``async emit(event)``; the bus package provides the durable sinks (Kafka, the
PostgreSQL event log, the local spool). :class:`LedgerSink` writes events straight into the ledger table
(idempotent by the event's deterministic id), group-committed on a thread of its own so a slow database never
starves the rest of the process; it serves tests and the embedded gateway when no bus sink is configured.
:class:`SplitSink` gives the reservation events of a quiet gateway a sink of their own (see there).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

from caracald.core.events import MeteringEvent
from caracald.core.ledger import LedgerEventType
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


class SplitSink:
    """Two sinks for one stream of events: ``prompt`` for the reservation events that requests wait for while
    the gateway is nearly idle, ``batched`` for all the others.

    A Kafka producer that waits a few milliseconds to fill its batches (``linger.ms``) spends a fraction of
    the CPU of one that sends every record at once, but each record waits that long. Under load every request
    waits for others anyway and batching is what keeps up; on a quiet gateway the wait would be added to
    every call. So while fewer than ``quiet_below`` events are in flight, a reservation goes to ``prompt``
    (no linger); everything else, and every reservation under load, to ``batched``. A request's settlement is
    emitted only after its reservation was acknowledged, so the two stay in order whichever way each went.
    """

    def __init__(self, prompt: EventSink, batched: EventSink, *, quiet_below: int = 4) -> None:
        self.prompt = prompt
        self.batched = batched
        self.quiet_below = quiet_below
        self._in_flight = 0

    async def emit(self, event: MeteringEvent) -> None:
        sink = self.batched
        if event.kind is LedgerEventType.RESERVATION and self._in_flight < self.quiet_below:
            sink = self.prompt
        self._in_flight += 1
        try:
            await sink.emit(event)
        finally:
            self._in_flight -= 1

    async def start(self) -> None:
        for sink in (self.prompt, self.batched):
            start = getattr(sink, "start", None)
            if start is not None and asyncio.iscoroutinefunction(start):
                await start()

    def flush(self, timeout: float = 30.0) -> int:
        return sum(getattr(sink, "flush", lambda _t: 0)(timeout) for sink in (self.prompt, self.batched))

    def close(self) -> None:
        for sink in (self.prompt, self.batched):
            close = getattr(sink, "close", None)
            if close is not None:
                close()


class MemorySink:
    """Keeps events in a list (tests and dry runs)."""

    def __init__(self) -> None:
        self.events: list[MeteringEvent] = []

    async def emit(self, event: MeteringEvent) -> None:
        self.events.append(event)
