"""The local spool: durable appends, torn writes, crashes between delivery and deletion, the spooling sink."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from caracald.bus.base import BusUnavailableError, DeliveryError, Headers
from caracald.bus.spool import (
    MAGIC,
    SUFFIX,
    Spool,
    SpooledRecord,
    SpoolError,
    SpoolForwarder,
    SpoolFullError,
    SpoolingSink,
    read_segment,
)
from caracald.core.events import METERING_TOPIC, MeteringEvent, decode, encode
from caracald.core.ledger import LedgerEventType
from caracald.core.money import Money
from caracald.gateway.sinks import MemorySink, SplitSink

ROOT = Path(__file__).resolve().parents[2]


def records(count: int, start: int = 0) -> list[SpooledRecord]:
    return [
        SpooledRecord(
            topic="caracal.metering.events",
            value=f"event-{i}".encode() * (1 + i % 7),
            key=None if i % 5 == 0 else f"agent-{i % 3}".encode(),
            headers=(("caracal-event-id", str(i).encode()), ("empty", b"")) if i % 2 else (),
        )
        for i in range(start, start + count)
    ]


class ListProducer:
    """A RecordProducer that keeps what it is sent; ``down`` makes it refuse, as an unreachable bus would."""

    def __init__(self) -> None:
        self.sent: list[SpooledRecord] = []
        self.down = False
        self.refuse_after: int | None = None

    def send(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> Future[None]:
        future: Future[None] = Future()
        if self.down or (self.refuse_after is not None and len(self.sent) >= self.refuse_after):
            future.set_exception(BusUnavailableError("bus down"))
        else:
            self.sent.append(SpooledRecord(topic, value, key, tuple(headers)))
            future.set_result(None)
        return future

    def flush(self, timeout: float = 30.0) -> int:
        return 0

    def close(self) -> None:
        pass


def segment_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix == SUFFIX)


# --------------------------------------------------------------------------- the file format


def test_appended_records_read_back_in_order(tmp_path: Path) -> None:
    sent = records(50)
    with Spool(tmp_path) as spool:
        spool.append(sent[:1])
        spool.append(sent[1:])
        assert not spool.is_empty()
        spool.seal()
        [segment] = spool.segments()
    contents = read_segment(segment)
    assert contents.records == sent
    assert contents.torn_bytes == 0


def test_every_truncation_of_the_last_record_is_ignored(tmp_path: Path) -> None:
    sent = records(3)
    with Spool(tmp_path) as spool:
        spool.append(sent)
    [segment] = segment_files(tmp_path)
    data = segment.read_bytes()
    whole_two = len(MAGIC) + sum(
        8 + len(_body) for _body in (_encoded(sent[0]), _encoded(sent[1]))
    )  # the first two frames
    for cut in range(whole_two, len(data)):
        segment.write_bytes(data[:cut])
        contents = read_segment(segment)
        assert contents.records == sent[:2], cut
        assert contents.torn_bytes == cut - whole_two
    segment.write_bytes(data)
    assert read_segment(segment).records == sent


def _encoded(record: SpooledRecord) -> bytes:
    from caracald.bus.spool import encode_record

    return encode_record(record)


def test_a_corrupted_last_record_is_ignored(tmp_path: Path) -> None:
    sent = records(4)
    with Spool(tmp_path) as spool:
        spool.append(sent)
    [segment] = segment_files(tmp_path)
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0xFF  # a bit flip in the last record's body: its CRC no longer matches
    segment.write_bytes(bytes(data))
    contents = read_segment(segment)
    assert contents.records == sent[:3]
    assert contents.torn_bytes > 0


def test_a_segment_whose_magic_never_reached_the_disk_is_empty(tmp_path: Path) -> None:
    segment = tmp_path / f"{1:020d}{SUFFIX}"
    segment.write_bytes(MAGIC[:3])
    assert read_segment(segment).records == []
    segment.write_bytes(b"NOTASPOOL" + b"x" * 20)
    with pytest.raises(SpoolError, match="not a spool segment"):
        read_segment(segment)


def test_a_reopened_spool_never_appends_after_a_torn_tail(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        spool.append(records(2))
    [first] = segment_files(tmp_path)
    first.write_bytes(first.read_bytes()[:-4])  # the crash tore the last record
    with Spool(tmp_path) as spool:
        spool.append(records(2, start=10))
    first_again, second = segment_files(tmp_path)
    assert first_again == first
    assert read_segment(first).records == records(1)
    assert read_segment(second).records == records(2, start=10)


def test_segments_rotate_at_their_size_limit(tmp_path: Path) -> None:
    with Spool(tmp_path, max_segment_bytes=200) as spool:
        for record in records(30):
            spool.append([record])
        spool.seal()
        segments = spool.segments()
    assert len(segments) > 3
    assert [r for s in segments for r in read_segment(s).records] == records(30)


def test_one_process_owns_a_spool_folder(tmp_path: Path) -> None:
    with Spool(tmp_path):
        code = f"from caracald.bus.spool import Spool; Spool(__import__('pathlib').Path({str(tmp_path)!r}))"
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert result.returncode != 0
        assert "in use by another process" in result.stderr
    with Spool(tmp_path):  # released on close
        pass


def test_a_full_spool_refuses_more(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=300) as spool:
        spool.append(records(1))
        with pytest.raises(SpoolFullError):
            spool.append(records(20))


# --------------------------------------------------------------------------- crashes


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from caracald.bus.spool import Spool, SpooledRecord

    spool = Spool(Path(sys.argv[1]), max_segment_bytes=64 * 1024)
    i = 0
    while True:
        batch = [SpooledRecord("t", b"%08d" % n + b"." * (n % 500), b"k") for n in range(i, i + 1 + i % 5)]
        spool.append(batch)
        i += len(batch)
        sys.stdout.write(f"{i}\\n")  # acknowledged: everything below i is durable
        sys.stdout.flush()
    """
)


def test_kill_9_while_appending_loses_nothing_acknowledged(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    acknowledged = 0
    deadline = time.monotonic() + 60
    while acknowledged < 3000 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acknowledged = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    for line in proc.stdout:  # acknowledgements already written when the signal landed
        acknowledged = max(acknowledged, int(line))
    proc.wait(10)
    assert acknowledged >= 3000

    found = [r for s in segment_files(tmp_path) for r in read_segment(s).records]
    values = [int(r.value[:8]) for r in found]
    assert values == list(range(len(values)))  # intact, in order, no gap
    assert len(values) >= acknowledged


def test_crash_between_delivery_and_delete_resends_the_segment(tmp_path: Path) -> None:
    sent = records(10)
    with Spool(tmp_path) as spool:
        spool.append(sent)

    class CrashOnRemove(Spool):
        def remove(self, path: Path) -> None:
            raise KeyboardInterrupt("the process died here")

    producer = ListProducer()
    spool = CrashOnRemove(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        SpoolForwarder(spool, producer).drain()
    spool.close()
    assert producer.sent == sent  # delivered, but the segment is still there

    with Spool(tmp_path) as spool:
        assert SpoolForwarder(spool, producer).drain() == 10
        assert spool.is_empty()
    assert producer.sent == sent + sent  # sent twice: harmless, event ids are deterministic
    assert segment_files(tmp_path) == []


def test_a_segment_stays_until_the_bus_takes_all_of_it(tmp_path: Path) -> None:
    producer = ListProducer()
    producer.refuse_after = 5
    with Spool(tmp_path) as spool:
        spool.append(records(8))
        forwarder = SpoolForwarder(spool, producer)
        with pytest.raises(BusUnavailableError):
            forwarder.drain()
        assert len(segment_files(tmp_path)) == 1
        spool.append(records(2, start=8))  # a new segment: the old one was sealed for forwarding
        producer.refuse_after = None
        assert forwarder.drain() == 10
        assert spool.is_empty()
    assert producer.sent == records(5) + records(10)
    assert segment_files(tmp_path) == []


def test_an_unreadable_file_is_set_aside(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        spool.append(records(2))
        spool.seal()
        [segment] = spool.segments()
        segment.write_bytes(b"GARBAGE!" + segment.read_bytes()[8:])
        spool.append(records(1, start=5))
        producer = ListProducer()
        assert SpoolForwarder(spool, producer).drain() == 1
    assert producer.sent == records(1, start=5)
    assert segment.with_suffix(".corrupt").exists()


# --------------------------------------------------------------------------- the spooling sink


def event(n: int) -> MeteringEvent:
    return MeteringEvent(
        kind=LedgerEventType.SETTLEMENT,
        request_id=uuid.UUID(int=n + 1),
        agent_id=uuid.UUID(int=7),
        occurred_at=datetime(2025, 1, 1, tzinfo=UTC),
        cost=Money(Decimal("0.001"), "USD"),
    )


def request_numbers(sent: Sequence[SpooledRecord]) -> list[int]:
    return [decode(r.value).request_id.int - 1 for r in sent]


async def test_the_sink_spools_while_the_bus_is_down_and_drains_in_order(tmp_path: Path) -> None:
    producer = ListProducer()
    sink = SpoolingSink(producer, Spool(tmp_path), bus_timeout=0.5, retry_interval=0.05)
    try:
        await sink.emit(event(0))
        assert not sink.spooling
        producer.down = True
        await asyncio.gather(*(sink.emit(event(n)) for n in range(1, 20)))  # durable, in the spool
        assert sink.spooling
        assert sink.spooled_bytes > 19 * len(encode(event(1)))  # what /stats shows operators
        split = SplitSink(MemorySink(), sink)  # a spool-less part does not count
        assert (split.spooling, split.spooled_bytes) == (True, sink.spooled_bytes)
        assert request_numbers(producer.sent) == [0]
        producer.down = False
        await sink.emit(event(20))  # still spooled behind the others, to keep the order
        await asyncio.wait_for(sink.wait_drained(), 10)
        assert not sink.spooling
        assert sink.spooled_bytes == 0
        await sink.emit(event(21))  # straight to the bus again
        assert request_numbers(producer.sent) == list(range(22))
        assert segment_files(tmp_path) == []
    finally:
        sink.close()


class SilentProducer(ListProducer):
    """A bus that takes records and never acknowledges them (a broker that hangs)."""

    def __init__(self) -> None:
        super().__init__()
        self.unanswered: list[Future[None]] = []

    def send(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> Future[None]:
        future: Future[None] = Future()
        self.unanswered.append(future)
        return future


async def test_an_event_the_bus_does_not_acknowledge_in_time_is_spooled(tmp_path: Path) -> None:
    producer = SilentProducer()
    sink = SpoolingSink(producer, Spool(tmp_path), bus_timeout=0.2, retry_interval=60)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        started = loop.time()
        await sink.emit(event(0))  # returns once durable: in the spool, after the bus's time ran out
        assert 0.2 <= loop.time() - started < 2
        assert sink.spooling and sink.spooled_bytes > len(encode(event(0)))
        assert all(f.cancelled() for f in producer.unanswered)  # given up on, not left waiting
        await asyncio.sleep(0.05)
        assert errors == []
    finally:
        loop.set_exception_handler(None)
        sink.close()


async def test_leftovers_of_a_previous_run_go_first(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        from caracald.bus.base import event_headers
        from caracald.core.events import encode

        spool.append([SpooledRecord(METERING_TOPIC, encode(event(0)), b"k", tuple(event_headers(event(0))))])
    producer = ListProducer()
    sink = SpoolingSink(producer, Spool(tmp_path), retry_interval=0.05)
    try:
        assert sink.spooling
        await sink.emit(event(1))
        await asyncio.wait_for(sink.wait_drained(), 10)
        assert request_numbers(producer.sent) == [0, 1]
    finally:
        sink.close()


async def test_a_refusing_bus_also_falls_back_to_the_spool(tmp_path: Path) -> None:
    class Refusing(ListProducer):
        def send(
            self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
        ) -> Future[None]:
            raise DeliveryError("record too large")

    sink = SpoolingSink(Refusing(), Spool(tmp_path), retry_interval=60)
    try:
        await sink.emit(event(0))
        assert sink.spooling
        sink.spool.seal()
        assert request_numbers(read_segment(sink.spool.segments()[0]).records) == [0]
    finally:
        sink.close()
