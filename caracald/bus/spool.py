"""A durable local spool for records the bus cannot take right now, and the forwarder that drains it.

Layout: append-only segment files ``<sequence>.spool`` in ``bus.spool_dir``, each starting with an 8-byte
magic, then records framed as ``length (u32) | crc32(length bytes + body) (u32) | body``. The body holds
topic, key, value and headers. Every :meth:`Spool.append` call writes its records with one ``write`` and one
``fsync`` (callers group concurrent records into one call), and a new segment is made durable in its
directory before it is used.

Crash safety:

* a crash in the middle of a write leaves a torn last record: its length runs past the end of the file or its
  CRC does not match. Readers stop there; the records before it are intact. A spool never appends to a segment
  it did not create in this process (every :class:`Spool` starts a new segment), so a torn record can only be
  the last one of its segment;
* the forwarder deletes a segment only after the bus acknowledged every record in it. A crash between the
  acknowledgement and the deletion sends the segment again on the next drain: the duplicates are harmless
  downstream, since metering events carry deterministic ids and the ledger is idempotent by them.

One process at a time owns a spool folder (an exclusive ``flock`` on ``.lock``).

:class:`SpoolingSink` is the gateway's :class:`~caracald.bus.base.EventSink` that falls back to the spool when
the bus does not acknowledge in time, and keeps spooling (so that events stay in order) until the forwarder
has drained everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from caracald.bus.base import (
    BusError,
    BusUnavailableError,
    Headers,
    RecordProducer,
    event_headers,
)
from caracald.core.errors import CaracalError
from caracald.core.events import METERING_TOPIC, MeteringEvent, encode

MAGIC: Final = b"CRCLSPL1"
SUFFIX: Final = ".spool"
MAX_RECORD_BYTES: Final = 64 * 1024 * 1024
_FRAME = struct.Struct(">II")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")

_log = logging.getLogger(__name__)


class SpoolError(CaracalError):
    """The spool cannot take or give back records."""

    reason = "spool_error"


class SpoolFullError(SpoolError):
    reason = "spool_full"


@dataclass(frozen=True, slots=True)
class SpooledRecord:
    topic: str
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(slots=True)
class SegmentContents:
    path: Path
    records: list[SpooledRecord] = field(default_factory=list)
    #: Bytes after the last intact record (a torn write); 0 for a clean segment.
    torn_bytes: int = 0


def encode_record(record: SpooledRecord) -> bytes:
    topic = record.topic.encode()
    parts = [_U16.pack(len(topic)), topic]
    if record.key is None:
        parts.append(_I32.pack(-1))
    else:
        parts += [_I32.pack(len(record.key)), record.key]
    parts += [_U32.pack(len(record.value)), record.value, _U16.pack(len(record.headers))]
    for name, value in record.headers:
        raw = name.encode()
        parts += [_U16.pack(len(raw)), raw, _U32.pack(len(value)), value]
    return b"".join(parts)


def decode_record(body: bytes) -> SpooledRecord:
    view = memoryview(body)
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(view):
            raise SpoolError("spooled record is shorter than its fields say")
        chunk = bytes(view[pos : pos + n])
        pos += n
        return chunk

    topic = take(_U16.unpack(take(2))[0]).decode()
    key_len = _I32.unpack(take(4))[0]
    key = None if key_len == -1 else take(key_len)
    value = take(_U32.unpack(take(4))[0])
    headers = []
    for _ in range(_U16.unpack(take(2))[0]):
        name = take(_U16.unpack(take(2))[0]).decode()
        headers.append((name, take(_U32.unpack(take(4))[0])))
    if pos != len(view):
        raise SpoolError("spooled record has trailing bytes")
    return SpooledRecord(topic, value, key, tuple(headers))


def frame(body: bytes) -> bytes:
    length = _U32.pack(len(body))
    return length + _U32.pack(zlib.crc32(body, zlib.crc32(length))) + body


def read_segment(path: Path) -> SegmentContents:
    """The intact records of a segment, in order; anything after the first bad frame is torn."""
    data = path.read_bytes()
    contents = SegmentContents(path)
    if len(data) < len(MAGIC):
        contents.torn_bytes = len(data)  # made, but the magic never reached the disk
        return contents
    if data[: len(MAGIC)] != MAGIC:
        raise SpoolError(f"{path} is not a spool segment")
    pos = len(MAGIC)
    while pos < len(data):
        if pos + _FRAME.size > len(data):
            break
        length, crc = _FRAME.unpack_from(data, pos)
        end = pos + _FRAME.size + length
        if length > MAX_RECORD_BYTES or end > len(data):
            break
        body = data[pos + _FRAME.size : end]
        if zlib.crc32(body, zlib.crc32(data[pos : pos + 4])) != crc:
            break
        try:
            contents.records.append(decode_record(body))
        except (SpoolError, UnicodeDecodeError, struct.error):
            break
        pos = end
    contents.torn_bytes = len(data) - pos
    return contents


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Append-only segments in ``directory``; thread-safe."""

    def __init__(
        self,
        directory: Path,
        *,
        max_segment_bytes: int = 8 * 1024 * 1024,
        max_bytes: int | None = 1024 * 1024 * 1024,
        fsync: bool = True,
    ) -> None:
        self.directory = directory.expanduser()
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_segment_bytes = max_segment_bytes
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self._lock_file = (self.directory / ".lock").open("a+b")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise SpoolError(f"the spool {self.directory} is in use by another process") from None
        existing = self._listed()
        self._next_sequence = (int(existing[-1].stem) + 1) if existing else 1
        self._active: Path | None = None
        self._active_fd: int | None = None
        self._active_size = 0
        self._active_records = 0
        self._sealed_bytes = sum(p.stat().st_size for p in existing)
        self._closed = False

    def _listed(self) -> list[Path]:
        found = [p for p in self.directory.iterdir() if p.suffix == SUFFIX and p.stem.isdigit()]
        return sorted(found, key=lambda p: int(p.stem))

    # -- writing

    def append(self, records: Sequence[SpooledRecord]) -> None:
        """Write ``records`` durably (one write and one fsync), in order."""
        if not records:
            return
        data = b"".join(frame(encode_record(r)) for r in records)
        with self._lock:
            if self._closed:
                raise SpoolError("the spool is closed")
            if (
                self.max_bytes is not None
                and self._sealed_bytes + self._active_size + len(data) > self.max_bytes
            ):
                raise SpoolFullError(f"the spool {self.directory} holds {self.max_bytes} bytes already")
            if self._active_fd is None:
                try:
                    self._open_segment()
                except OSError as exc:
                    raise SpoolError(f"cannot create a segment in {self.directory}: {exc.strerror}") from None
            assert self._active_fd is not None
            try:
                written = os.write(self._active_fd, data)
                while written < len(data):
                    written += os.write(self._active_fd, data[written:])
                if self.fsync:
                    os.fdatasync(self._active_fd)
            except OSError as exc:
                # Whatever reached the file is a torn tail at worst: never append after it.
                self._seal_locked()
                raise SpoolError(f"cannot write to the spool {self.directory}: {exc.strerror}") from None
            self._active_size += len(data)
            self._active_records += len(records)
            if self._active_size >= self.max_segment_bytes:
                self._seal_locked()

    def _open_segment(self) -> None:
        path = self.directory / f"{self._next_sequence:020d}{SUFFIX}"
        self._next_sequence += 1
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            os.write(fd, MAGIC)
            if self.fsync:
                os.fsync(fd)
                _fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            raise
        self._active, self._active_fd = path, fd
        self._active_size, self._active_records = len(MAGIC), 0

    def seal(self) -> None:
        """Close the segment being written (if any), so that the forwarder may take it."""
        with self._lock:
            self._seal_locked()

    def _seal_locked(self) -> None:
        if self._active_fd is None:
            return
        os.close(self._active_fd)
        self._sealed_bytes += self._active_size
        self._active = self._active_fd = None
        self._active_size = self._active_records = 0

    # -- reading and removing

    def segments(self) -> list[Path]:
        """Sealed segments, oldest first."""
        with self._lock:
            return [p for p in self._listed() if p != self._active]

    def remove(self, path: Path) -> None:
        """Delete a forwarded segment (durably)."""
        with self._lock:
            if path == self._active:
                raise SpoolError("cannot remove the segment being written")
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                return
            self._sealed_bytes = max(self._sealed_bytes - size, 0)
            if self.fsync:
                _fsync_dir(self.directory)

    def quarantine(self, path: Path) -> Path:
        """Set aside a file that is not a readable segment (kept for inspection, never forwarded)."""
        target = path.with_suffix(".corrupt")
        with self._lock:
            size = path.stat().st_size
            path.rename(target)
            self._sealed_bytes = max(self._sealed_bytes - size, 0)
        return target

    def is_empty(self) -> bool:
        with self._lock:
            return self._active_records == 0 and not [p for p in self._listed() if p != self._active]

    @property
    def pending_bytes(self) -> int:
        with self._lock:
            return self._sealed_bytes + (self._active_size if self._active_records else 0)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._seal_locked()
            self._closed = True
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SpoolForwarder:
    """Sends spooled records to the bus in order, deleting each segment once all of it is acknowledged."""

    def __init__(self, spool: Spool, producer: RecordProducer, *, timeout: float = 30.0) -> None:
        self.spool = spool
        self.producer = producer
        self.timeout = timeout
        self._lock = threading.Lock()

    def drain(self) -> int:
        """Forward every spooled record (sealing the segment being written first); return how many.

        Raises :class:`~caracald.bus.base.BusError` when the bus does not take a segment; that segment and
        the later ones stay for the next drain.
        """
        with self._lock:
            self.spool.seal()
            forwarded = 0
            for path in self.spool.segments():
                try:
                    contents = read_segment(path)
                except SpoolError as exc:
                    moved = self.spool.quarantine(path)
                    _log.error("%s; moved it to %s", exc, moved)
                    continue
                if contents.torn_bytes:
                    _log.warning(
                        "spool segment %s ends with a torn record (%d bytes), ignored",
                        path.name,
                        contents.torn_bytes,
                    )
                self._forward(contents.records)
                self.spool.remove(path)
                forwarded += len(contents.records)
            return forwarded

    def _forward(self, records: list[SpooledRecord]) -> None:
        if not records:
            return
        futures = [self.producer.send(r.topic, r.value, key=r.key, headers=r.headers) for r in records]
        deadline = time.monotonic() + self.timeout
        self.producer.flush(self.timeout)
        for future in futures:
            try:
                future.result(timeout=max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                raise BusUnavailableError(f"the bus did not acknowledge within {self.timeout:g} s") from None


async def _within(future: asyncio.Future[None], seconds: float) -> None:
    """Await ``future``, cancelling it and raising ``TimeoutError`` after ``seconds``: what
    ``asyncio.wait_for`` does for a future, without the waiter future and callbacks it adds to every call."""
    if future.done():
        return future.result()
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        future.cancel()

    timer = future.get_loop().call_later(seconds, expire)
    try:
        await future
    except asyncio.CancelledError:
        if expired:
            raise TimeoutError(f"no acknowledgement within {seconds:g} s") from None
        raise
    finally:
        timer.cancel()


def spooled(topic: str, value: bytes, key: bytes | None, headers: Headers) -> SpooledRecord:
    return SpooledRecord(topic, value, key, tuple(headers))


class SpoolingSink:
    """An :class:`~caracald.bus.base.EventSink`: to the bus, or to the local spool when the bus is away.

    ``emit`` waits up to ``bus_timeout`` for the bus's acknowledgement; on failure the event (and every later
    one, to keep their order) goes to the spool, and a background task drains the spool every
    ``retry_interval`` seconds. Once the spool is empty, events go straight to the bus again. A record the bus
    did acknowledge late may thus also be spooled and sent twice: harmless, as event ids are deterministic.
    """

    def __init__(
        self,
        producer: RecordProducer,
        spool: Spool,
        *,
        topic: str = METERING_TOPIC,
        bus_timeout: float = 5.0,
        retry_interval: float = 1.0,
        drain_timeout: float = 30.0,
    ) -> None:
        self.producer = producer
        self.spool = spool
        self.topic = topic
        self.bus_timeout = bus_timeout
        self.retry_interval = retry_interval
        self.forwarder = SpoolForwarder(spool, producer, timeout=drain_timeout)
        self._spooling = not spool.is_empty()  # leftovers from a previous run go first
        self._drained = asyncio.Event()
        if not self._spooling:
            self._drained.set()
        self._pending: list[tuple[SpooledRecord, asyncio.Future[None]]] = []
        self._in_flight = 0
        self._writer: asyncio.Task[None] | None = None
        self._drainer: asyncio.Task[None] | None = None

    @property
    def spooling(self) -> bool:
        """True while events go to the spool (the bus was unavailable, or the spool is not drained yet)."""
        return self._spooling

    @property
    def spooled_bytes(self) -> int:
        """Bytes of events in the spool, waiting for the bus."""
        return self.spool.pending_bytes

    async def emit(self, event: MeteringEvent) -> None:
        event_id = event.event_id_text
        record = spooled(self.topic, encode(event, event_id), event.key, event_headers(event, event_id))
        if not self._spooling:
            try:
                future = self.producer.send(
                    record.topic, record.value, key=record.key, headers=record.headers
                )
                await _within(asyncio.wrap_future(future), self.bus_timeout)
                return
            except (BusError, TimeoutError) as exc:
                _log.warning("the bus did not take an event (%s); spooling to %s", exc, self.spool.directory)
                self._spooling = True
                self._drained.clear()
        await self._append(record)

    async def _append(self, record: SpooledRecord) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((record, future))
        self._in_flight += 1
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_pending())
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain_until_empty())
        await future

    async def _write_pending(self) -> None:
        """Group commit: every record waiting when a write starts shares its fsync."""
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self.spool.append, [record for record, _ in batch])
            except Exception as exc:
                error = exc if isinstance(exc, SpoolError) else SpoolError(f"cannot spool: {exc}")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
            finally:
                self._in_flight -= len(batch)

    async def _drain_until_empty(self) -> None:
        while self._spooling:
            await asyncio.sleep(self.retry_interval)
            try:
                count = await asyncio.to_thread(self.forwarder.drain)
            except (BusError, SpoolError, OSError) as exc:
                _log.info("spool not drained yet: %s", exc)
                continue
            if count:
                _log.info("forwarded %d spooled record(s) to the bus", count)
            # No await between these checks and the switch: no emit can slip in between.
            if self._in_flight == 0 and not self._pending and self.spool.is_empty():
                self._spooling = False
                self._drained.set()
                _log.info("spool drained; events go straight to the bus again")

    async def start(self) -> None:
        """Begin draining leftovers of a previous run (otherwise the first ``emit`` does it)."""
        if self._spooling and (self._drainer is None or self._drainer.done()):
            self._drainer = asyncio.get_running_loop().create_task(self._drain_until_empty())

    async def wait_drained(self) -> None:
        """Wait until events go straight to the bus again: the spool is empty (bound it with a timeout)."""
        await self._drained.wait()

    def flush(self, timeout: float = 30.0) -> int:
        return self.producer.flush(timeout)

    def close(self) -> None:
        for task in (self._drainer, self._writer):
            if task is not None and not task.done():
                task.cancel()
        self.producer.close()
        self.spool.close()
