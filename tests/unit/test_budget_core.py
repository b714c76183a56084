"""The pure budget core: integer units, counter slots, rolling buckets and the admission state machine."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from caracald.core.budget import (
    MAX_SAFE_UNITS,
    ROLLING_BLOCK_BUCKETS,
    ROLLING_BUCKET_SECONDS,
    SETTLED_FIELD,
    AdmitOutcome,
    AmountOutOfRangeError,
    BudgetBook,
    CounterRef,
    HoldState,
    bucket_index,
    bucket_span,
    counter_ref,
    epoch_micros,
    first_denied,
    from_epoch_micros,
    from_units,
    max_safe_amount,
    parse_slot,
    plan_checks,
    prunable,
    rolling_buckets,
    rolling_prune_rule,
    rolling_sum_fields,
    spend_slot,
    to_units,
)
from caracald.core.errors import ConflictError, CurrencyMismatchError, NotFoundError, ValidationError
from caracald.core.money import CURRENCY_MINOR_UNITS, Money, ledger_scale
from caracald.core.windows import (
    TimeWindow,
    WindowSpec,
    WindowType,
    nominal_length,
    window_bounds,
    window_key,
)

H = timedelta(hours=1)
MICRO = timedelta(microseconds=1)

instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)
)
windows = st.sampled_from(list(TimeWindow))
zones = st.sampled_from(["UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu"])


def usd(text: str) -> Money:
    return Money(Decimal(text), "USD")


def rolling(window: str) -> WindowSpec:
    return WindowSpec(TimeWindow(window), WindowType.ROLLING)


def cal(window: str, zone: str = "UTC") -> WindowSpec:
    return WindowSpec(TimeWindow(window), WindowType.CALENDAR, zone)


# -- integer units ----------------------------------------------------------------------------------


@given(
    st.integers(min_value=-MAX_SAFE_UNITS, max_value=MAX_SAFE_UNITS),
    st.sampled_from(sorted(CURRENCY_MINOR_UNITS)),
)
def test_units_round_trip_exactly(units: int, currency: str) -> None:
    money = from_units(units, currency)
    assert money.amount == Decimal(units).scaleb(-ledger_scale(currency))
    assert to_units(money) == units


def test_units_are_at_the_ledger_scale() -> None:
    assert to_units(usd("1")) == 100_000_000
    assert to_units(usd("0.00000001")) == 1
    assert to_units(Money(Decimal("1"), "JPY")) == 1_000_000
    assert to_units(Money(Decimal("0.001"), "BHD")) == 1_000_000


def test_the_safe_range_is_about_ninety_million_dollars_and_enforced() -> None:
    top = max_safe_amount("USD")
    assert Decimal(90_000_000) < top.amount < Decimal(90_100_000)
    assert to_units(top) == 2**53 - 1
    assert to_units(-top) == -(2**53 - 1)
    beyond = top + usd("0.00000001")
    with pytest.raises(AmountOutOfRangeError, match="exact range"):
        to_units(beyond)
    with pytest.raises(ValueError, match="exact range"):  # an AmountOutOfRangeError is a ValueError too
        to_units(usd("100000000"))
    assert max_safe_amount("JPY").amount > Decimal(9_000_000_000)
    assert max_safe_amount("KWD").amount > Decimal(9_000_000)


# -- rolling buckets --------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(instants, windows)
def test_rolling_buckets_cover_the_window_and_only_overlapping_buckets(
    at: datetime, window: TimeWindow
) -> None:
    spec = rolling(window)
    buckets = rolling_buckets(spec, at)
    seconds = ROLLING_BUCKET_SECONDS[window]
    per_window = nominal_length(window) // timedelta(seconds=seconds)
    # one more than the window's length in buckets, unless `at` is the last microsecond of its bucket
    assert len(buckets) == per_window + (0 if bucket_index(window, at + MICRO) != buckets[-1] else 1)
    bounds = window_bounds(spec, at)
    # the newest bucket holds `at`; every bucket overlaps (at - length, at]
    assert buckets[-1] == bucket_index(window, at)
    for index in (buckets[0], buckets[-1]):
        span = bucket_span(window, index)
        # its last microsecond is after the window's (excluded) start, its first not after the end
        assert span.end - MICRO > bounds.start and span.start <= bounds.end
    # the buckets on either side do not: nothing outside the window is counted
    assert bucket_span(window, buckets[0] - 1).end - MICRO <= bounds.start
    assert bucket_span(window, buckets[-1] + 1).start > bounds.end


@settings(max_examples=300, deadline=None)
@given(instants, windows, st.floats(min_value=0, max_value=1, exclude_max=True))
def test_spend_inside_a_rolling_window_is_always_counted(
    at: datetime, window: TimeWindow, share: float
) -> None:
    """The safe direction: any instant inside (at - length, at] falls into a summed bucket."""
    length = nominal_length(window)
    spent_at = at - length + MICRO + (length - MICRO) * share
    assert window_bounds(rolling(window), at).contains(spent_at)
    assert bucket_index(window, spent_at) in rolling_buckets(rolling(window), at)


@given(instants, windows)
def test_a_bucket_counts_until_its_whole_span_left_the_window(at: datetime, window: TimeWindow) -> None:
    spec = rolling(window)
    index = bucket_index(window, at)
    span = bucket_span(window, index)
    length = nominal_length(window)
    # still counted when only its last microsecond is inside the window...
    assert index in rolling_buckets(spec, span.end - MICRO + length - MICRO)
    # ...and gone once its last microsecond has left
    assert index not in rolling_buckets(spec, span.end - MICRO + length)


def test_rolling_granularity() -> None:
    assert len(rolling_buckets(rolling("hourly"), datetime(2024, 5, 1, 12, 30, tzinfo=UTC))) == 61
    assert len(rolling_buckets(rolling("daily"), datetime(2024, 5, 1, 12, 30, tzinfo=UTC))) == 25
    assert len(rolling_buckets(rolling("weekly"), datetime(2024, 5, 1, 12, 30, tzinfo=UTC))) == 169
    assert len(rolling_buckets(rolling("monthly"), datetime(2024, 5, 1, 12, 30, tzinfo=UTC))) == 721
    below, threshold = rolling_prune_rule(range(100, 161))
    assert below == 39 and threshold == 3 * 61 + 8


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=-(10**7), max_value=10**7), st.integers(min_value=0, max_value=800), windows)
def test_rolling_sum_fields_cover_each_bucket_once(first: int, count: int, window: TimeWindow) -> None:
    per_block = ROLLING_BLOCK_BUCKETS[window]
    fields = rolling_sum_fields(range(first, first + count), per_block)
    covered: list[int] = []
    for name in fields:
        if name.startswith("c"):
            block = int(name[1:])
            covered.extend(range(block * per_block, (block + 1) * per_block))
        else:
            covered.append(int(name))
    assert sorted(covered) == list(range(first, first + count))
    # whole blocks inside, single buckets only at the ragged ends
    assert len(fields) <= count // per_block + 2 * (per_block - 1) + 1


def test_rolling_windows_read_few_fields() -> None:
    at = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    sizes = {w: len(counter_ref(uuid.UUID(int=1), rolling(w), at).settled_fields) for w in TimeWindow}
    assert sizes[TimeWindow.HOURLY] <= 23 and sizes[TimeWindow.DAILY] <= 13
    assert sizes[TimeWindow.WEEKLY] <= 52 and sizes[TimeWindow.MONTHLY] <= 76
    ref = counter_ref(uuid.UUID(int=1), rolling("monthly"), at)
    bucket = int(ref.settle_field)
    assert ref.charge_fields == (str(bucket), f"c{bucket // 24}")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("99", True), ("100", False), ("c9", True), ("c10", False), ("held", False), ("holds", False)],
)
def test_prunable_fields(name: str, expected: bool) -> None:
    assert prunable(name, 100, 10) is expected


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_epoch_micros_round_trip(micros: int) -> None:
    assert epoch_micros(from_epoch_micros(micros)) == micros


# -- counters and slots -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(instants, windows, zones, st.booleans())
def test_spend_slots_read_back(at: datetime, window: TimeWindow, zone: str, is_rolling: bool) -> None:
    spec = WindowSpec(window, WindowType.ROLLING if is_rolling else WindowType.CALENDAR, zone)
    policy = uuid.uuid4()
    ref = counter_ref(policy, spec, at)
    slot = spend_slot(spec, at)
    assert slot == ref.slot
    parsed = parse_slot(slot)
    assert (parsed.counter_id, parsed.field, parsed.needed_until) == (
        ref.counter_id,
        ref.settle_field,
        ref.needed_until,
    )
    assert ref.needed_until >= at
    if is_rolling:
        assert ref.counter_id == f"{window}@rolling"
        assert slot.startswith(f"{window}@rolling/{ROLLING_BUCKET_SECONDS[window]}s:")
    else:
        assert ref.counter_id == window_key(spec, at)
        assert ref.settle_field == SETTLED_FIELD
        assert ref.needed_until == window_bounds(spec, at).end


@pytest.mark.parametrize(
    "slot",
    [
        "",
        "daily",
        "yearly@UTC:2024-01-01T00:00:00+00:00",
        "daily@Mars/Base:2024-01-01T00:00:00+00:00",
        "daily@UTC:2024-01-01T05:00:00+00:00",  # not the start of a window
        "daily@UTC:yesterday",
        "daily@rolling/60s:12",  # daily buckets are 3600 s
        "hourly@rolling/60s:x",
    ],
)
def test_parse_slot_refuses_what_is_not_a_slot(slot: str) -> None:
    with pytest.raises(ValidationError, match="not a budget counter slot"):
        parse_slot(slot)


def test_dst_days_are_one_counter_each_and_end_at_the_next_local_midnight() -> None:
    paris = ZoneInfo("Europe/Paris")
    spec = cal("daily", "Europe/Paris")
    for day, hours in ((datetime(2024, 3, 31, tzinfo=paris), 23), (datetime(2024, 10, 27, tzinfo=paris), 25)):
        start = day.astimezone(UTC)
        refs = {counter_ref(uuid.UUID(int=1), spec, start + H * i + H / 2) for i in range(hours)}
        assert len(refs) == 1
        (ref,) = refs
        assert ref.needed_until - start == H * hours
        assert ref.counter_id == f"daily@Europe/Paris:{day.isoformat()}"
        following = counter_ref(uuid.UUID(int=1), spec, start + H * hours)
        assert following.counter_id != ref.counter_id


def test_the_repeated_autumn_hour_is_two_counters() -> None:
    spec = cal("hourly", "America/New_York")
    first = datetime(2024, 11, 3, 5, 30, tzinfo=UTC)  # 01:30 EDT
    second = first + H  # 01:30 EST, the same wall clock
    a, b = counter_ref(uuid.UUID(int=1), spec, first), counter_ref(uuid.UUID(int=1), spec, second)
    assert a.counter_id != b.counter_id
    assert a.counter_id.endswith("-04:00") and b.counter_id.endswith("-05:00")
    assert parse_slot(a.slot).needed_until == second - H / 2


@settings(max_examples=200, deadline=None)
@given(instants, zones, st.sampled_from([TimeWindow.DAILY, TimeWindow.HOURLY]))
def test_calendar_counters_change_exactly_at_window_edges(
    at: datetime, zone: str, window: TimeWindow
) -> None:
    spec = cal(window, zone)
    bounds = window_bounds(spec, at)
    ref = counter_ref(uuid.UUID(int=1), spec, at)
    assert counter_ref(uuid.UUID(int=1), spec, bounds.start).counter_id == ref.counter_id
    assert counter_ref(uuid.UUID(int=1), spec, bounds.end - MICRO).counter_id == ref.counter_id
    assert counter_ref(uuid.UUID(int=1), spec, bounds.end).counter_id != ref.counter_id
    assert counter_ref(uuid.UUID(int=1), spec, bounds.start - MICRO).counter_id != ref.counter_id


# -- planning ---------------------------------------------------------------------------------------


def test_plan_checks_refuses_other_currencies_negative_and_huge_amounts() -> None:
    at = datetime(2024, 5, 1, tzinfo=UTC)
    eur = (uuid.uuid4(), Money(Decimal(10), "EUR"), cal("daily"))
    with pytest.raises(CurrencyMismatchError):
        plan_checks(usd("1"), [eur], at)
    with pytest.raises(ValidationError, match="negative"):
        plan_checks(usd("-1"), [], at)
    with pytest.raises(AmountOutOfRangeError):
        plan_checks(usd("100000000"), [], at)
    with pytest.raises(AmountOutOfRangeError):
        plan_checks(usd("1"), [(uuid.uuid4(), usd("100000000"), cal("daily"))], at)


def test_plan_checks_dedupes_scopes_on_one_counter() -> None:
    at = datetime(2024, 5, 1, tzinfo=UTC)
    policy = uuid.uuid4()
    other = uuid.uuid4()
    units, checks = plan_checks(
        usd("0.5"),
        [
            (policy, usd("1"), cal("daily")),
            (other, usd("2"), rolling("hourly")),
            (policy, usd("1"), cal("daily")),
            (other, usd("1.5"), rolling("hourly")),  # the same counter: the smaller limit holds
        ],
        at,
    )
    assert units == 50_000_000
    assert [(c.ref.policy_id, c.index, c.limit) for c in checks] == [
        (policy, 0, 100_000_000),
        (other, 1, 150_000_000),
    ]


def test_first_denied() -> None:
    assert first_denied([(0, 10), (5, 10)], 5) is None
    assert first_denied([(0, 10), (6, 10), (20, 10)], 5) == 1
    assert first_denied([], 5) is None


# -- the state machine, step by step ----------------------------------------------------------------

T0 = datetime(2024, 3, 30, 23, 0, tzinfo=UTC)  # an hour before Paris springs forward


def _admit(
    book: BudgetBook,
    request_id: uuid.UUID,
    amount: str,
    scopes: list[tuple[uuid.UUID, Money, WindowSpec]],
    at: datetime = T0,
    ttl: timedelta = timedelta(minutes=5),
) -> AdmitOutcome:
    units, checks = plan_checks(usd(amount), scopes, at)
    return book.admit(
        request_id=request_id,
        agent_id=uuid.UUID(int=7),
        currency="USD",
        amount=units,
        at=at,
        hold_ttl=ttl,
        checks=checks,
        now=at,
    )


def test_book_settle_replays_and_errors() -> None:
    book = BudgetBook()
    policy = (uuid.uuid4(), usd("1"), cal("daily"))
    rid = uuid.uuid4()
    assert _admit(book, rid, "0.6", [policy]).admitted
    assert _admit(book, rid, "0.1", [policy]).replayed
    denied = uuid.uuid4()
    outcome = _admit(book, denied, "0.5", [policy])
    assert not outcome.admitted and outcome.denied_index == 0 and outcome.denied_policy == policy[0]
    with pytest.raises(ConflictError):
        book.settle(denied, "USD", 1, T0)
    with pytest.raises(NotFoundError):
        book.settle(uuid.uuid4(), "USD", 1, T0)
    with pytest.raises(CurrencyMismatchError):
        book.settle(rid, "EUR", 1, T0)
    first = book.settle(rid, "USD", 30_000_000, T0)
    assert (first.charged, first.correction, first.replayed) == (30_000_000, None, False)
    again = book.settle(rid, "USD", 99, T0)
    assert (again.charged, again.replayed) == (30_000_000, True)
    assert book.usage(counter_ref(policy[0], policy[2], T0)).used == 30_000_000


def test_book_expiry_then_late_settlement_corrects() -> None:
    book = BudgetBook()
    policy = (uuid.uuid4(), usd("1"), rolling("hourly"))
    rid = uuid.uuid4()
    _admit(book, rid, "0.4", [policy], ttl=timedelta(minutes=1))
    assert book.expire_due(T0 + timedelta(seconds=59)) == []
    (expired,) = book.expire_due(T0 + timedelta(minutes=1))
    assert expired.state is HoldState.EXPIRED and expired.amount == 40_000_000
    assert book.holds_in_flight == 0
    ref = counter_ref(policy[0], policy[2], T0 + timedelta(minutes=2))
    assert book.usage(ref) == type(book.usage(ref))(40_000_000, 0, 0)
    late = book.settle(rid, "USD", 25_000_000, T0 + timedelta(minutes=3))
    assert late.correction == -15_000_000
    assert book.usage(ref).settled == 25_000_000
    # an hour and a bucket later the spend has left the rolling window
    gone = counter_ref(policy[0], policy[2], T0 + timedelta(minutes=61))
    assert book.usage(gone).settled == 0


def test_book_forgets_old_decisions_and_counters() -> None:
    book = BudgetBook(decision_ttl=timedelta(hours=1))
    policy = (uuid.uuid4(), usd("1"), cal("hourly"))
    rid = uuid.uuid4()
    _admit(book, rid, "0.4", [policy])
    book.settle(rid, "USD", 1, T0)
    book.forget(T0 + timedelta(hours=2))
    assert book.record(rid) is None
    book.forget(T0 + timedelta(days=3))
    assert book.usage(counter_ref(policy[0], policy[2], T0)).settled == 0


def test_book_prunes_old_rolling_buckets() -> None:
    book = BudgetBook()
    policy = (uuid.uuid4(), usd("1000"), rolling("hourly"))
    at = T0
    for _ in range(400):  # one small settled spend every minute for 400 minutes
        rid = uuid.uuid4()
        _admit(book, rid, "0.01", [policy], at=at)
        book.settle(rid, "USD", 1_000_000, at)
        at += timedelta(minutes=1)
    counter = book._counters[(policy[0], "hourly@rolling")]
    assert len(counter.settled) <= 3 * 61 + 8
    # what the window reads is intact: exactly its 61 buckets (the last is the one still running)
    assert book.usage(counter_ref(policy[0], policy[2], at - timedelta(minutes=1))).settled == 61 * 1_000_000


def test_book_load_replaces_a_slot() -> None:
    book = BudgetBook()
    policy = uuid.uuid4()
    spec = rolling("daily")
    book.load(policy, spend_slot(spec, T0), 70_000_000, T0)
    book.load(policy, spend_slot(spec, T0 - timedelta(hours=3)), 20_000_000, T0)
    book.load(policy, spend_slot(spec, T0 - timedelta(hours=30)), 5_000_000, T0)  # outside the window
    assert book.usage(counter_ref(policy, spec, T0)).settled == 90_000_000
    with pytest.raises(AmountOutOfRangeError):
        book.load(policy, spend_slot(spec, T0), MAX_SAFE_UNITS + 1, T0)


# -- the state machine against a model --------------------------------------------------------------

#: (policy, window, limit in cents); amounts are drawn in cents too (one cent is 10**6 units).
CENT = 1_000_000
POLICIES = [
    (uuid.UUID(int=101), cal("daily", "Europe/Paris"), 100),
    (uuid.UUID(int=102), cal("hourly", "America/New_York"), 60),
    (uuid.UUID(int=103), rolling("hourly"), 50),
    (uuid.UUID(int=104), rolling("daily"), 80),
]


@dataclass
class ModelHold:
    amount: int
    refs: list[tuple[uuid.UUID, str, str]]  # policy, counter, field
    state: str
    actual: int | None = None


@dataclass
class Model:
    holds: dict[uuid.UUID, ModelHold] = field(default_factory=dict)

    def settled(self, ref: CounterRef) -> int:
        """Spend charged to the window of ``ref``: its calendar window, or its rolling buckets."""
        total = 0
        for hold in self.holds.values():
            for p, c, f in hold.refs:
                if p != ref.policy_id or c != ref.counter_id:
                    continue
                if f == SETTLED_FIELD if ref.buckets is None else int(f) in ref.buckets:
                    if hold.state == "expired":
                        total += hold.amount
                    elif hold.state == "settled":
                        assert hold.actual is not None
                        total += hold.actual
        return total

    def held(self, policy: uuid.UUID, counter: str) -> tuple[int, int]:
        amounts = [
            h.amount
            for h in self.holds.values()
            if h.state == "held" and any(p == policy and c == counter for p, c, _ in h.refs)
        ]
        return sum(amounts), len(amounts)


class BookMachine(RuleBasedStateMachine):
    """Random admits, replays, settlements, expiries and clock moves; the book must match a plain model."""

    def __init__(self) -> None:
        super().__init__()
        self.book = BudgetBook()
        self.model = Model()
        self.now = T0
        self.last_admission = T0
        self.expiries: dict[uuid.UUID, datetime] = {}

    @initialize(start=st.integers(min_value=0, max_value=48 * 60))
    def start_somewhere(self, start: int) -> None:
        self.now = T0 + timedelta(minutes=start)
        self.last_admission = self.now

    @rule(
        amount=st.integers(min_value=0, max_value=40),
        chosen=st.sets(st.integers(min_value=0, max_value=len(POLICIES) - 1)),
        ttl=st.integers(min_value=1, max_value=30),
    )
    def admit(self, amount: int, chosen: set[int], ttl: int) -> None:
        scopes = [
            (POLICIES[i][0], from_units(POLICIES[i][2] * CENT, "USD"), POLICIES[i][1]) for i in sorted(chosen)
        ]
        units, checks = plan_checks(from_units(amount * CENT, "USD"), scopes, self.now)
        expected_denied = None
        for check in checks:
            ref = check.ref
            used = self.model.settled(ref)
            used += self.model.held(ref.policy_id, ref.counter_id)[0]
            if used + units > check.limit:
                expected_denied = check.index
                break
        rid = uuid.UUID(int=len(self.model.holds) + 1)  # deterministic, so hypothesis can replay a run
        outcome = self.book.admit(
            request_id=rid,
            agent_id=uuid.UUID(int=9),
            currency="USD",
            amount=units,
            at=self.now,
            hold_ttl=timedelta(minutes=ttl),
            checks=checks,
            now=self.now,
        )
        assert outcome.denied_index == expected_denied
        event("admitted" if outcome.admitted else "denied")
        assert outcome.admitted == (expected_denied is None)
        refs = [(c.ref.policy_id, c.ref.counter_id, c.ref.settle_field) for c in checks]
        self.model.holds[rid] = ModelHold(units, refs, "held" if outcome.admitted else "denied")
        self.expiries[rid] = self.now + timedelta(minutes=ttl)
        self.last_admission = self.now

    @precondition(lambda self: bool(self.model.holds))
    @rule(data=st.data())
    def replay_admission(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.model.holds)))
        before = self.snapshot()
        _, checks = plan_checks(usd("0"), [], self.now)
        outcome = self.book.admit(
            request_id=rid,
            agent_id=uuid.UUID(int=9),
            currency="USD",
            amount=0,
            at=self.now,
            hold_ttl=timedelta(minutes=1),
            checks=checks,
            now=self.now,
        )
        assert outcome.replayed
        assert outcome.admitted == (self.model.holds[rid].state != "denied")
        assert outcome.amount == self.model.holds[rid].amount
        assert self.snapshot() == before

    @precondition(lambda self: any(h.state in ("held", "expired") for h in self.model.holds.values()))
    @rule(data=st.data(), share=st.integers(min_value=0, max_value=100))
    def settle(self, data: st.DataObject, share: int) -> None:
        rid = data.draw(
            st.sampled_from(sorted(r for r, h in self.model.holds.items() if h.state in ("held", "expired")))
        )
        hold = self.model.holds[rid]
        actual = hold.amount * share // 100  # a hold is an upper bound: the actual cost never exceeds it
        outcome = self.book.settle(rid, "USD", actual, self.now)
        assert outcome.charged == actual and not outcome.replayed
        assert outcome.correction == (actual - hold.amount if hold.state == "expired" else None)
        event(f"settled a hold that {hold.state}")
        hold.state, hold.actual = "settled", actual
        again = self.book.settle(rid, "USD", actual + 1, self.now)
        assert again.replayed and again.charged == actual

    @rule(minutes=st.integers(min_value=0, max_value=45))
    def advance_and_expire(self, minutes: int) -> None:
        self.now += timedelta(minutes=minutes)
        expired = {record.request_id for record in self.book.expire_due(self.now)}
        due = {
            rid
            for rid, hold in self.model.holds.items()
            if hold.state == "held" and self.expiries[rid] <= self.now
        }
        assert expired == due
        for rid in due:
            self.model.holds[rid].state = "expired"

    def snapshot(self) -> list[tuple[int, int, int]]:
        rows = []
        for policy_id, spec, _ in POLICIES:
            usage = self.book.usage(counter_ref(policy_id, spec, self.now))
            rows.append((usage.settled, usage.held, usage.holds))
        return rows

    @invariant()
    def matches_the_model_and_never_overspends(self) -> None:
        for policy_id, spec, limit in POLICIES:
            ref = counter_ref(policy_id, spec, self.now)
            usage = self.book.usage(ref)
            assert usage.settled == self.model.settled(ref)
            assert (usage.held, usage.holds) == self.model.held(policy_id, ref.counter_id)
            # invariant 1: settled + held never exceed the limit in the window
            assert usage.settled + usage.held <= limit * CENT
        in_flight = sum(1 for h in self.model.holds.values() if h.state == "held")
        assert self.book.holds_in_flight == in_flight


BookMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestBookMachine = BookMachine.TestCase
