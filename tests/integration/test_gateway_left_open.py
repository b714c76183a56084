"""A gateway on in-process budget counters (the embedded default) started after an earlier run died with
calls in flight: the holds that run left open are charged at their amount, as expired holds are, in the
counters at once and in the ledger by their expiry events; never twice, and never while a settlement may
still be on its way."""

from __future__ import annotations

import uuid
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from caracald.budget.base import BudgetBackend, Scope
from caracald.bus import pg_log
from caracald.core.events import METERING_TOPIC, MeteringEvent, encode
from caracald.core.ledger import LedgerEventType
from caracald.core.money import Money
from caracald.core.policy import PolicyStatus, PolicyTerms, PolicyVersion
from caracald.core.windows import TimeWindow, WindowSpec, WindowType
from caracald.gateway.server import make_budget
from caracald.gateway.sinks import MemorySink
from caracald.runtime.config import CaracalConfig
from caracald.store import ledger as ledger_store
from caracald.store import policies as policy_store
from caracald.store.database import Database

pytestmark = pytest.mark.integration


def usd(text: str) -> Money:
    return Money(Decimal(text), "USD")


def add_agent_with_budget(db: Database, limit: str) -> Scope:
    agent = uuid.uuid4()
    now = datetime.now(UTC)
    policy = PolicyVersion(
        policy_id=uuid.uuid4(),
        agent_id=agent,
        version=1,
        terms=PolicyTerms(usd(limit), WindowSpec(TimeWindow.MONTHLY, WindowType.CALENDAR)),
        status=PolicyStatus.ACTIVE,
        change_reason="test",
        changed_by="test",
        created_at=now,
    )
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO agents (agent_id, name, owner, status, created_at, updated_at) "
            "VALUES (%s, %s, 'o@example.com', 'active', %s, %s)",
            (agent, f"left-open-{agent.hex[:12]}", now, now),
        )
        policy_store.insert_version(conn, policy)
    return Scope(policy.policy_id, agent, policy.terms.limit, policy.terms.window)


def event(
    scope: Scope, kind: LedgerEventType, request_id: uuid.UUID, at: datetime, cost: str
) -> MeteringEvent:
    return MeteringEvent(
        kind=kind,
        request_id=request_id,
        agent_id=scope.agent_id,
        occurred_at=at,
        cost=usd(cost),
        resource="https://api.example/v1/chat/completions",
        hold=usd("0.30") if kind is LedgerEventType.RESERVATION else None,
        policy_ids=(scope.policy_id,),
    )


def record(db: Database, *events: MeteringEvent) -> None:
    with db.transaction() as conn:
        ledger_store.insert_events(conn, [e.to_ledger_event() for e in events])


async def start(db: Database, sink: MemorySink) -> BudgetBackend:
    config = CaracalConfig.model_validate({"budget": {"backend": "local"}, "bus": {"kind": "postgres"}})
    async with AsyncExitStack() as stack:
        return await make_budget(config, db, stack, sink)


async def settled(budget: BudgetBackend, scope: Scope) -> Money:
    (status,) = await budget.status([scope], datetime.now(UTC))
    return status.settled


def the_last_run(db: Database, scope: Scope) -> tuple[uuid.UUID, datetime]:
    """One call settled at $0.10, one left open with its $0.30 hold; the open one's request id and instant."""
    done, left = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    at = max(now - timedelta(seconds=30), now.replace(day=1, hour=0, minute=0, second=0, microsecond=0))
    record(
        db,
        event(scope, LedgerEventType.RESERVATION, done, at, "0"),
        event(scope, LedgerEventType.SETTLEMENT, done, at, "0.10"),
        event(scope, LedgerEventType.RESERVATION, left, at, "0"),
    )
    return left, at


async def test_a_hold_left_open_is_charged_at_its_amount_once(db: Database) -> None:
    scope = add_agent_with_budget(db, "1.00")
    left, at = the_last_run(db, scope)

    sink = MemorySink()
    budget = await start(db, sink)
    assert await settled(budget, scope) == usd("0.40")  # the settled call and the open hold
    (expiry,) = sink.events
    assert (expiry.kind, expiry.request_id, expiry.agent_id) == (LedgerEventType.EXPIRY, left, scope.agent_id)
    assert (expiry.cost, expiry.hold, expiry.occurred_at) == (usd("0.30"), usd("0.30"), at)
    assert expiry.policy_ids == (scope.policy_id,) and expiry.extra["left_open"] is True

    # Once the ledger has the expiry, the next start finds nothing open and counts the same.
    record(db, expiry)
    again = MemorySink()
    assert await settled(await start(db, again), scope) == usd("0.40")
    assert again.events == []
    with db.read() as conn:
        charged, _ = ledger_store.spending(conn, scope.agent_id, at, at + timedelta(seconds=1))["USD"]
    assert charged == Decimal("0.40")


async def test_nothing_is_charged_while_the_ledger_has_not_caught_up_with_the_event_log(db: Database) -> None:
    scope = add_agent_with_budget(db, "1.00")
    left, at = the_last_run(db, scope)
    # The open call's settlement is still on the event log: the ledger writer has not applied it yet.
    late = event(scope, LedgerEventType.SETTLEMENT, left, at, "0.05")
    with db.transaction() as conn:
        pg_log.append_records(conn, [(METERING_TOPIC, late.key, encode(late), [])])

    sink = MemorySink()
    budget = await start(db, sink)
    assert sink.events == []  # charging the hold now would charge that call twice
    assert await settled(budget, scope) == usd("0.10")
