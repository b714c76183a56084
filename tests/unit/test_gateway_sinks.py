"""The gateway's sinks: reservations of a quiet gateway unbatched, Kafka deliveries reaching the loop in batches."""

from __future__ import annotations

import asyncio
import threading
import uuid
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from caracald.bus.base import DeliveryError
from caracald.bus.spool import Spool, SpoolingSink, spooled
from caracald.core.events import MeteringEvent
from caracald.core.ledger import LedgerEventType
from caracald.core.money import Money
from caracald.gateway.server import PROMPT_SPOOL, make_sink
from caracald.gateway.sinks import LoopDelivery, MemorySink, SplitSink
from caracald.runtime.config import CaracalConfig


def event(kind: LedgerEventType) -> MeteringEvent:
    return MeteringEvent(
        kind=kind,
        request_id=uuid.uuid4(),
        agent_id=uuid.uuid4(),
        occurred_at=datetime.now(UTC),
        cost=Money.zero("USD"),
    )


class SlowSink(MemorySink):
    """Holds every event until released, so that events pile up in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def emit(self, event: MeteringEvent) -> None:
        await self.release.wait()
        await super().emit(event)


def test_a_quiet_gateway_sends_reservations_unbatched_and_the_rest_batched() -> None:
    prompt, batched = MemorySink(), MemorySink()
    sink = SplitSink(prompt, batched)

    async def run() -> None:
        for kind in LedgerEventType:
            await sink.emit(event(kind))

    asyncio.run(run())
    assert [e.kind for e in prompt.events] == [LedgerEventType.RESERVATION]
    assert {e.kind for e in batched.events} == set(LedgerEventType) - {LedgerEventType.RESERVATION}


def test_under_load_reservations_are_batched_too() -> None:
    prompt, batched = SlowSink(), SlowSink()
    sink = SplitSink(prompt, batched, quiet_below=4)

    async def run() -> None:
        tasks = [asyncio.ensure_future(sink.emit(event(LedgerEventType.RESERVATION))) for _ in range(10)]
        await asyncio.sleep(0)
        prompt.release.set()
        batched.release.set()
        await asyncio.gather(*tasks)

    asyncio.run(run())
    assert len(prompt.events) == 4
    assert len(batched.events) == 6


def test_settlements_in_flight_do_not_send_a_quiet_gateways_reservations_to_the_batch() -> None:
    prompt, batched = MemorySink(), SlowSink()
    sink = SplitSink(prompt, batched, quiet_below=4)

    async def run() -> None:
        # settlements of earlier requests waiting out the batched producer's linger
        waiting = [asyncio.ensure_future(sink.emit(event(LedgerEventType.SETTLEMENT))) for _ in range(6)]
        await asyncio.sleep(0)
        await asyncio.wait_for(sink.emit(event(LedgerEventType.RESERVATION)), 5)  # not held with them
        batched.release.set()
        await asyncio.gather(*waiting)

    asyncio.run(run())
    assert [e.kind for e in prompt.events] == [LedgerEventType.RESERVATION]
    assert [e.kind for e in batched.events] == [LedgerEventType.SETTLEMENT] * 6


class FakeKafka:
    """The confluent producer inside the bus's KafkaProducer: records each delivery callback."""

    def __init__(self) -> None:
        self.callbacks: list[Any] = []

    def produce(self, topic: str, value: bytes, key: bytes | None, **kwargs: Any) -> None:
        self.callbacks.append(kwargs["on_delivery"])


class FakeProducer:
    """What LoopDelivery wraps: the bus producer's send for other threads, its insides for the loop."""

    def __init__(self) -> None:
        self._producer = FakeKafka()
        self._closed = threading.Event()
        self.direct: list[bytes] = []

    def send(self, topic: str, value: bytes, *, key: bytes | None = None, headers: Any = ()) -> Future[None]:
        self.direct.append(value)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    @staticmethod
    def _delivered(future: Future[None], error: Any, message: Any) -> None:
        future.set_exception(DeliveryError(f"refused: {error}"))


def test_loop_delivery_resolves_asyncio_futures_in_batches_from_the_delivery_thread() -> None:
    producer = FakeProducer()
    delivery = LoopDelivery(producer)

    async def run() -> list[Any]:
        futures = [delivery.send("t", b"v%d" % i) for i in range(5)]
        assert all(isinstance(f, asyncio.Future) for f in futures)
        wakeups = 0
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counting(*args: Any) -> Any:
            nonlocal wakeups
            wakeups += 1
            return real(*args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]

        def deliver() -> None:
            for i, callback in enumerate(producer._producer.callbacks):
                callback(None if i != 3 else "broker said no", None)

        thread = threading.Thread(target=deliver)
        thread.start()
        thread.join()
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert wakeups == 1
        return results

    results = asyncio.run(run())
    assert results[:3] == [None, None, None] and results[4] is None
    assert isinstance(results[3], DeliveryError)
    # Off the loop (the spool's forwarder runs in a thread), the bus producer answers itself.
    assert delivery.send("t", b"direct").result() is None
    assert producer.direct == [b"direct"]


def test_loop_delivery_finds_what_it_needs_in_the_bus_producer() -> None:
    """LoopDelivery reaches into the bus's KafkaProducer; if those insides change it falls back to the
    producer's own send (correct, only slower): this test says so before a benchmark does."""
    from caracald.bus.kafka import KafkaProducer

    producer = KafkaProducer({"bootstrap.servers": "127.0.0.1:9"}, delivery_timeout=1.0)
    try:
        delivery = LoopDelivery(producer)
        assert delivery._kafka is not None and delivery._closed is not None
        assert callable(getattr(KafkaProducer, "_delivered", None))
    finally:
        producer.close(timeout=1.0)


def _kafka_sink(spool_dir: Path, **kafka: Any) -> Any:
    config = CaracalConfig.model_validate(
        {
            "bus": {"kind": "kafka", "spool_dir": str(spool_dir)},
            "kafka": {"bootstrap_servers": "127.0.0.1:9", **kafka},
        }
    )
    db: Any = None  # the Kafka sink needs no database
    return make_sink(config, db)


def test_with_a_spool_folder_one_batching_producer_carries_every_event(tmp_path: Path) -> None:
    sink = _kafka_sink(tmp_path)
    try:
        assert isinstance(sink, SpoolingSink)  # no second, unbatched producer: nobody waits for the bus
        assert sink.spool.directory == tmp_path
        # Nobody waits for it, so it gathers events for as long as the operator lets it (100 ms by default).
        assert sink.producer.producer.linger_ms == 100
    finally:
        sink.close()


def test_the_journalled_producer_lingers_as_configured(tmp_path: Path) -> None:
    sink = _kafka_sink(tmp_path, gateway_linger_ms=0)
    try:
        assert sink.producer.producer.linger_ms == 0
    finally:
        sink.close()
    with pytest.raises(ValidationError, match="gateway_linger_ms"):
        _kafka_sink(tmp_path, gateway_linger_ms=-1)


def test_what_an_earlier_unbatched_producer_spooled_is_still_forwarded(tmp_path: Path) -> None:
    leftover = Spool(tmp_path / PROMPT_SPOOL)
    leftover.append([spooled("caracal.metering.events", b"{}", b"agent", [])])
    leftover.close()
    sink = _kafka_sink(tmp_path)
    try:
        assert isinstance(sink, SplitSink)
        spools = {s.spool.directory for s in (sink.prompt, sink.batched)}  # type: ignore[attr-defined]
        assert spools == {tmp_path, tmp_path / PROMPT_SPOOL}
        assert sink.spooled_bytes and sink.spooled_bytes > 0
    finally:
        sink.close()
