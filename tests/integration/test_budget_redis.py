"""Budget backends against their invariants: a real Redis (several instances, separate pools) and the
in-process backend, through the same behavioural tests."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.crc import key_slot

from caracald.budget.base import (
    Admission,
    AdmissionRequest,
    BudgetBackend,
    BudgetUnavailableError,
    Scope,
)
from caracald.budget.local_backend import LocalBudget
from caracald.budget.redis_backend import RedisBudget
from caracald.core.budget import AmountOutOfRangeError, counter_ref, max_safe_amount, spend_slot
from caracald.core.errors import ConflictError, CurrencyMismatchError, NotFoundError
from caracald.core.money import Money
from caracald.core.windows import TimeWindow, WindowSpec, WindowType, nominal_length
from tests.harness.redis_server import RedisService
from tests.harness.tls import self_signed

pytestmark = pytest.mark.integration

TTL = timedelta(minutes=5)
DAILY = WindowSpec(TimeWindow.DAILY, WindowType.CALENDAR)


def usd(text: str | Decimal) -> Money:
    return Money(Decimal(text), "USD")


def now() -> datetime:
    return datetime.now(UTC)


def scope(
    limit: str,
    window: str = "daily",
    kind: str = "calendar",
    zone: str = "UTC",
    agent: uuid.UUID | None = None,
) -> Scope:
    return Scope(
        uuid.uuid4(),
        agent or uuid.uuid4(),
        usd(limit),
        WindowSpec(TimeWindow(window), WindowType(kind), zone),
    )


def request(
    scopes: tuple[Scope, ...],
    amount: str | Decimal,
    at: datetime | None = None,
    *,
    request_id: uuid.UUID | None = None,
    ttl: timedelta = TTL,
) -> AdmissionRequest:
    return AdmissionRequest(
        request_id=request_id or uuid.uuid4(),
        agent_id=scopes[0].agent_id if scopes else uuid.uuid4(),
        scopes=scopes,
        amount=usd(amount),
        at=at or now(),
        hold_ttl=ttl,
    )


@dataclass
class Backends:
    """Makes backends that share one budget: Redis instances with their own pools, or one LocalBudget."""

    kind: str
    make: Callable[[], BudgetBackend]
    made: list[BudgetBackend] = field(default_factory=list)

    def new(self) -> BudgetBackend:
        backend = self.make()
        self.made.append(backend)
        return backend


@pytest_asyncio.fixture(params=["redis", "local"], loop_scope="function")
async def backends(request: pytest.FixtureRequest) -> AsyncIterator[Backends]:
    if request.param == "redis":
        service: RedisService = request.getfixturevalue("redis_service")
        namespace = f"test-{uuid.uuid4().hex[:12]}"
        factory = Backends("redis", lambda: RedisBudget.from_url(service.url, namespace=namespace))
    else:
        shared = LocalBudget()
        factory = Backends("local", lambda: shared)
    yield factory
    for backend in factory.made:
        await backend.close()


@pytest_asyncio.fixture(loop_scope="function")
async def backend(backends: Backends) -> BudgetBackend:
    return backends.new()


@pytest_asyncio.fixture(loop_scope="function")
async def redis_budget(redis_service: RedisService) -> AsyncIterator[RedisBudget]:
    budget = RedisBudget.from_url(redis_service.url, namespace=f"test-{uuid.uuid4().hex[:12]}")
    yield budget
    await budget.close()


async def used(backend: BudgetBackend, s: Scope, at: datetime | None = None) -> tuple[Money, Money, int]:
    (status,) = await backend.status([s], at or now())
    return status.settled, status.held, status.holds


# -- admission, settlement, replays -----------------------------------------------------------------


async def test_admit_holds_then_settle_replaces_the_hold(backend: BudgetBackend) -> None:
    s = scope("1.00")
    first = request((s,), "0.40")
    admission = await backend.admit(first)
    assert admission == Admission(first.request_id, True, usd("0.40"))
    assert await used(backend, s) == (usd("0"), usd("0.40"), 1)
    assert await backend.holds_in_flight() == 1
    assert await backend.remaining([s], now()) == usd("0.60")
    settlement = await backend.settle(first.request_id, usd("0.25"), now())
    assert (settlement.charged, settlement.correction, settlement.replayed) == (usd("0.25"), None, False)
    assert await used(backend, s) == (usd("0.25"), usd("0"), 0)
    assert await backend.holds_in_flight() == 0
    assert await backend.remaining([], now()) is None


async def test_a_request_without_scopes_is_admitted_settled_and_expired(backend: BudgetBackend) -> None:
    at = now()
    free = request((), "0.10", at, ttl=timedelta(seconds=1))
    assert (await backend.admit(free)).admitted
    assert (await backend.settle(free.request_id, usd("0.05"), at)).charged == usd("0.05")
    lapsed = request((), "0.10", at, ttl=timedelta(seconds=1))
    await backend.admit(lapsed)
    (expired,) = await backend.expire_due(at + timedelta(seconds=1))
    assert expired.request_id == lapsed.request_id and expired.policy_ids == ()


async def test_exact_fit_is_admitted_one_unit_more_is_not(backend: BudgetBackend) -> None:
    s = scope("1.00")
    assert (await backend.admit(request((s,), "0.99999999"))).admitted
    assert (await backend.admit(request((s,), "0.00000001"))).admitted
    denied = await backend.admit(request((s,), "0.00000001"))
    assert not denied.admitted and denied.denied_scope == s
    assert (await backend.admit(request((s,), "0"))).admitted  # nothing more still fits


async def test_admission_replay_returns_the_first_decision_and_holds_nothing_more(
    backend: BudgetBackend,
) -> None:
    s = scope("1.00")
    first = request((s,), "0.70")
    assert (await backend.admit(first)).admitted
    again = await backend.admit(request((s,), "0.10", request_id=first.request_id))
    assert again == Admission(first.request_id, True, usd("0.70"), replayed=True)
    assert await used(backend, s) == (usd("0"), usd("0.70"), 1)

    denied_request = request((s,), "0.50")
    denied = await backend.admit(denied_request)
    assert not denied.admitted and not denied.replayed and denied.denied_scope == s
    replay = await backend.admit(denied_request)
    assert (replay.admitted, replay.replayed, replay.denied_scope, replay.amount) == (
        False,
        True,
        s,
        usd("0.50"),
    )
    # after settlement, the decision is still the first one
    await backend.settle(first.request_id, usd("0.10"), now())
    assert (await backend.admit(first)).replayed
    assert await used(backend, s) == (usd("0.10"), usd("0"), 0)


async def test_settling_twice_charges_once(backend: BudgetBackend) -> None:
    s = scope("1.00")
    r = request((s,), "0.50")
    await backend.admit(r)
    first = await backend.settle(r.request_id, usd("0.30"), now())
    second = await backend.settle(r.request_id, usd("0.45"), now())
    assert (first.charged, first.replayed) == (usd("0.30"), False)
    assert (second.charged, second.replayed, second.correction) == (usd("0.30"), True, None)
    assert await used(backend, s) == (usd("0.30"), usd("0"), 0)


async def test_settling_what_was_not_held(backend: BudgetBackend) -> None:
    s = scope("1.00")
    with pytest.raises(NotFoundError):
        await backend.settle(uuid.uuid4(), usd("0.10"), now())
    denied = request((s,), "2.00")
    assert not (await backend.admit(denied)).admitted
    with pytest.raises(ConflictError):
        await backend.settle(denied.request_id, usd("0.10"), now())
    held = request((s,), "0.10")
    await backend.admit(held)
    with pytest.raises(CurrencyMismatchError):
        await backend.settle(held.request_id, Money(Decimal("0.1"), "EUR"), now())
    assert await used(backend, s) == (usd("0"), usd("0.10"), 1)


async def test_a_scope_in_another_currency_cannot_be_evaluated(backend: BudgetBackend) -> None:
    eur = Scope(uuid.uuid4(), uuid.uuid4(), Money(Decimal(10), "EUR"), DAILY)
    s = scope("10.00")
    with pytest.raises(CurrencyMismatchError):
        await backend.admit(request((s, eur), "1.00"))
    assert await used(backend, s) == (usd("0"), usd("0"), 0)


async def test_amounts_beyond_the_exact_range_are_refused(backend: BudgetBackend) -> None:
    s = scope("1.00")
    beyond = max_safe_amount("USD") + usd("0.00000001")
    with pytest.raises(ValueError, match="exact range"):
        await backend.admit(request((s,), beyond.amount))
    r = request((s,), "0.10")
    await backend.admit(r)
    with pytest.raises(AmountOutOfRangeError):
        await backend.settle(r.request_id, beyond, now())
    huge_limit = Scope(uuid.uuid4(), uuid.uuid4(), usd("100000000"), DAILY)
    with pytest.raises(AmountOutOfRangeError):
        await backend.admit(request((huge_limit,), "1"))
    # the largest safe amount itself works, against the largest safe limit
    top = Scope(uuid.uuid4(), uuid.uuid4(), max_safe_amount("USD"), DAILY)
    assert (await backend.admit(request((top,), max_safe_amount("USD").amount))).admitted
    assert not (await backend.admit(request((top,), "0.00000001"))).admitted


# -- delegation: all or nothing ---------------------------------------------------------------------


async def test_a_denial_on_the_parent_holds_nothing_on_the_child(backend: BudgetBackend) -> None:
    parent = scope("1.00")
    child = scope("0.80")
    sibling = scope("0.80")
    assert (await backend.admit(request((sibling, parent), "0.70"))).admitted
    denied = await backend.admit(request((child, parent), "0.50"))
    assert not denied.admitted and denied.denied_scope == parent
    assert await used(backend, child) == (usd("0"), usd("0"), 0)
    assert await used(backend, parent) == (usd("0"), usd("0.70"), 1)
    # and a denial on the child holds nothing on the parent
    small_child = scope("0.10")
    denied = await backend.admit(request((small_child, parent), "0.20"))
    assert denied.denied_scope == small_child
    assert await used(backend, parent) == (usd("0"), usd("0.70"), 1)
    fits = await backend.admit(request((child, parent), "0.30"))
    assert fits.admitted
    assert await used(backend, child) == (usd("0"), usd("0.30"), 1)
    assert await used(backend, parent) == (usd("0"), usd("1.00"), 2)


async def test_every_window_of_a_scope_set_is_checked(backend: BudgetBackend) -> None:
    agent = uuid.uuid4()
    daily = scope("5.00", "daily", agent=agent)
    hourly = scope("1.00", "hourly", "rolling", agent=agent)
    assert (await backend.admit(request((daily, hourly), "0.90"))).admitted
    denied = await backend.admit(request((daily, hourly), "0.20"))
    assert denied.denied_scope == hourly
    assert await used(backend, daily) == (usd("0"), usd("0.90"), 1)


# -- concurrency ------------------------------------------------------------------------------------


async def test_500_concurrent_admissions_from_4_instances_never_overspend(backends: Backends) -> None:
    instances = [backends.new() for _ in range(4)]
    s = scope("1.00")
    rng = random.Random(20240501)
    requests = [request((s,), Decimal(rng.randint(1, 1_000_000)).scaleb(-8)) for _ in range(500)]
    answers = await asyncio.gather(
        *(instances[i % 4].admit(r) for i, r in enumerate(requests)), return_exceptions=True
    )
    assert all(isinstance(a, Admission) for a in answers), [
        a for a in answers if not isinstance(a, Admission)
    ]
    admitted = [a for a in answers if isinstance(a, Admission) and a.admitted]
    denied = [a for a in answers if isinstance(a, Admission) and not a.admitted]
    assert len(admitted) + len(denied) == 500
    total = sum((a.amount for a in admitted), usd("0"))
    assert total <= usd("1.00")
    assert denied, "the amounts add up to far more than the limit"
    assert usd("1.00") - total < max(a.amount for a in denied)  # the budget was used, not starved
    assert await used(instances[0], s) == (usd("0"), total, len(admitted))

    # settle them all concurrently, from other instances than the one that admitted
    actual = {
        a.request_id: Decimal(rng.randint(0, int(a.amount.amount.scaleb(8)))).scaleb(-8) for a in admitted
    }
    settlements = await asyncio.gather(
        *(
            instances[(i + 1) % 4].settle(a.request_id, usd(actual[a.request_id]), now())
            for i, a in enumerate(admitted)
        )
    )
    assert not any(x.replayed for x in settlements)
    assert await used(instances[2], s) == (usd(sum(actual.values(), Decimal(0))), usd("0"), 0)
    assert await instances[3].holds_in_flight() == 0


async def test_concurrent_children_share_a_parent_without_overspending_either(backends: Backends) -> None:
    instances = [backends.new() for _ in range(4)]
    parent = scope("1.50")
    children = [scope("1.00"), scope("1.00"), scope("1.00")]
    rng = random.Random(7)
    requests = [
        request((c, parent), Decimal(rng.randint(1, 100)).scaleb(-3)) for c in children for _ in range(80)
    ]
    rng.shuffle(requests)
    answers = await asyncio.gather(*(instances[i % 4].admit(r) for i, r in enumerate(requests)))
    by_id = {r.request_id: r for r in requests}
    held: dict[uuid.UUID, Money] = {}
    for a in answers:
        if a.admitted:
            for s in by_id[a.request_id].scopes:
                held[s.policy_id] = held.get(s.policy_id, usd("0")) + a.amount
    assert held[parent.policy_id] <= usd("1.50")
    for child in children:
        assert held.get(child.policy_id, usd("0")) <= usd("1.00")
        assert (await used(instances[0], child))[1] == held.get(child.policy_id, usd("0"))
    assert (await used(instances[1], parent))[1] == held[parent.policy_id]


async def test_concurrent_replays_of_one_request_hold_once(backends: Backends) -> None:
    instances = [backends.new() for _ in range(4)]
    s = scope("1.00")
    r = request((s,), "0.30")
    answers = await asyncio.gather(*(instances[i % 4].admit(r) for i in range(40)))
    assert all(a.admitted for a in answers)
    assert sum(1 for a in answers if not a.replayed) == 1
    settlements = await asyncio.gather(
        *(instances[i % 4].settle(r.request_id, usd("0.2"), now()) for i in range(40))
    )
    assert sum(1 for x in settlements if not x.replayed) == 1
    assert await used(instances[0], s) == (usd("0.20"), usd("0"), 0)


# -- expiry -----------------------------------------------------------------------------------------


async def test_expiry_charges_the_reservation_and_a_late_settlement_corrects(backend: BudgetBackend) -> None:
    s = scope("1.00")
    at = now()
    short = request((s,), "0.40", at, ttl=timedelta(seconds=30))
    longer = request((s,), "0.20", at, ttl=timedelta(minutes=10))
    await backend.admit(short)
    await backend.admit(longer)
    assert await backend.expire_due(at + timedelta(seconds=29)) == []
    (expired,) = await backend.expire_due(at + timedelta(seconds=30))
    assert (expired.request_id, expired.agent_id, expired.amount) == (
        short.request_id,
        short.agent_id,
        usd("0.40"),
    )
    assert expired.policy_ids == (s.policy_id,)
    assert abs(expired.reserved_at - at) < timedelta(microseconds=1)
    assert await used(backend, s) == (usd("0.40"), usd("0.20"), 1)
    assert await backend.expire_due(at + timedelta(minutes=1)) == []  # nothing twice
    assert await backend.holds_in_flight() == 1

    late = await backend.settle(short.request_id, usd("0.15"), at + timedelta(minutes=2))
    assert (late.charged, late.correction, late.replayed) == (usd("0.15"), usd("-0.25"), False)
    assert await used(backend, s) == (usd("0.15"), usd("0.20"), 1)
    replay = await backend.settle(short.request_id, usd("0.15"), at + timedelta(minutes=3))
    assert (replay.replayed, replay.correction) == (True, usd("-0.25"))

    # a late settlement above the reservation charges more (the hold was not the upper bound it should be)
    await backend.expire_due(at + timedelta(minutes=10))
    over = await backend.settle(longer.request_id, usd("0.50"), at + timedelta(minutes=11))
    assert over.correction == usd("0.30")
    assert await used(backend, s) == (usd("0.65"), usd("0"), 0)


async def test_expire_due_honours_its_limit(backend: BudgetBackend) -> None:
    s = scope("10.00")
    at = now()
    for _ in range(5):
        await backend.admit(request((s,), "0.10", at, ttl=timedelta(seconds=1)))
    first = await backend.expire_due(at + timedelta(seconds=2), limit=3)
    second = await backend.expire_due(at + timedelta(seconds=2), limit=3)
    assert (len(first), len(second)) == (3, 2)
    assert {e.request_id for e in first}.isdisjoint({e.request_id for e in second})
    assert await used(backend, s) == (usd("0.50"), usd("0"), 0)


# -- windows ----------------------------------------------------------------------------------------


async def test_a_new_calendar_window_starts_empty(backend: BudgetBackend) -> None:
    s = scope("1.00", "daily", zone="Europe/Paris")
    before_midnight = datetime(2031, 3, 29, 22, 30, tzinfo=UTC)  # 23:30 in Paris
    r = request((s,), "0.90", before_midnight)
    await backend.admit(r)
    await backend.settle(r.request_id, usd("0.90"), before_midnight)
    assert not (await backend.admit(request((s,), "0.20", before_midnight + timedelta(minutes=29)))).admitted
    assert (await backend.admit(request((s,), "0.20", before_midnight + timedelta(minutes=30)))).admitted
    assert await used(backend, s, before_midnight) == (usd("0.90"), usd("0"), 0)


async def test_a_rolling_window_slides(backend: BudgetBackend) -> None:
    s = scope("1.00", "hourly", "rolling")
    t0 = datetime(2031, 1, 1, 12, 0, 30, tzinfo=UTC)
    r = request((s,), "0.80", t0)
    await backend.admit(r)
    await backend.settle(r.request_id, usd("0.80"), t0)
    assert not (await backend.admit(request((s,), "0.30", t0 + timedelta(minutes=59)))).admitted
    # the 12:00 bucket counts until all of it has left the window: until 13:01 (exclusive)
    assert not (await backend.admit(request((s,), "0.30", t0 + timedelta(minutes=60, seconds=29)))).admitted
    assert (await backend.admit(request((s,), "0.30", t0 + timedelta(minutes=60, seconds=30)))).admitted
    assert await used(backend, s, t0 + timedelta(minutes=61)) == (usd("0"), usd("0.30"), 1)


@pytest.mark.parametrize("window", ["hourly", "daily", "weekly", "monthly"])
async def test_rolling_sums_match_brute_force_and_the_admission_check(
    backend: BudgetBackend, window: str
) -> None:
    """Spend spread over more than a window: status (bucket and block fields read in Python) and the
    admission check (read by the Redis script) must both equal a brute-force sum over the buckets."""
    s = scope("1000.00", window, "rolling")
    rng = random.Random(window)
    length = nominal_length(TimeWindow(window))
    start = datetime(2031, 2, 1, 0, 0, 7, tzinfo=UTC)
    charges: list[tuple[datetime, Money]] = []
    for _ in range(60):
        at = start + length * 1.5 * rng.random()
        r = request((s,), "1.00", at)
        await backend.admit(r)
        actual = usd(Decimal(rng.randint(1, 10**8)).scaleb(-8))
        await backend.settle(r.request_id, actual, at)
        charges.append((at, actual))
    for _ in range(8):
        probe = start + length * 2 * rng.random()
        buckets = counter_ref(s.policy_id, s.window, probe).buckets
        assert buckets is not None
        expected = sum(
            (m for t, m in charges if counter_ref(s.policy_id, s.window, t).buckets[-1] in buckets),  # type: ignore[index]
            usd("0"),
        )
        assert (await used(backend, s, probe))[0] == expected
        room = s.limit - expected
        assert not (await backend.admit(request((s,), (room + usd("0.00000001")).amount, probe))).admitted
        fits = request((s,), room.amount, probe)
        assert (await backend.admit(fits)).admitted
        await backend.settle(fits.request_id, usd("0"), probe)


# -- loading from the ledger ------------------------------------------------------------------------


async def _load(backend: BudgetBackend, totals: dict[tuple[uuid.UUID, str], Money]) -> None:
    if isinstance(backend, RedisBudget):
        await backend.rebuild(totals)
    else:
        assert isinstance(backend, LocalBudget)
        await backend.seed(totals)


async def test_counters_load_from_ledger_totals(backend: BudgetBackend) -> None:
    at = now()
    daily = scope("1.00", "daily")
    rolling_daily = scope("1.00", "daily", "rolling")
    await _load(
        backend,
        {
            (daily.policy_id, spend_slot(daily.window, at)): usd("0.70"),
            (daily.policy_id, spend_slot(daily.window, at - timedelta(days=1))): usd("5.00"),  # yesterday
            (rolling_daily.policy_id, spend_slot(rolling_daily.window, at)): usd("0.25"),
            (rolling_daily.policy_id, spend_slot(rolling_daily.window, at - timedelta(hours=5))): usd("0.25"),
            (rolling_daily.policy_id, spend_slot(rolling_daily.window, at - timedelta(hours=26))): usd("9"),
        },
    )
    assert await used(backend, daily, at) == (usd("0.70"), usd("0"), 0)
    assert await used(backend, rolling_daily, at) == (usd("0.50"), usd("0"), 0)
    assert not (await backend.admit(request((daily,), "0.31", at))).admitted
    assert (await backend.admit(request((daily, rolling_daily), "0.30", at))).admitted


# -- random sequences against a model ---------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_sequences_match_a_model(backends: Backends, seed: int) -> None:
    """Admit/replay/settle/expire at random from several instances; counters must match a plain model."""
    rng = random.Random(seed)
    instances = [backends.new() for _ in range(3)]
    parent = scope("2.00", "daily")
    children = [scope("1.00", "hourly", "rolling"), scope("0.50", "hourly")]
    clock = datetime(2031, 6, 1, 10, 0, tzinfo=UTC)
    holds: dict[uuid.UUID, tuple[AdmissionRequest, str, Money | None]] = {}  # request, state, actual
    for _ in range(150):
        move = rng.random()
        backend = rng.choice(instances)
        if move < 0.45 or not holds:
            child = rng.choice(children)
            r = request(
                (child, parent), Decimal(rng.randint(0, 40)).scaleb(-2), clock, ttl=timedelta(minutes=3)
            )
            statuses = await backend.status(r.scopes, clock)
            expected = all(st.settled + st.held + r.amount <= st.scope.limit for st in statuses)
            a = await backend.admit(r)
            assert a.admitted == expected
            holds[r.request_id] = (r, "held" if a.admitted else "denied", None)
        elif move < 0.55:
            rid = rng.choice(list(holds))
            r, state, _ = holds[rid]
            assert (await backend.admit(r)).admitted == (state != "denied")
        elif move < 0.8:
            candidates = [rid for rid, (_, state, _) in holds.items() if state in ("held", "expired")]
            if candidates:
                rid = rng.choice(candidates)
                r, state, _ = holds[rid]
                actual = usd(Decimal(rng.randint(0, int(r.amount.amount * 100))).scaleb(-2))
                x = await backend.settle(rid, actual, clock)
                assert x.correction == (actual - r.amount if state == "expired" else None)
                holds[rid] = (r, "settled", actual)
        else:
            clock += timedelta(minutes=rng.randint(0, 20))
            for e in await backend.expire_due(clock):
                r, state, _ = holds[e.request_id]
                assert state == "held" and r.at + r.hold_ttl <= clock
                holds[e.request_id] = (r, "expired", None)
        # compare every scope with the model
        for s in (parent, *children):
            settled, held, count = await used(rng.choice(instances), s, clock)
            here = counter_ref(s.policy_id, s.window, clock).counter_id
            exp_held = [
                r.amount
                for r, st, _ in holds.values()
                if st == "held"
                and s in r.scopes
                and counter_ref(s.policy_id, s.window, r.at).counter_id == here
            ]
            assert held == sum(exp_held, usd("0")) and count == len(exp_held)
            if s is parent:  # one calendar day (10:00 to about 18:00): everything settled or expired counts
                assert settled == sum((_charged(r, st, act) for r, st, act in holds.values()), usd("0"))
            assert settled + held <= s.limit


def _charged(r: AdmissionRequest, state: str, actual: Money | None) -> Money:
    if state == "settled":
        assert actual is not None
        return actual
    return r.amount if state == "expired" else usd("0")


# -- Redis specifics --------------------------------------------------------------------------------


async def test_keys_share_one_hash_slot_and_expire(
    redis_budget: RedisBudget, redis_service: RedisService
) -> None:
    s = scope("1.00", "daily", zone="Europe/Paris")
    r_scope = scope("1.00", "weekly", "rolling")
    admitted = request((s, r_scope), "0.10")
    denied = request((s,), "5.00")
    await redis_budget.admit(admitted)
    await redis_budget.admit(denied)
    client = Redis.from_url(redis_service.url, decode_responses=True)
    try:
        keys = [k async for k in client.scan_iter(match=f"{{{redis_budget.namespace}}}:*")]
        assert len(keys) == 5  # two counters, two requests, the holds set
        assert len({key_slot(k.encode()) for k in keys}) == 1
        counter = redis_budget.counter_key(
            s.policy_id, counter_ref(s.policy_id, s.window, admitted.at).counter_id
        )
        assert counter in keys
        assert counter.startswith(f"{{{redis_budget.namespace}}}:ctr:{s.policy_id}:daily@Europe/Paris:")
        for key in keys:
            ttl = await client.ttl(key)
            if key in (redis_budget.request_key(admitted.request_id), redis_budget.holds_key):
                assert ttl == -1  # a hold in flight is never forgotten
            else:
                assert 0 < ttl <= 9 * 24 * 3600
        assert await client.ttl(redis_budget.request_key(denied.request_id)) <= 24 * 3600
        record = await client.hgetall(redis_budget.request_key(admitted.request_id))
        assert record["state"] == "held" and record["amount"] == "10000000" and record["currency"] == "USD"
        assert record["keys"].split()[0] == counter
        assert await client.hgetall(counter) == {"held": "10000000", "holds": "1"}
    finally:
        await client.aclose()


async def test_rolling_counters_prune_old_buckets(
    redis_budget: RedisBudget, redis_service: RedisService
) -> None:
    s = scope("1000.00", "hourly", "rolling")
    at = datetime(2031, 1, 1, tzinfo=UTC)
    for _ in range(400):  # a settled spend every minute for 400 minutes
        r = request((s,), "0.01", at)
        await redis_budget.admit(r)
        await redis_budget.settle(r.request_id, usd("0.01"), at)
        at += timedelta(minutes=1)
    client = Redis.from_url(redis_service.url, decode_responses=True)
    try:
        fields = await client.hlen(redis_budget.counter_key(s.policy_id, "hourly@rolling"))
    finally:
        await client.aclose()
    assert 61 < fields <= 3 * 61 + 8 + 2  # the buckets, plus held and holds
    # what the window reads is intact: its 60 full minutes and the one still running
    assert await used(redis_budget, s, at - timedelta(seconds=30)) == (usd("0.61"), usd("0"), 0)


async def test_redis_down_is_budget_unavailable_then_recovers(redis_service: RedisService) -> None:
    budget = RedisBudget.from_url(
        redis_service.url, namespace=f"test-{uuid.uuid4().hex[:12]}", socket_timeout=0.5
    )
    s = scope("1.00")
    try:
        assert (await budget.admit(request((s,), "0.10"))).admitted
        redis_service.stop()
        try:
            for step in (
                budget.admit(request((s,), "0.10")),
                budget.settle(uuid.uuid4(), usd("0.1"), now()),
                budget.expire_due(now()),
                budget.status([s], now()),
                budget.holds_in_flight(),
            ):
                with pytest.raises(BudgetUnavailableError) as info:
                    await step
                assert info.value.reason == "budget_unavailable"
        finally:
            redis_service.start()
        # the server came back empty (no persistence): the same client works again
        assert (await budget.admit(request((s,), "0.10"))).admitted
        assert await used(budget, s) == (usd("0"), usd("0.10"), 1)
    finally:
        await budget.close()


async def test_require_loaded_fails_closed_until_rebuilt(
    redis_budget: RedisBudget, redis_service: RedisService
) -> None:
    strict = RedisBudget.from_url(redis_service.url, namespace=redis_budget.namespace, require_loaded=True)
    s = scope("1.00")
    try:
        with pytest.raises(BudgetUnavailableError, match="rebuild"):
            await strict.admit(request((s,), "0.10"))
        await strict.rebuild({(s.policy_id, spend_slot(s.window, now())): usd("0.95")})
        assert not (await strict.admit(request((s,), "0.10"))).admitted
        assert (await strict.admit(request((s,), "0.05"))).admitted
    finally:
        await strict.close()


async def test_settle_without_the_admitting_instance_and_with_stale_cache(
    redis_budget: RedisBudget, redis_service: RedisService
) -> None:
    other = RedisBudget.from_url(redis_service.url, namespace=redis_budget.namespace)
    try:
        s = scope("1.00")
        r = request((s,), "0.50")
        await redis_budget.admit(r)
        assert (await other.settle(r.request_id, usd("0.20"), now())).charged == usd("0.20")
        # the admitting instance's cached keys are still right: its settlement is a replay
        assert (await redis_budget.settle(r.request_id, usd("0.20"), now())).replayed
    finally:
        await other.close()


async def test_ping_checks_the_server(redis_budget: RedisBudget) -> None:
    await redis_budget.ping()


async def test_scripts_flushed_from_redis_are_loaded_again(redis_budget: RedisBudget) -> None:
    s = scope("1.00")
    await redis_budget._client.script_flush()
    # Admissions started together share one pipeline; each finds its script gone and loads it again.
    requests = [request((s,), "0.10") for _ in range(3)]
    admissions = await asyncio.gather(*(redis_budget.admit(r) for r in requests))
    assert all(a.admitted for a in admissions)
    await redis_budget._client.script_flush()
    await asyncio.gather(*(redis_budget.settle(r.request_id, usd("0.05"), now()) for r in requests))
    assert await used(redis_budget, s) == (usd("0.15"), usd("0"), 0)


async def test_concurrent_calls_share_pipelines_and_each_gets_its_own_answer(
    redis_budget: RedisBudget,
) -> None:
    s = scope("1.00")
    requests = [request((s,), "0.01") for _ in range(150)]
    admissions = await asyncio.gather(*(redis_budget.admit(r) for r in requests))
    assert [a.request_id for a in admissions] == [r.request_id for r in requests]
    assert sum(a.admitted for a in admissions) == 100
    admitted = [r for r, a in zip(requests, admissions, strict=True) if a.admitted]
    settled = await asyncio.gather(
        *(redis_budget.settle(r.request_id, usd("0.005"), now()) for r in admitted)
    )
    assert {x.charged for x in settled} == {usd("0.005")}
    assert await used(redis_budget, s) == (usd("0.5"), usd("0"), 0)


async def test_a_dropped_connection_is_opened_again_and_the_call_sent_again(
    redis_budget: RedisBudget, redis_service: RedisService
) -> None:
    s = scope("1.00")
    assert (await redis_budget.admit(request((s,), "0.10"))).admitted
    admin = Redis.from_url(redis_service.url, decode_responses=True)
    try:
        killed = await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    finally:
        await admin.aclose()
    assert killed >= 1  # the budget's connections, the scripts' among them
    second = request((s,), "0.20")
    assert (await redis_budget.admit(second)).admitted
    assert (await redis_budget.settle(second.request_id, usd("0.15"), now())).charged == usd("0.15")
    assert await used(redis_budget, s) == (usd("0.15"), usd("0.10"), 1)


async def test_a_server_that_stops_answering_fails_the_call_in_time_then_serves_again(
    redis_service: RedisService,
) -> None:
    budget = RedisBudget.from_url(
        redis_service.url, namespace=f"test-{uuid.uuid4().hex[:12]}", socket_timeout=0.3
    )
    admin = Redis.from_url(redis_service.url, decode_responses=True)
    s = scope("1.00")
    try:
        assert (await budget.admit(request((s,), "0.10"))).admitted
        await admin.execute_command("CLIENT", "PAUSE", "2500", "ALL")
        stalled = request((s,), "0.20")
        started = asyncio.get_running_loop().time()
        with pytest.raises(BudgetUnavailableError):
            await budget.admit(stalled)
        assert asyncio.get_running_loop().time() - started < 2.4  # refused before Redis came back
        await admin.execute_command("CLIENT", "UNPAUSE")
        # Asked again, the stalled request holds once, whether or not Redis got to run its first try.
        assert (await budget.admit(stalled)).admitted
        assert (await budget.admit(request((s,), "0.30"))).admitted
        assert await used(budget, s) == (usd("0"), usd("0.60"), 3)
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
        await budget.close()


# -- TLS ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisService]:
    """A Redis of its own that also listens with TLS, on a self-signed certificate."""
    service = RedisService(tls=self_signed(tmp_path_factory.mktemp("redis-tls"))).start()
    yield service
    service.close()


async def test_admission_and_settlement_over_tls(tls_redis: RedisService) -> None:
    budget = RedisBudget.from_url(tls_redis.tls_url, namespace=f"test-{uuid.uuid4().hex[:12]}")
    s = scope("1.00")
    try:
        first, second = request((s,), "0.60"), request((s,), "0.60")
        assert (await budget.admit(first)).admitted
        assert not (await budget.admit(second)).admitted  # the counters are read over TLS too
        assert (await budget.settle(first.request_id, usd("0.25"), now())).charged == usd("0.25")
        assert await used(budget, s) == (usd("0.25"), usd("0"), 0)
        # The request path's own connection (pipelined, read by hiredis) took the TLS session over from
        # redis-py: it is the one that answered, not a fallback.
        link = budget._batcher._link if budget._batcher is not None else None
        assert link is not None and link.usable
        # Dropped, it is opened again with TLS and the call sent again.
        admin = Redis.from_url(tls_redis.url, decode_responses=True)
        try:
            await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        finally:
            await admin.aclose()
        third = request((s,), "0.70")
        assert (await budget.admit(third)).admitted
        assert await used(budget, s) == (usd("0.25"), usd("0.70"), 1)
    finally:
        await budget.close()


async def test_a_redis_whose_certificate_is_not_trusted_admits_nothing(tls_redis: RedisService) -> None:
    untrusting = tls_redis.tls_url.split("?", 1)[0]  # the system's authorities only: not this certificate
    budget = RedisBudget.from_url(untrusting, namespace=f"test-{uuid.uuid4().hex[:12]}")
    try:
        with pytest.raises(
            BudgetUnavailableError, match=r"certificate verify failed|CERTIFICATE_VERIFY_FAILED"
        ):
            await budget.admit(request((scope("1.00"),), "0.10"))
    finally:
        await budget.close()
