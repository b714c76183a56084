"""Hourly and daily spend totals: ``ledger query`` and the budgets answer from them and agree exactly with the
raw events.

The totals are kept by a trigger on ``ledger_events`` from the rows each statement actually inserted, so a
replayed or duplicated event (skipped by ``ON CONFLICT DO NOTHING``) counts nothing, whichever path inserts.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.rows import dict_row

from caracald.admin import ledger as ledger_admin
from caracald.bus import pg_log
from caracald.bus.base import event_headers
from caracald.consumers.ledger_writer import Backoff, LedgerWriter
from caracald.core.events import METERING_TOPIC, MeteringEvent, encode
from caracald.core.ledger import LedgerEvent, LedgerEventType
from caracald.core.money import Money
from caracald.core.policy import PolicyStatus, PolicyTerms, PolicyVersion
from caracald.core.windows import TimeWindow, WindowSpec, WindowType
from caracald.store import ledger as ledger_store
from caracald.store import migrate as migrate_module
from caracald.store import policies as policy_store
from caracald.store import spend, spend_totals
from caracald.store.database import Database
from tests.harness.postgres import PostgresService

pytestmark = pytest.mark.integration

BASE = datetime(2024, 3, 9, tzinfo=UTC)  # spans the US DST change: hours are UTC hours anyway
SPAN = timedelta(days=3)
KINDS = list(LedgerEventType)
CHARGED = (LedgerEventType.SETTLEMENT, LedgerEventType.EXPIRY, LedgerEventType.ADJUSTMENT)


def add_agent(conn: psycopg.Connection[Any]) -> uuid.UUID:
    agent = uuid.uuid4()
    now = datetime.now(UTC)
    conn.execute(
        "INSERT INTO agents (agent_id, name, owner, status, created_at, updated_at) "
        "VALUES (%s, %s, 'o@example.com', 'active', %s, %s)",
        (agent, f"totals-{agent.hex[:12]}", now, now),
    )
    return agent


def add_policy(db: Database, agent: uuid.UUID, currency: str, spec: WindowSpec) -> uuid.UUID:
    """An active policy of 100 ``currency`` over ``spec`` for ``agent``; its id."""
    policy = PolicyVersion(
        policy_id=uuid.uuid4(),
        agent_id=agent,
        version=1,
        terms=PolicyTerms(Money(Decimal(100), currency), spec),
        status=PolicyStatus.ACTIVE,
        change_reason="test",
        changed_by="test",
        created_at=datetime.now(UTC),
    )
    with db.transaction() as conn:
        policy_store.insert_version(conn, policy)
    return policy.policy_id


def raw(db: Database, agent: uuid.UUID, start: datetime, end: datetime) -> dict[str, tuple[Decimal, int]]:
    with db.read() as conn:
        return ledger_store.spending(conn, agent, start, end)


def from_totals(
    db: Database, agent: uuid.UUID, start: datetime, end: datetime
) -> dict[str, tuple[Decimal, int]]:
    with db.read() as conn:
        return spend_totals.spending(conn, agent, start, end)


event_strategy = st.tuples(
    st.sampled_from(KINDS),
    st.integers(min_value=0, max_value=int(SPAN.total_seconds() * 1_000_000)),  # microseconds after BASE
    st.decimals(min_value=Decimal("-5"), max_value=Decimal("50"), places=8),
    st.sampled_from(["USD", "EUR"]),
)
instant = st.integers(
    min_value=-3_600_000_000, max_value=int(SPAN.total_seconds() * 1_000_000) + 3_600_000_000
)


def _at(micros: int) -> datetime:
    return BASE + timedelta(microseconds=micros)


HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US


def _hourly(micros: int) -> int:
    """Snap some instants onto whole hours, where off-by-one mistakes live."""
    return micros - micros % HOUR_US


def _snapped(micros: int, to: str) -> int:
    """``micros`` as it is, or on the UTC hour or day it lies in (BASE is a UTC midnight)."""
    if to == "hour":
        return _hourly(micros)
    if to == "day":
        return micros - micros % DAY_US
    return micros


snapping = st.sampled_from(["none", "hour", "day"])


def rolled_up(db: Database, agent: uuid.UUID) -> tuple[list[Any], list[Any]]:
    """The agent's day rows, and the same computed from its hour rows: the trigger keeps them equal."""
    with db.read() as conn:
        days = conn.execute(
            "SELECT currency, day, total, spending_events, ledger_events FROM spend_daily "
            "WHERE agent_id = %s ORDER BY currency, day",
            (agent,),
        ).fetchall()
        from_hours = conn.execute(
            "SELECT currency, date_trunc('day', bucket, 'UTC') AS day, sum(total) AS total, "
            "sum(spending_events) AS spending_events, sum(ledger_events) AS ledger_events "
            "FROM spend_totals WHERE agent_id = %s GROUP BY 1, 2 ORDER BY 1, 2",
            (agent,),
        ).fetchall()
    return days, from_hours


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    events=st.lists(event_strategy, max_size=60),
    replayed=st.integers(min_value=0, max_value=60),
    ranges=st.lists(st.tuples(instant, instant, snapping, snapping), min_size=1, max_size=8),
)
def test_totals_agree_exactly_with_the_raw_events_and_replays_do_not_count(
    db: Database,
    events: list[tuple[LedgerEventType, int, Decimal, str]],
    replayed: int,
    ranges: list[tuple[int, int, str, str]],
) -> None:
    with db.transaction() as conn:
        agent = add_agent(conn)
    rows = [
        LedgerEvent(
            uuid.uuid4(),
            kind,
            agent,
            _at(at),
            Money(
                cost
                if kind in (LedgerEventType.SETTLEMENT, LedgerEventType.EXPIRY, LedgerEventType.ADJUSTMENT)
                else Decimal(0),
                currency,
            ),
        )
        for kind, at, cost, currency in events
    ]
    with db.transaction() as conn:
        ledger_store.insert_events(conn, rows)
    # A replay of some of them, in one statement and row by row: nothing is new, nothing may count.
    with db.transaction() as conn:
        assert ledger_store.insert_events(conn, rows[:replayed]) == 0
        for row in rows[:3]:
            assert ledger_store.insert_events(conn, [row]) == 0
    checks = [(BASE, BASE + SPAN), (BASE - timedelta(days=1), BASE + SPAN + timedelta(days=1))]
    for a, b, snap_a, snap_b in ranges:
        start, end = sorted((_at(_snapped(a, snap_a)), _at(_snapped(b, snap_b))))
        if start == end:
            end += timedelta(microseconds=1)
        checks.append((start, end))
    for start, end in checks:
        assert from_totals(db, agent, start, end) == raw(db, agent, start, end), (start, end)
    days, from_hours = rolled_up(db, agent)
    assert days == from_hours


def _settlements(agent: uuid.UUID, minutes: range) -> list[LedgerEvent]:
    return [
        LedgerEvent(
            uuid.uuid4(),
            LedgerEventType.SETTLEMENT,
            agent,
            BASE + timedelta(minutes=m),
            Money(Decimal("0.01"), "USD"),
        )
        for m in minutes
    ]


def test_rebuild_recomputes_the_hours_and_the_days(db: Database) -> None:
    minutes = range(0, 3000, 7)  # two days and a bit: 50 hours, 3 days
    with db.transaction() as conn:
        agent = add_agent(conn)
        ledger_store.insert_events(conn, _settlements(agent, minutes))
    query = "SELECT * FROM {} WHERE agent_id = %s ORDER BY 3"
    with db.transaction() as conn:
        hours = conn.execute(query.format("spend_totals"), (agent,)).fetchall()
        days = conn.execute(query.format("spend_daily"), (agent,)).fetchall()
        conn.execute("UPDATE spend_totals SET total = 0 WHERE agent_id = %s", (agent,))
        conn.execute("DELETE FROM spend_daily WHERE agent_id = %s AND day > %s", (agent, BASE))
        assert spend_totals.rebuild(conn, agent) == spend_totals.Rebuilt(hours=50, days=3)
        assert conn.execute(query.format("spend_totals"), (agent,)).fetchall() == hours
        assert conn.execute(query.format("spend_daily"), (agent,)).fetchall() == days
    assert [d["spending_events"] for d in days] == [206, 206, 17]
    assert sum(d["total"] for d in days) == Decimal("0.01") * len(minutes)


def test_the_daily_totals_migration_fills_the_days_already_recorded(
    postgres_service: PostgresService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database whose ledger was written before the daily totals existed gets them from its hours."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = postgres_service.create_database(name)
    try:
        everything = migrate_module.available_migrations()
        daily = next(m for m in everything if m.name == "spend_daily")
        monkeypatch.setattr(migrate_module, "available_migrations", lambda: everything[: daily.version - 1])
        migrate_module.migrate(url)
        with Database(url) as db:
            with db.transaction() as conn:
                agent = add_agent(conn)
                ledger_store.insert_events(conn, _settlements(agent, range(0, 3000, 7)))
            monkeypatch.undo()
            applied = [m.name for m in migrate_module.migrate(url).applied]
            assert applied == [m.name for m in everything[daily.version - 1 :]]
            days, from_hours = rolled_up(db, agent)
            assert len(days) == 3 and days == from_hours
            # and from then on the trigger keeps them
            with db.transaction() as conn:
                ledger_store.insert_events(conn, _settlements(agent, range(5000, 5010)))
            days, from_hours = rolled_up(db, agent)
            assert len(days) == 4 and days == from_hours
    finally:
        postgres_service.drop_database(name)


def test_a_long_range_answers_from_the_totals_in_milliseconds(db: Database) -> None:
    """A year of events, one every 10 minutes: the query reads hour rows, not events."""
    with db.transaction() as conn:
        agent = add_agent(conn)
        conn.execute(
            """
            INSERT INTO ledger_events (idempotency_key, event_type, agent_id, occurred_at, cost, currency)
            SELECT gen_random_uuid(), 'settlement', %s, %s::timestamptz + make_interval(mins => 10 * g), 0.0125, 'USD'
              FROM generate_series(0, 52559) g
            """,
            (agent, BASE),
        )
    start, end = BASE + timedelta(minutes=3), BASE + timedelta(days=365, minutes=-7)
    assert from_totals(db, agent, start, end) == raw(db, agent, start, end)
    timings = []
    for _ in range(5):
        began = time.perf_counter()
        (summary,) = ledger_admin.spending(db, agent, start, end)
        timings.append(time.perf_counter() - began)
    assert summary.event_count == 52559
    assert summary.total == Decimal("0.0125") * 52559
    assert min(timings) < 0.05, timings


def _metering(agent: uuid.UUID, n: int) -> MeteringEvent:
    settle = n % 2 == 1
    return MeteringEvent(
        kind=LedgerEventType.SETTLEMENT if settle else LedgerEventType.RESERVATION,
        request_id=uuid.uuid5(uuid.NAMESPACE_URL, f"{agent}/{n // 2}"),
        agent_id=agent,
        occurred_at=BASE + timedelta(minutes=13 * n),
        cost=Money(Decimal(n) / 1000, "USD") if settle else Money(Decimal(0), "USD"),
        hold=None if settle else Money(Decimal("0.5"), "USD"),
        model="gpt-4o",
    )


def test_the_ledger_writer_keeps_the_totals_and_a_replay_changes_neither_ledger_nor_totals(
    database_url: str, db: Database
) -> None:
    with db.transaction() as conn:
        agent = add_agent(conn)
    events = [_metering(agent, n) for n in range(800)]
    producer = pg_log.PgLogProducer(database_url)
    try:
        for e in [*events, *events[:300]]:  # 300 sent twice
            producer.send(METERING_TOPIC, encode(e), key=e.key, headers=event_headers(e))
        assert producer.flush(30) == 0
    finally:
        producer.close()

    def drain() -> None:
        writer = LedgerWriter(
            pg_log.PgLogConsumer(database_url, "ledger-writer-group", [METERING_TOPIC]),
            database_url,
            pg_log.PgLogProducer(database_url),
            batch_size=128,
            backoff=Backoff(0.05, 0.5),
        )
        try:
            writer.run(idle_exit=1.0)
        finally:
            writer.close()
            writer.dlq_producer.close()

    def snapshot() -> tuple[list[Any], list[Any]]:
        with psycopg.connect(database_url, row_factory=dict_row) as conn:
            ledger = conn.execute(
                "SELECT event_id, idempotency_key FROM ledger_events ORDER BY event_id"
            ).fetchall()
            totals = conn.execute("SELECT * FROM spend_totals ORDER BY agent_id, bucket, currency").fetchall()
        return ledger, totals

    drain()
    first = snapshot()
    assert len(first[0]) == 800
    start, end = BASE, BASE + timedelta(days=30)
    expected = (sum((e.cost.amount for e in events), Decimal(0)), 400)
    assert from_totals(db, agent, start, end) == raw(db, agent, start, end) == {"USD": expected}

    with psycopg.connect(database_url, autocommit=True) as conn:
        pg_log.reset_offsets(conn, "ledger-writer-group", METERING_TOPIC, 0)
    drain()
    assert snapshot() == first


def raw_charged(
    db: Database, agents: list[uuid.UUID], currency: str, start: datetime, end: datetime
) -> Decimal:
    """The reference: the charged events themselves, summed."""
    with db.read() as conn:
        row = conn.execute(
            "SELECT COALESCE(sum(cost), 0) AS total FROM ledger_events WHERE agent_id = ANY(%s) "
            "AND currency = %s AND event_type IN ('settlement', 'expiry', 'adjustment') "
            "AND occurred_at >= %s AND occurred_at < %s",
            (agents, currency, start, end),
        ).fetchone()
    assert row is not None
    return Decimal(row["total"])


ZONES = ["UTC", "Asia/Kolkata", "America/New_York", "Asia/Kathmandu", "Australia/Adelaide", "Europe/Berlin"]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    events=st.lists(st.tuples(st.booleans(), event_strategy), max_size=60),
    windows=st.lists(
        st.tuples(st.booleans(), st.sampled_from(["USD", "EUR"]), instant, instant, snapping, snapping),
        min_size=1,
        max_size=len(ZONES),
    ),
)
def test_budget_totals_from_hours_and_ragged_ends_equal_the_events(
    db: Database,
    events: list[tuple[bool, tuple[LedgerEventType, int, Decimal, str]]],
    windows: list[tuple[bool, str, int, int, str, str]],
) -> None:
    """Budget windows start and end anywhere (a daily window in Asia/Kolkata starts at :30 UTC): what a
    parent's and a child's policies were charged, per policy and for every policy at once, is exactly the
    sum of the charged events in the window, however much comes from the hourly totals."""
    with db.transaction() as conn:
        parent = add_agent(conn)
        child = add_agent(conn)
        conn.execute("UPDATE agents SET parent_id = %s WHERE agent_id = %s", (parent, child))
    rows = [
        LedgerEvent(
            uuid.uuid4(),
            kind,
            child if to_child else parent,
            _at(at),
            Money(cost if kind in CHARGED else Decimal(0), currency),
        )
        for to_child, (kind, at, cost, currency) in events
    ]
    with db.transaction() as conn:
        ledger_store.insert_events(conn, rows)
    policies: list[tuple[uuid.UUID, uuid.UUID, str, WindowSpec, datetime, datetime]] = []
    for zone, (of_parent, currency, a, b, snap_a, snap_b) in zip(ZONES, windows, strict=False):
        start, end = sorted((_at(_snapped(a, snap_a)), _at(_snapped(b, snap_b))))
        end = max(end, start + timedelta(microseconds=1))
        spec = WindowSpec(TimeWindow.DAILY, WindowType.CALENDAR, zone)
        agent = parent if of_parent else child
        policies.append((add_policy(db, agent, currency, spec), agent, currency, spec, start, end))
    with db.read() as conn:
        # the bounds are the test's, not the windows' at some instant: any start and end
        bulk = spend.policy_totals(conn, [(spec, start, end) for *_, spec, start, end in policies], BASE)
        for policy_id, agent, currency, _spec, start, end in policies:
            subtree = [parent, child] if agent == parent else [child]
            expected = raw_charged(db, subtree, currency, start, end)
            assert spend.charged_total(conn, subtree, currency, start, end) == expected, (start, end)
            assert bulk[policy_id][0] == expected, (start, end)


# A request: (to the child?, reservation's instant, its hold or None when its metadata has none, currency,
# how it ended: None still open, or the settlement or expiry, at the reservation's instant as every event of
# a request is, or a request id nothing else shares)
request_strategy = st.tuples(
    st.booleans(),
    instant,
    st.one_of(st.none(), st.decimals(min_value=Decimal("0"), max_value=Decimal("90"), places=8)),
    st.sampled_from(["USD", "EUR"]),
    st.sampled_from([None, LedgerEventType.SETTLEMENT, LedgerEventType.EXPIRY, "no request id"]),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    requests=st.lists(request_strategy, max_size=40),
    strays=st.lists(st.tuples(st.booleans(), instant), max_size=4),
    since=instant,
)
def test_budget_holds_for_every_policy_at_once_equal_the_per_policy_ones(
    db: Database,
    requests: list[tuple[bool, int, Decimal | None, str, LedgerEventType | str | None]],
    strays: list[tuple[bool, int]],
    since: int,
) -> None:
    """The holds a parent's and a child's policies have open, for every policy at once, are exactly what
    the per-policy query finds: reservations since the instant that no settlement or expiry of the same
    request closed, a reservation without a request id open whatever else has none."""
    with db.transaction() as conn:
        parent = add_agent(conn)
        child = add_agent(conn)
        conn.execute("UPDATE agents SET parent_id = %s WHERE agent_id = %s", (parent, child))
    rows = []
    for to_child, at, hold, currency, ending in requests:
        agent = child if to_child else parent
        request = None if ending == "no request id" else uuid.uuid4()
        rows.append(
            LedgerEvent(
                uuid.uuid4(),
                LedgerEventType.RESERVATION,
                agent,
                _at(at),
                Money(Decimal(0), currency),
                request_id=request,
                metadata={} if hold is None else {"hold": str(hold)},
            )
        )
        if isinstance(ending, LedgerEventType):
            rows.append(
                LedgerEvent(
                    uuid.uuid4(), ending, agent, _at(at), Money(Decimal("0.5"), currency), request_id=request
                )
            )
    for to_child, at in strays:  # settlements of no request: they close nothing
        agent = child if to_child else parent
        rows.append(
            LedgerEvent(uuid.uuid4(), LedgerEventType.SETTLEMENT, agent, _at(at), Money(Decimal(1), "USD"))
        )
    with db.transaction() as conn:
        ledger_store.insert_events(conn, rows)
    spec = WindowSpec(TimeWindow.DAILY, WindowType.CALENDAR, "UTC")
    policies = []
    for agent, currency in ((parent, "USD"), (child, "USD"), (child, "EUR")):
        policies.append((add_policy(db, agent, currency, spec), agent, currency))
    with db.read() as conn:
        bulk = spend.policy_totals(conn, [(spec, BASE, BASE + timedelta(days=1))], _at(since))
        for policy_id, agent, currency in policies:
            subtree = [parent, child] if agent == parent else [child]
            held, holds = spend.open_reservations(conn, subtree, currency, _at(since))
            assert bulk[policy_id][1:] == (held, holds)
            # and both are what the requests made: the open ones since the instant (a hold missing from a
            # reservation's metadata counts as a hold of nothing)
            still_open = [
                hold
                for to_child, at, hold, cur, ending in requests
                if (child if to_child else parent) in subtree
                and cur == currency
                and at >= since
                and not isinstance(ending, LedgerEventType)
            ]
            expected = sum((h for h in still_open if h is not None), Decimal(0))
            assert (held, holds) == (expected, len(still_open))
