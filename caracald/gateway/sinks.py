"""Where the gateway's metering events go.

The gateway only needs ``async emit(event)``; the bus package provides the durable sinks (Kafka, the
PostgreSQL event log, the local spool). :class:`LedgerSink` writes events straight into the ledger table
(idempotent by the event's deterministic id), group-committed on a thread of its own so a slow database never
starves the rest of the process; it serves tests and the embedded gateway when no bus sink is configured.
:class:`SplitSink` gives the reservation events of a quiet gateway a sink of their own (see there).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

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
    every call. So while fewer than ``quiet_below`` reservations are in flight, a reservation goes to
    ``prompt`` (no linger); everything else, and every reservation under load, to ``batched``. Only
    reservations count: the settlements a quiet gateway emits wait out the linger in ``batched``, and counting
    them would send a quiet gateway's reservations there too, now and then, each to wait the linger out. A
    request's settlement is emitted only after its reservation was acknowledged, so the two stay in order
    whichever way each went.
    """

    def __init__(self, prompt: EventSink, batched: EventSink, *, quiet_below: int = 4) -> None:
        self.prompt = prompt
        self.batched = batched
        self.quiet_below = quiet_below
        self._reserving = 0  # reservation events in flight

    async def emit(self, event: MeteringEvent) -> None:
        if event.kind is not LedgerEventType.RESERVATION:
            await self.batched.emit(event)
            return
        sink = self.prompt if self._reserving < self.quiet_below else self.batched
        self._reserving += 1
        try:
            await sink.emit(event)
        finally:
            self._reserving -= 1

    @property
    def spooling(self) -> bool | None:
        """Whether either part spools (None when neither can)."""
        found = [getattr(sink, "spooling", None) for sink in (self.prompt, self.batched)]
        return None if all(f is None for f in found) else any(bool(f) for f in found)

    @property
    def spooled_bytes(self) -> int | None:
        found = [getattr(sink, "spooled_bytes", None) for sink in (self.prompt, self.batched)]
        return None if all(f is None for f in found) else sum(f or 0 for f in found)

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


class LoopDelivery:
    """A Kafka producer (:class:`caracald.bus.kafka.KafkaProducer`) whose sends from the event loop answer
    asyncio futures, resolved on the loop in batches.

    The bus's producer answers every send with a thread-safe future that its delivery thread resolves, each
    resolution then waking the event loop on its own: per record a lock, a condition and a cross-thread
    wake-up. Here the delivery thread only queues the outcome and wakes the loop once for whatever has queued
    meanwhile, and the loop resolves them all. The sinks take either kind of future (``asyncio.wrap_future``
    passes an asyncio future through). Sends from any other thread (the spool's forwarder), sends while the
    local queue is full, and a producer without the expected insides go to the producer itself, unchanged.
    """

    def __init__(self, producer: Any) -> None:
        self.producer = producer
        self._kafka = getattr(producer, "_producer", None)
        self._closed = getattr(producer, "_closed", None)
        self._done: collections.deque[tuple[asyncio.Future[None], Any]] = collections.deque()
        self._wakeup_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0

    def send(self, topic: str, value: bytes, *, key: bytes | None = None, headers: Any = ()) -> Any:
        loop = self._sending_loop()
        if loop is None or self._kafka is None or self._closed is None or self._closed.is_set():
            return self.producer.send(topic, value, key=key, headers=headers)
        future: asyncio.Future[None] = loop.create_future()
        callback = functools.partial(self._delivered, future)
        try:
            self._kafka.produce(topic, value, key, headers=list(headers) or None, on_delivery=callback)
        except BufferError:
            # The local queue is full: the producer's own send waits for room (and fails in time).
            return self.producer.send(topic, value, key=key, headers=headers)
        except Exception:
            return self.producer.send(topic, value, key=key, headers=headers)  # raises the bus's error
        return future

    def _sending_loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop running in this thread, if any.

        Remembered, and checked by thread: asking asyncio costs a ``getpid()`` system call each time.
        """
        loop = self._loop
        if loop is not None and self._loop_thread == threading.get_ident() and loop.is_running():
            return loop
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        self._loop, self._loop_thread = loop, threading.get_ident()
        return loop

    def _delivered(self, future: asyncio.Future[None], error: Any, message: Any) -> None:
        """On the delivery thread (or whoever polls): queue the outcome, wake the loop once."""
        self._done.append((future, error))
        if not self._wakeup_pending and self._loop is not None:
            self._wakeup_pending = True
            try:
                self._loop.call_soon_threadsafe(self._resolve)
            except RuntimeError:  # the loop is closed: nobody waits any more
                self._wakeup_pending = False

    def _resolve(self) -> None:
        self._wakeup_pending = False  # before draining: an outcome queued from now on wakes the loop again
        done = self._done
        while done:
            future, error = done.popleft()
            if future.done():  # cancelled by its owner (a timeout)
                continue
            if error is None:
                future.set_result(None)
                continue
            future.set_exception(self._error(error))

    def _error(self, error: Any) -> BaseException:
        """The bus producer's own reading of a delivery error (unavailable, or refused)."""
        classify = getattr(type(self.producer), "_delivered", None)
        if classify is not None:
            answer: Future[None] = Future()
            classify(answer, error, None)
            exception = answer.exception()
            if exception is not None:
                return exception
        from caracald.bus.base import BusUnavailableError

        return BusUnavailableError(f"Kafka did not acknowledge: {error}")

    def flush(self, timeout: float = 30.0) -> int:
        remaining: int = self.producer.flush(timeout)
        return remaining

    def close(self, timeout: float = 30.0) -> None:
        self.producer.close(timeout)


class MemorySink:
    """Keeps events in a list (tests and dry runs)."""

    def __init__(self) -> None:
        self.events: list[MeteringEvent] = []

    async def emit(self, event: MeteringEvent) -> None:
        self.events.append(event)
