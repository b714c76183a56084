"""Budget counters: the pure part both budget backends share (no I/O).

Money in counters
    Counters hold integers: an amount's value at its currency's *ledger scale* (``to_units``), e.g.
    ``$1.00`` is ``100_000_000`` units of USD (8 decimal places). Redis' Lua sees numbers as IEEE
    doubles, which are exact only up to 2**53, so every single amount and limit must stay within
    ``MAX_SAFE_UNITS = 2**53 - 1``: about 90 million USD or EUR, 9 billion JPY, 9 million BHD/KWD. A
    larger one is refused with ``AmountOutOfRangeError`` (a ``ValueError`` too) before any counter is
    touched. Counters themselves are summed by Redis' 64-bit ``HINCRBY``, so they stay exact; a
    comparison ``used + amount > limit`` stays right in doubles because anything at or above 2**53
    is above every allowed limit.

Where spend is counted
    A scope's spend at an instant is counted under a *counter* and a *field* of it (``CounterRef``):

    * calendar windows: counter ``window_key(spec, at)`` (a new window is simply a new counter, so no
      reset job), field ``settled``;
    * rolling windows: counter ``<window>@rolling`` (one per policy and window), field = the index of
      the time *bucket* holding ``at``: buckets of 60 s for hourly windows and 3600 s for daily,
      weekly and monthly ones (``ROLLING_BUCKET_SECONDS``). The spend of a rolling window
      ``(at - length, at]`` is the sum of every bucket that overlaps it: a bucket still counts until
      its whole span has left the window, so rounding can only over-count, never let spend slip
      under a limit. That is at most ``length / bucket + 1`` buckets: 61, 25, 169 or 721.

      Summing 721 fields per admission would be slow, so a counter also keeps *blocks*: field
      ``c<k>`` is the sum of the ``ROLLING_BLOCK_BUCKETS`` buckets ``k * n .. k * n + n - 1`` (10
      minutes for hourly windows, 6 hours for daily, a day for weekly and monthly). Every charge
      goes to its bucket and its block; a window reads whole blocks where it covers them and single
      buckets at its two ragged ends (``rolling_sum_fields``): at most 23, 13, 52 or 76 fields.

    Every counter also has ``held`` (the sum of its holds in flight) and ``holds`` (their number).
    Holds are not bucketed: a hold counts against a rolling window until it is settled or expired,
    whatever its age (again the safe direction). Settlement and expiry charge the fields chosen at
    reservation time (``CounterRef.charge_fields``), so spend belongs to the window in which it was
    admitted.

    ``spend_slot(spec, at)`` names the counter and field of an instant in one string (the calendar
    window key, or ``<window>@rolling/<seconds>s:<bucket>``): the ledger groups its totals by it to
    rebuild counters (``parse_slot`` reads it back).

The decision
    ``BudgetBook`` is the whole admission/settlement/expiry state machine over these counters, in
    memory; the in-process backend drives it under a lock, and the Redis scripts implement the same
    steps (see ``caracald.budget.redis_backend``). Both dedupe scopes that land on the same counter.
"""

from __future__ import annotations

import heapq
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Final

from caracald.core.errors import ConflictError, CurrencyMismatchError, NotFoundError, ValidationError
from caracald.core.money import Money, check_currency, ledger_scale
from caracald.core.windows import (
    TimeWindow,
    WindowBounds,
    WindowSpec,
    WindowType,
    nominal_length,
    window_bounds,
    window_key,
)

#: The largest amount, limit or counter value (in ledger-scale units) that a double represents exactly.
MAX_SAFE_UNITS: Final = 2**53 - 1

#: Rolling windows keep settled spend in buckets of this many seconds.
ROLLING_BUCKET_SECONDS: Final[dict[TimeWindow, int]] = {
    TimeWindow.HOURLY: 60,
    TimeWindow.DAILY: 3600,
    TimeWindow.WEEKLY: 3600,
    TimeWindow.MONTHLY: 3600,
}

#: Rolling buckets per block (see the module doc).
ROLLING_BLOCK_BUCKETS: Final[dict[TimeWindow, int]] = {
    TimeWindow.HOURLY: 10,
    TimeWindow.DAILY: 6,
    TimeWindow.WEEKLY: 24,
    TimeWindow.MONTHLY: 24,
}

#: How long a decision (admitted, denied, settled, expired) is remembered for idempotent replays and
#: late settlements, by default.
DEFAULT_DECISION_TTL: Final = timedelta(days=1)

#: Counters are kept this long past the last instant anything reads them (plus the hold's time to live).
COUNTER_GRACE: Final = timedelta(days=1)

#: Counter fields.
SETTLED_FIELD: Final = "settled"
HELD_FIELD: Final = "held"
HOLDS_FIELD: Final = "holds"

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
_ROLLING_MARK: Final = "@rolling"


class AmountOutOfRangeError(ValidationError, ValueError):
    """An amount too large for exact integer counters (see ``MAX_SAFE_UNITS``)."""

    reason = "amount_out_of_range"


# -- money as integers ------------------------------------------------------------------------------


def to_units(money: Money) -> int:
    """``money`` in integer units of its currency's ledger scale; refuses what a double cannot hold."""
    units = money.amount.scaleb(ledger_scale(money.currency))
    if abs(units) > MAX_SAFE_UNITS:
        raise AmountOutOfRangeError(
            f"{money.format(exact=True)} is beyond the budget counters' exact range "
            f"(at most {max_safe_amount(money.currency).format()})"
        )
    value = int(units)
    assert value == units, "Money keeps amounts at the ledger scale"
    return value


def from_units(units: int, currency: str) -> Money:
    """The Money that ``units`` ledger-scale units of ``currency`` are."""
    return Money(Decimal(units).scaleb(-ledger_scale(currency)), currency)


def max_safe_amount(currency: str) -> Money:
    """The largest amount the counters keep exactly in ``currency`` (about 90 million for USD)."""
    return from_units(MAX_SAFE_UNITS, currency)


# -- time -------------------------------------------------------------------------------------------


def _aware(at: datetime, what: str = "time") -> datetime:
    if not isinstance(at, datetime) or at.tzinfo is None or at.utcoffset() is None:
        raise ValidationError(f"{what} {at!r} must be a datetime with a time zone")
    return at.astimezone(UTC)


def epoch_micros(at: datetime) -> int:
    """Microseconds since the Unix epoch, exactly."""
    return (_aware(at) - _EPOCH) // _MICROSECOND


def from_epoch_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def epoch_seconds_ceil(at: datetime) -> int:
    """Whole seconds since the epoch, rounded up (for key expiry times)."""
    return -(-epoch_micros(at) // 1_000_000)


# -- rolling buckets --------------------------------------------------------------------------------


def bucket_seconds(window: TimeWindow) -> int:
    return ROLLING_BUCKET_SECONDS[TimeWindow(window)]


def bucket_index(window: TimeWindow, at: datetime) -> int:
    """The bucket of a rolling ``window`` holding ``at``: it spans ``[i * seconds, (i + 1) * seconds)``."""
    return epoch_micros(at) // (bucket_seconds(window) * 1_000_000)


def bucket_span(window: TimeWindow, index: int) -> WindowBounds:
    seconds = bucket_seconds(window)
    start = _EPOCH + timedelta(seconds=index * seconds)
    return WindowBounds(start, start + timedelta(seconds=seconds))


def rolling_buckets(spec: WindowSpec, at: datetime) -> range:
    """Every bucket that overlaps the rolling window ``(at - length, at]``, oldest first."""
    if not spec.is_rolling:
        raise ValidationError(f"{spec} is not a rolling window")
    micros = epoch_micros(at)
    size = bucket_seconds(spec.window) * 1_000_000
    length = nominal_length(spec.window) // _MICROSECOND
    # the oldest bucket holds the window's first microsecond, at - length + 1 us
    return range((micros - length + 1) // size, micros // size + 1)


def block_buckets(window: TimeWindow) -> int:
    return ROLLING_BLOCK_BUCKETS[TimeWindow(window)]


def block_field(bucket: int, per_block: int) -> str:
    """The field of the block holding ``bucket``."""
    return f"c{bucket // per_block}"


def rolling_sum_fields(buckets: range, per_block: int) -> list[str]:
    """The fields whose sum is the spend in ``buckets``: whole blocks inside the range, and the
    single buckets at its ends. (The Redis admission script computes the same list.)"""
    if not buckets:
        return []
    first, last = buckets.start, buckets[-1]
    first_block = -(-first // per_block)  # the first block starting at or after `first`
    end_block = (last + 1) // per_block  # blocks before this one end at or before `last`
    if first_block >= end_block:
        return [str(index) for index in buckets]
    return [
        *(str(index) for index in range(first, first_block * per_block)),
        *(f"c{block}" for block in range(first_block, end_block)),
        *(str(index) for index in range(end_block * per_block, last + 1)),
    ]


def rolling_prune_rule(buckets: range) -> tuple[int, int]:
    """``(below, threshold)``: once a rolling counter has more than ``threshold`` fields, drop the
    buckets below ``below`` (and the blocks that end below it). That is a whole window older than
    the oldest bucket read, so clock skew between gateways cannot drop what another one still reads,
    and pruning runs about once per window length."""
    return buckets.start - len(buckets), 3 * len(buckets) + 8


def prunable(name: str, below: int, per_block: int) -> bool:
    """Whether a rolling counter's field ``name`` lies wholly before bucket ``below``."""
    try:
        if name.startswith("c"):
            return (int(name[1:]) + 1) * per_block <= below
        return int(name) < below
    except ValueError:  # held, holds
        return False


# -- counters ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CounterRef:
    """Where one scope's spend at one instant is counted, and what to read to check it."""

    policy_id: uuid.UUID
    window: TimeWindow
    #: The counter: the calendar window key, or ``<window>@rolling``.
    counter_id: str
    #: The field naming where spend at this instant goes: ``settled`` or a rolling bucket index.
    settle_field: str
    #: Rolling windows: the bucket fields to sum for settled spend at this instant.
    buckets: range | None
    #: The last instant at which anything reads the spend recorded here.
    needed_until: datetime
    #: The window at the instant: the calendar window, or ``(at - length, at]``.
    bounds: WindowBounds

    @property
    def rolling(self) -> bool:
        return self.buckets is not None

    @property
    def slot(self) -> str:
        """The ``spend_slot`` this reference charges."""
        if self.buckets is None:
            return self.counter_id
        return f"{self.counter_id}/{bucket_seconds(self.window)}s:{self.settle_field}"

    @property
    def charge_fields(self) -> tuple[str, ...]:
        """Every field a charge at this instant adds to: ``settled``, or a bucket and its block."""
        if self.buckets is None:
            return (SETTLED_FIELD,)
        return (self.settle_field, block_field(int(self.settle_field), block_buckets(self.window)))

    @property
    def settled_fields(self) -> tuple[str, ...]:
        """The fields to sum for the settled spend of the window at this instant."""
        if self.buckets is None:
            return (SETTLED_FIELD,)
        return tuple(rolling_sum_fields(self.buckets, block_buckets(self.window)))


_CALENDAR_CACHE_SIZE: Final = 4096
_calendar_cache: dict[WindowSpec, tuple[WindowBounds, str]] = {}


def calendar_window(spec: WindowSpec, at: datetime) -> tuple[WindowBounds, str]:
    """``window_bounds`` and ``window_key`` of a calendar window, remembered per spec.

    Time-zone arithmetic (bisecting DST transitions) costs tens of microseconds; every admission
    needs it per scope, and nearly all of them fall in the window the previous one did.
    """
    at = _aware(at)
    hit = _calendar_cache.get(spec)
    if hit is not None and hit[0].start <= at < hit[0].end:
        return hit
    found = (window_bounds(spec, at), window_key(spec, at))
    if len(_calendar_cache) >= _CALENDAR_CACHE_SIZE:
        _calendar_cache.clear()
    _calendar_cache[spec] = found
    return found


def counter_ref(policy_id: uuid.UUID, spec: WindowSpec, at: datetime) -> CounterRef:
    """The counter and field of ``spec``'s window at ``at`` for ``policy_id``."""
    if spec.is_rolling:
        buckets = rolling_buckets(spec, at)
        last = buckets[-1]
        length = nominal_length(spec.window)
        needed = _EPOCH + timedelta(seconds=(last + 1) * bucket_seconds(spec.window)) + length
        bounds = WindowBounds(at - length, at, includes_end=True)
        return CounterRef(
            policy_id, spec.window, f"{spec.window}{_ROLLING_MARK}", str(last), buckets, needed, bounds
        )
    bounds, key = calendar_window(spec, at)
    return CounterRef(policy_id, spec.window, key, SETTLED_FIELD, None, bounds.end, bounds)


def spend_slot(spec: WindowSpec, at: datetime) -> str:
    """One string naming the counter and field that spend at ``at`` is charged to (see the module doc)."""
    return counter_ref(uuid.UUID(int=0), spec, at).slot


@dataclass(frozen=True, slots=True)
class SlotRef:
    counter_id: str
    #: ``settled``, or the rolling bucket's index.
    field: str
    needed_until: datetime
    #: Rolling windows: buckets per block (the block's field sums the bucket with its neighbours).
    per_block: int | None = None


def parse_slot(slot: str) -> SlotRef:
    """Read a ``spend_slot`` back: its counter, field and the last instant anything reads it."""
    window_text, at_sign, rest = slot.partition("@")
    try:
        window = TimeWindow(window_text)
        if not at_sign:
            raise ValueError(slot)
        if rest.startswith("rolling/"):
            size, colon, index_text = rest.removeprefix("rolling/").partition(":")
            index = int(index_text)
            if not colon or size != f"{bucket_seconds(window)}s":
                raise ValueError(slot)
            needed = bucket_span(window, index).end + nominal_length(window)
            return SlotRef(f"{window}{_ROLLING_MARK}", str(index), needed, block_buckets(window))
        zone, colon, start_text = rest.partition(":")
        if not colon:
            raise ValueError(slot)
        spec = WindowSpec(window, WindowType.CALENDAR, zone)
        start = datetime.fromisoformat(start_text)
        if window_key(spec, start) != slot:
            raise ValueError(slot)
        return SlotRef(slot, SETTLED_FIELD, window_bounds(spec, start).end)
    except (ValueError, ValidationError):
        raise ValidationError(
            f"{slot!r} is not a budget counter slot: expected a calendar window key such as "
            "'daily@UTC:2024-05-01T00:00:00+00:00' or a rolling bucket such as 'daily@rolling/3600s:475000'"
        ) from None


def counter_keep_until(needed_until: datetime, now: datetime, hold_ttl: timedelta = timedelta(0)) -> datetime:
    """When a counter may be dropped: after its last reader, its holds' settlement and a grace."""
    return max(_aware(needed_until), _aware(now)) + max(hold_ttl, timedelta(0)) + COUNTER_GRACE


# -- admission planning -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScopeCheck:
    """One scope of an admission: its counter at the request's instant and its limit in units."""

    ref: CounterRef
    limit: int
    #: The scope's position in the request (to report which one denied).
    index: int


def plan_checks(
    amount: Money, scopes: Iterable[tuple[uuid.UUID, Money, WindowSpec]], at: datetime
) -> tuple[int, list[ScopeCheck]]:
    """Validate an admission and turn its scopes ``(policy_id, limit, window)`` into counter checks.

    Raises ``CurrencyMismatchError`` when a scope's limit is in another currency than the amount,
    ``ValidationError`` for a negative amount and ``AmountOutOfRangeError`` beyond the exact range.
    Scopes landing on the same counter are checked once, against the smaller limit if they differ.
    """
    units = to_units(amount)
    if units < 0:
        raise ValidationError(f"cannot hold a negative amount ({amount.format(exact=True)})")
    checks: dict[tuple[uuid.UUID, str], ScopeCheck] = {}
    for index, (policy_id, limit, spec) in enumerate(scopes):
        if limit.currency != amount.currency:
            raise CurrencyMismatchError(
                f"policy {policy_id} budgets in {limit.currency}; cannot weigh an amount in {amount.currency}"
            )
        ref = counter_ref(policy_id, spec, at)
        check = ScopeCheck(ref, to_units(limit), index)
        known = checks.get((policy_id, ref.counter_id))
        if known is None or check.limit < known.limit:
            checks[(policy_id, ref.counter_id)] = (
                check if known is None else replace(known, limit=check.limit)
            )
    return units, list(checks.values())


def first_denied(used_and_limits: Iterable[tuple[int, int]], amount: int) -> int | None:
    """The position of the first ``(used, limit)`` that cannot take ``amount`` more, or None."""
    for position, (used, limit) in enumerate(used_and_limits):
        if used + amount > limit:
            return position
    return None


# -- the state machine ------------------------------------------------------------------------------


class HoldState(StrEnum):
    HELD = "held"
    DENIED = "denied"
    EXPIRED = "expired"
    SETTLED = "settled"


@dataclass(frozen=True, slots=True)
class Usage:
    settled: int
    held: int
    holds: int

    @property
    def used(self) -> int:
        return self.settled + self.held


@dataclass(frozen=True, slots=True)
class AdmitOutcome:
    admitted: bool
    amount: int
    currency: str
    #: The position (in the request's scopes) of the first scope that could not take the amount.
    denied_index: int | None = None
    denied_policy: uuid.UUID | None = None
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class SettleOutcome:
    charged: int
    currency: str
    correction: int | None = None
    replayed: bool = False


@dataclass(slots=True)
class HoldRecord:
    """What is known about one request id."""

    request_id: uuid.UUID
    agent_id: uuid.UUID
    currency: str
    amount: int
    at: datetime
    expires_at: datetime
    state: HoldState
    #: The counters the hold sits on, each with the fields a charge adds to.
    refs: tuple[tuple[tuple[uuid.UUID, str], tuple[str, ...]], ...] = ()
    policy_ids: tuple[uuid.UUID, ...] = ()
    denied_index: int | None = None
    denied_policy: uuid.UUID | None = None
    actual: int | None = None
    settled_from: HoldState | None = None
    forget_at: datetime | None = None


@dataclass(slots=True)
class _Counter:
    held: int = 0
    holds: int = 0
    settled: dict[str, int] = field(default_factory=dict)
    keep_until: datetime = _EPOCH


class BudgetBook:
    """Budget counters and holds in memory: admission, settlement and expiry as pure steps.

    Callers serialise access (the in-process backend holds an ``asyncio.Lock``). ``now`` arguments
    only decide when remembered decisions and old counters are forgotten.
    """

    def __init__(self, *, decision_ttl: timedelta = DEFAULT_DECISION_TTL) -> None:
        if decision_ttl <= timedelta(0):
            raise ValidationError("the decision time to live must be positive")
        self.decision_ttl = decision_ttl
        self._counters: dict[tuple[uuid.UUID, str], _Counter] = {}
        self._records: dict[uuid.UUID, HoldRecord] = {}
        self._expiries: list[tuple[datetime, uuid.UUID]] = []  # a heap; stale entries are skipped
        self._in_flight = 0
        self._next_forget = _EPOCH

    # -- reading ------------------------------------------------------------------------------------

    def usage(self, ref: CounterRef) -> Usage:
        counter = self._counters.get((ref.policy_id, ref.counter_id))
        if counter is None:
            return Usage(0, 0, 0)
        if ref.buckets is None:
            settled = counter.settled.get(SETTLED_FIELD, 0)
        else:
            settled = sum(counter.settled.get(name, 0) for name in ref.settled_fields)
        return Usage(settled, counter.held, counter.holds)

    def record(self, request_id: uuid.UUID) -> HoldRecord | None:
        found = self._records.get(request_id)
        return replace(found) if found is not None else None

    @property
    def holds_in_flight(self) -> int:
        return self._in_flight

    # -- steps --------------------------------------------------------------------------------------

    def admit(
        self,
        *,
        request_id: uuid.UUID,
        agent_id: uuid.UUID,
        currency: str,
        amount: int,
        at: datetime,
        hold_ttl: timedelta,
        checks: Sequence[ScopeCheck],
        now: datetime,
    ) -> AdmitOutcome:
        """Hold ``amount`` on every checked counter if each can take it, else on none."""
        self.forget(now)
        known = self._records.get(request_id)
        if known is not None:
            return AdmitOutcome(
                admitted=known.state is not HoldState.DENIED,
                amount=known.amount,
                currency=known.currency,
                denied_index=known.denied_index,
                denied_policy=known.denied_policy,
                replayed=True,
            )
        if amount < 0 or amount > MAX_SAFE_UNITS:
            raise AmountOutOfRangeError(f"hold of {amount} units is outside 0..{MAX_SAFE_UNITS}")
        if hold_ttl <= timedelta(0):
            raise ValidationError("a hold needs a positive time to live")
        at = _aware(at)
        denied = first_denied(((self.usage(check.ref).used, check.limit) for check in checks), amount)
        if denied is not None:
            check = checks[denied]
            self._records[request_id] = HoldRecord(
                request_id,
                agent_id,
                currency,
                amount,
                at,
                at,
                HoldState.DENIED,
                policy_ids=tuple(c.ref.policy_id for c in checks),
                denied_index=check.index,
                denied_policy=check.ref.policy_id,
                forget_at=_aware(now) + self.decision_ttl,
            )
            return AdmitOutcome(False, amount, currency, check.index, check.ref.policy_id)
        expires = at + hold_ttl
        for check in checks:
            ref = check.ref
            counter = self._counters.setdefault((ref.policy_id, ref.counter_id), _Counter())
            counter.held += amount
            counter.holds += 1
            counter.keep_until = max(counter.keep_until, counter_keep_until(ref.needed_until, now, hold_ttl))
            if ref.buckets is not None:
                below, threshold = rolling_prune_rule(ref.buckets)
                if len(counter.settled) > threshold:
                    per_block = block_buckets(ref.window)
                    counter.settled = {
                        k: v for k, v in counter.settled.items() if not prunable(k, below, per_block)
                    }
        self._records[request_id] = HoldRecord(
            request_id,
            agent_id,
            currency,
            amount,
            at,
            expires,
            HoldState.HELD,
            refs=tuple(((c.ref.policy_id, c.ref.counter_id), c.ref.charge_fields) for c in checks),
            policy_ids=tuple(c.ref.policy_id for c in checks),
        )
        heapq.heappush(self._expiries, (expires, request_id))
        self._in_flight += 1
        return AdmitOutcome(True, amount, currency)

    def settle(self, request_id: uuid.UUID, currency: str, actual: int, now: datetime) -> SettleOutcome:
        """Replace the hold by ``actual``; after an expiry, correct the charge by ``actual - reserved``."""
        record = self._records.get(request_id)
        if record is None:
            raise NotFoundError(f"no hold for request {request_id} (never admitted, or forgotten)")
        if record.state is HoldState.DENIED:
            raise ConflictError(f"request {request_id} was denied: there is nothing to settle")
        if check_currency(currency) != record.currency:
            raise CurrencyMismatchError(
                f"request {request_id} was held in {record.currency}; cannot settle it in {currency}"
            )
        if record.state is HoldState.SETTLED:
            assert record.actual is not None
            correction = record.actual - record.amount if record.settled_from is HoldState.EXPIRED else None
            return SettleOutcome(record.actual, record.currency, correction, replayed=True)
        if actual < 0 or actual > MAX_SAFE_UNITS:
            raise AmountOutOfRangeError(f"settlement of {actual} units is outside 0..{MAX_SAFE_UNITS}")
        correction = None
        charge = actual if record.state is HoldState.HELD else actual - record.amount
        for key, fields in record.refs:
            counter = self._counter_for(key, now)
            if record.state is HoldState.HELD:
                counter.held -= record.amount
                counter.holds -= 1
            for name in fields:
                counter.settled[name] = counter.settled.get(name, 0) + charge
        if record.state is HoldState.HELD:
            self._in_flight -= 1
        else:
            correction = actual - record.amount
        record.settled_from = record.state
        record.state = HoldState.SETTLED
        record.actual = actual
        record.forget_at = _aware(now) + self.decision_ttl
        return SettleOutcome(actual, record.currency, correction)

    def expire_due(self, now: datetime, limit: int = 1000) -> list[HoldRecord]:
        """Charge every hold whose expiry is at or before ``now`` at its reserved amount."""
        now = _aware(now)
        expired: list[HoldRecord] = []
        while self._expiries and len(expired) < limit and self._expiries[0][0] <= now:
            _, request_id = heapq.heappop(self._expiries)
            record = self._records.get(request_id)
            if record is None or record.state is not HoldState.HELD:
                continue
            for key, fields in record.refs:
                counter = self._counter_for(key, now)
                counter.held -= record.amount
                counter.holds -= 1
                for name in fields:
                    counter.settled[name] = counter.settled.get(name, 0) + record.amount
            record.state = HoldState.EXPIRED
            record.forget_at = now + self.decision_ttl
            self._in_flight -= 1
            expired.append(replace(record))
        return expired

    def load(self, policy_id: uuid.UUID, slot: str, units: int, now: datetime) -> None:
        """Set the settled spend of one slot (from ledger totals), replacing what was counted there."""
        if abs(units) > MAX_SAFE_UNITS:
            raise AmountOutOfRangeError(f"{units} units is beyond the counters' exact range")
        where = parse_slot(slot)
        counter = self._counters.setdefault((policy_id, where.counter_id), _Counter())
        counter.settled[where.field] = units
        if where.per_block is not None:  # its block is the sum of its buckets
            block = int(where.field) // where.per_block
            buckets = range(block * where.per_block, (block + 1) * where.per_block)
            counter.settled[f"c{block}"] = sum(counter.settled.get(str(index), 0) for index in buckets)
        counter.keep_until = max(counter.keep_until, counter_keep_until(where.needed_until, now))

    def _counter_for(self, key: tuple[uuid.UUID, str], now: datetime) -> _Counter:
        counter = self._counters.get(key)
        if counter is None:  # dropped already: recreate it so the charge is not lost
            counter = self._counters[key] = _Counter(keep_until=_aware(now) + COUNTER_GRACE)
        return counter

    def forget(self, now: datetime) -> None:
        """Drop decisions past their time to live and counters nothing reads any more (once a minute)."""
        now = _aware(now)
        if now < self._next_forget:
            return
        self._next_forget = now + timedelta(minutes=1)
        for request_id in [
            rid for rid, rec in self._records.items() if rec.forget_at is not None and rec.forget_at <= now
        ]:
            del self._records[request_id]
        for key in [k for k, c in self._counters.items() if c.keep_until <= now and c.holds == 0]:
            del self._counters[key]
