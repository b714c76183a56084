"""The gateway's split sink: reservations of a quiet gateway go unbatched, everything else batched."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from caracald.core.events import MeteringEvent
from caracald.core.ledger import LedgerEventType
from caracald.core.money import Money
from caracald.gateway.sinks import MemorySink, SplitSink


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
