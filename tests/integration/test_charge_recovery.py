"""A gateway that dies between charging a hold and recording the charge: the next one records it.

Billing with a write-ahead journal, on a real Redis (and the in-process backend). A *dying* process is one whose
event sink fails: the budget backend has charged the hold, the event never left, and the journal is all that
remains. A new Billing on the same journal (a restarted gateway) must record exactly what was charged: the
settlement at its actual cost, the expiry at the hold's amount, or both and the adjustment when a late
settlement followed an expiry; and running the journal again must record nothing more.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import pytest_asyncio

from caracald.budget.base import BudgetBackend, Scope
from caracald.budget.local_backend import LocalBudget
from caracald.budget.redis_backend import RedisBudget
from caracald.core.agents import Agent, AgentStatus
from caracald.core.events import MeteringEvent
from caracald.core.ledger import LedgerEventType
from caracald.core.money import Money
from caracald.core.pricebook import TokenUsage
from caracald.core.windows import TimeWindow, WindowSpec, WindowType
from caracald.gateway.billing import Billing, Hold
from caracald.gateway.journal import ChargeJournal
from caracald.gateway.metrics import GatewayMetrics
from caracald.gateway.pricing import EndpointKind, Priced
from caracald.gateway.sinks import MemorySink
from tests.harness.redis_server import RedisService

pytestmark = pytest.mark.integration

TTL = timedelta(seconds=30)
HOLD = Money(Decimal("0.50"), "USD")
COST = Money(Decimal("0.20"), "USD")


class DeadSink:
    """The bus as a dying process sees it: nothing gets out."""

    async def emit(self, event: MeteringEvent) -> None:
        raise ConnectionError("the process is going down")


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest_asyncio.fixture(params=["redis", "local"], loop_scope="function")
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[BudgetBackend]:
    if request.param == "redis":
        service: RedisService = request.getfixturevalue("redis_service")
        made: BudgetBackend = RedisBudget.from_url(service.url, namespace=f"test-{uuid.uuid4().hex[:12]}")
    else:
        made = LocalBudget()
    yield made
    await made.close()


def billing(backend: BudgetBackend, sink: object, journal: ChargeJournal, clock: Clock) -> Billing:
    return Billing(backend, sink, GatewayMetrics(), clock=clock, hold_ttl=TTL, journal=journal)  # type: ignore[arg-type]


async def admitted_hold(backend: BudgetBackend, bill: Billing, clock: Clock) -> tuple[Hold, Scope]:
    agent = Agent(uuid.uuid4(), "a", "", "o@example.com", None, AgentStatus.ACTIVE, clock.now, clock.now)
    scope = Scope(
        uuid.uuid4(),
        agent.agent_id,
        Money(Decimal("10"), "USD"),
        WindowSpec(TimeWindow.DAILY, WindowType.CALENDAR),
    )
    priced = Priced(EndpointKind.CHAT, HOLD, b"{}", model="gpt-test")
    hold = await bill.admit(uuid.uuid4(), agent, (scope,), priced, "https://api.example.com/v1/chat")
    return hold, scope


def restarted(path: Path, dying: ChargeJournal) -> ChargeJournal:
    dying.close()  # the kernel releases a dead process's lock; the file keeps what it wrote
    return ChargeJournal(path)


async def test_a_settlement_charged_but_never_sent_is_recorded_by_the_next_process(
    backend: BudgetBackend, tmp_path: Path
) -> None:
    path, clock = tmp_path / "charges.journal", Clock()
    first = ChargeJournal(path)
    dying = billing(backend, DeadSink(), first, clock)
    hold, scope = await admitted_hold(backend, dying, clock)
    await dying.settle(hold, COST, TokenUsage(100, 10), {})
    (status,) = await backend.status([scope], clock.now)
    assert (status.settled, status.holds) == (COST, 0)  # charged in the counters, nothing on the bus

    sink = MemorySink()
    journal = restarted(path, first)
    assert await billing(backend, sink, journal, clock).recover() == 1
    (event,) = sink.events
    assert (event.kind, event.request_id, event.cost) == (LedgerEventType.SETTLEMENT, hold.request_id, COST)
    assert (event.input_tokens, event.output_tokens, event.model) == (100, 10, "gpt-test")
    assert event.extra["settled_at"] == clock.now.isoformat()
    (status,) = await backend.status([scope], clock.now)
    assert status.settled == COST  # not charged twice
    assert await billing(backend, sink, journal, clock).recover() == 0
    assert len(sink.events) == 1
    journal.close()


async def test_an_expiry_charged_but_never_sent_is_recorded_by_the_next_process(
    backend: BudgetBackend, tmp_path: Path
) -> None:
    path, clock = tmp_path / "charges.journal", Clock()
    first = ChargeJournal(path)
    dying = billing(backend, DeadSink(), first, clock)
    hold, scope = await admitted_hold(backend, dying, clock)
    clock.now += TTL + timedelta(seconds=1)
    assert await dying.expire_once() == 1  # charged at the hold's amount; its event lost

    sink = MemorySink()
    journal = restarted(path, first)
    assert await billing(backend, sink, journal, clock).recover() == 1
    (event,) = sink.events
    assert (event.kind, event.request_id, event.cost) == (LedgerEventType.EXPIRY, hold.request_id, HOLD)
    (status,) = await backend.status([scope], hold.admitted_at)
    assert (status.settled, status.holds) == (HOLD, 0)
    assert await billing(backend, sink, journal, clock).recover() == 0
    journal.close()


async def test_a_late_settlement_after_a_lost_expiry_records_both(
    backend: BudgetBackend, tmp_path: Path
) -> None:
    """The expiry's event was lost, then the settlement came late: the ledger needs the expiry and the
    adjustment, which together charge the actual cost."""
    path, clock = tmp_path / "charges.journal", Clock()
    first = ChargeJournal(path)
    dying = billing(backend, DeadSink(), first, clock)
    hold, scope = await admitted_hold(backend, dying, clock)
    clock.now += TTL + timedelta(seconds=1)
    await dying.expire_once()
    await dying.settle(hold, COST, None, {})

    sink = MemorySink()
    journal = restarted(path, first)
    assert await billing(backend, sink, journal, clock).recover() == 2
    kinds = {event.kind: event.cost for event in sink.events}
    assert kinds == {LedgerEventType.EXPIRY: HOLD, LedgerEventType.ADJUSTMENT: COST - HOLD}
    (status,) = await backend.status([scope], hold.admitted_at)
    assert status.settled == COST
    journal.close()


async def test_a_hold_found_due_but_settled_meanwhile_owes_no_expiry(
    backend: BudgetBackend, tmp_path: Path
) -> None:
    clock = Clock()
    journal = ChargeJournal(tmp_path / "charges.journal")
    sink = MemorySink()
    bill = billing(backend, sink, journal, clock)
    hold, _ = await admitted_hold(backend, bill, clock)
    await bill.settle(hold, COST, None, {})
    assert len(journal) == 0  # delivered: resolved
    journal.intend("expire", hold.request_id)  # as if a sweep had found it due just before
    assert await bill.recover() == 1
    assert [e.kind for e in sink.events] == [LedgerEventType.SETTLEMENT]
    journal.close()


async def test_a_settlement_the_backend_refused_is_retried_as_a_late_one(
    backend: BudgetBackend, tmp_path: Path
) -> None:
    """Unreachable counters at settlement time: the hold expires at its amount, and the journal settles it
    later, correcting the expiry to the actual cost."""
    clock = Clock()
    journal = ChargeJournal(tmp_path / "charges.journal")
    sink = MemorySink()
    bill = billing(backend, sink, journal, clock)
    hold, scope = await admitted_hold(backend, bill, clock)

    class Unreachable:
        async def settle(self, *args: object) -> None:
            raise ConnectionError("counters unreachable")

    bill.budget = Unreachable()  # type: ignore[assignment]
    await bill.settle(hold, COST, None, {})
    bill.budget = backend
    assert sink.events == [] and len(journal) == 1
    clock.now += TTL + timedelta(seconds=1)
    await bill.expire_once()
    assert await bill.recover() == 1
    kinds = {event.kind: event.cost for event in sink.events}
    assert kinds == {LedgerEventType.EXPIRY: HOLD, LedgerEventType.ADJUSTMENT: COST - HOLD}
    (status,) = await backend.status([scope], hold.admitted_at)
    assert status.settled == COST
    journal.close()


async def test_a_settlement_whose_answer_was_lost_is_still_recorded(
    backend: BudgetBackend, tmp_path: Path
) -> None:
    """The counters took the settlement but its answer was lost, and the retry heard "already settled": that
    was this very settlement, whose event has not gone out yet."""
    clock = Clock()
    journal = ChargeJournal(tmp_path / "charges.journal")
    sink = MemorySink()
    bill = billing(backend, sink, journal, clock)
    hold, scope = await admitted_hold(backend, bill, clock)

    class LostAnswer:
        async def settle(self, request_id: uuid.UUID, actual: Money, at: datetime) -> object:
            await backend.settle(request_id, actual, at)  # done, but its answer never arrives
            return await backend.settle(request_id, actual, at)  # the retry: replayed

    bill.budget = LostAnswer()  # type: ignore[assignment]
    await bill.settle(hold, COST, None, {})
    assert [(e.kind, e.cost) for e in sink.events] == [(LedgerEventType.SETTLEMENT, COST)]
    assert len(journal) == 0
    (status,) = await backend.status([scope], clock.now)
    assert status.settled == COST
    journal.close()
