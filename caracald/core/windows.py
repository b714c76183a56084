"""Budget windows: which span of time a limit applies to.

A window is a pure function of a timestamp and a ``WindowSpec``, so no job ever has to "reset" a
budget: the counter for a new window simply starts empty.

*Calendar* windows follow the wall clock of the spec's time zone: the hour, day, ISO week (Monday
first) or month containing the timestamp. They tile time, without gap or overlap, even across DST
changes: a local day may last 23 or 25 hours, a day whose midnight is skipped starts at the first
instant that has its date, and the hour repeated when clocks go back is two distinct hourly windows.

*Rolling* windows have a nominal length and end at the timestamp itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Final, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from caracald.core.errors import ValidationError


class TimeWindow(StrEnum):
    HOURLY = "hourly"
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"


class WindowType(StrEnum):
    CALENDAR = "calendar"
    ROLLING = "rolling"


_NOMINAL_LENGTHS: Final[dict[TimeWindow, timedelta]] = {
    TimeWindow.HOURLY: timedelta(hours=1),
    TimeWindow.DAILY: timedelta(hours=24),
    TimeWindow.WEEKLY: timedelta(days=7),
    TimeWindow.MONTHLY: timedelta(days=30),
}

_ONE_MICROSECOND: Final = timedelta(microseconds=1)

_E = TypeVar("_E", bound=StrEnum)


def nominal_length(window: TimeWindow) -> timedelta:
    """The length of a rolling window, also used to rank sizes: hourly < daily < weekly < monthly.

    Hourly is 1 hour, daily 24 hours, weekly 7 days and monthly a flat 30 days.
    """
    return _NOMINAL_LENGTHS[_choice(TimeWindow, window, "window")]


def _choice(kind: type[_E], value: object, what: str) -> _E:
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        try:
            return kind(value.strip().lower())
        except ValueError:
            pass
    choices = ", ".join(member.value for member in kind)
    raise ValidationError(f"unknown {what} {value!r}: use one of {choices}")


def _zone(key: object) -> ZoneInfo:
    if not isinstance(key, str) or not key.strip():
        raise ValidationError(f"unknown time zone {key!r}: use an IANA name such as UTC or Europe/Paris")
    try:
        return ZoneInfo(key.strip())
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # OSError covers a key naming a directory of the database, such as "America"
        raise ValidationError(
            f"unknown time zone {key!r}: use an IANA name such as UTC or Europe/Paris"
        ) from None


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """How a limit's window is measured. Strings (the CLI's words) are accepted for the enums."""

    window: TimeWindow
    window_type: WindowType
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", _choice(TimeWindow, self.window, "window"))
        object.__setattr__(self, "window_type", _choice(WindowType, self.window_type, "window type"))
        _zone(self.timezone)
        object.__setattr__(self, "timezone", self.timezone.strip())

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def is_rolling(self) -> bool:
        return self.window_type is WindowType.ROLLING

    def __str__(self) -> str:
        if self.is_rolling:
            return f"rolling {self.window}"
        return f"calendar {self.window} ({self.timezone})"


def _require_aware(ts: datetime, what: str) -> datetime:
    if not isinstance(ts, datetime):
        raise ValidationError(f"{what} must be a datetime, got {type(ts).__name__}")
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValidationError(f"{what} {ts.isoformat()} has no time zone: give it in UTC")
    try:
        return ts.astimezone(UTC)
    except OverflowError:
        raise ValidationError(f"{what} {ts.isoformat()} is outside the supported range") from None


@dataclass(frozen=True, slots=True)
class WindowBounds:
    """A span of time in UTC, half-open ``[start, end)``.

    A rolling window instead includes its end and excludes its start, ``(start, end]``; it is built
    with ``includes_end=True`` and ``contains`` honours that.
    """

    start: datetime
    end: datetime
    includes_end: bool = False

    def __post_init__(self) -> None:
        start = _require_aware(self.start, "window start")
        end = _require_aware(self.end, "window end")
        if start >= end:
            raise ValidationError(f"window start {start.isoformat()} is not before its end {end.isoformat()}")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)

    @property
    def duration(self) -> timedelta:
        return self.end - self.start

    def contains(self, ts: datetime) -> bool:
        instant = _require_aware(ts, "time")
        if self.includes_end:
            return self.start < instant <= self.end
        return self.start <= instant < self.end


# -- calendar arithmetic ----------------------------------------------------------------------------


def _offset(tz: ZoneInfo, instant: datetime) -> timedelta:
    offset = instant.astimezone(tz).utcoffset()
    assert offset is not None  # a ZoneInfo always knows its offset
    return offset


def _wall(tz: ZoneInfo, instant: datetime) -> datetime:
    """The naive local wall-clock reading of a UTC instant."""
    return instant.astimezone(tz).replace(tzinfo=None)


def _first_true(lo: datetime, hi: datetime, pred: Callable[[datetime], bool]) -> datetime:
    """The earliest instant in ``(lo, hi]`` where ``pred`` holds, given it fails at lo and holds at hi.

    zoneinfo does not expose its transitions, so they are found by bisection to the microsecond.
    """
    while hi - lo > _ONE_MICROSECOND:
        mid = lo + (hi - lo) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _first_instant_from(tz: ZoneInfo, wall: datetime) -> datetime:
    """The first UTC instant whose local wall clock reads ``wall`` or later.

    Normally that is ``wall`` itself (its first occurrence if the clocks went back over it). When
    ``wall`` was skipped by a clock change, it is the instant of the change.
    """
    earlier = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if _wall(tz, earlier) == wall:
        return earlier
    # In a gap, fold=0 reads the time with the old offset (after the change) and fold=1 with the
    # new one (before it), so the change lies between them.
    other = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    lo, hi = min(earlier, other), max(earlier, other)
    if _wall(tz, lo) >= wall or _wall(tz, hi) < wall:
        # Not one simple gap: no zone in the tz database does this at a midnight. Stay deterministic.
        return lo
    return _first_true(lo, hi, lambda instant: _wall(tz, instant) >= wall)


def _hour_bounds(tz: ZoneInfo, at: datetime) -> tuple[datetime, datetime]:
    """The local clock hour containing ``at``; a change of UTC offset also starts a new hour.

    This keeps the two passes through a repeated hour apart and lets half-hour DST shifts (as on
    Lord Howe Island) and 30 or 45 minute offsets still tile time.
    """
    offset = _offset(tz, at)
    local = at + offset
    into_hour = timedelta(minutes=local.minute, seconds=local.second, microseconds=local.microsecond)
    start = at - into_hour
    end = start + timedelta(hours=1)
    if _offset(tz, start) != offset:
        start = _first_true(start, at, lambda instant: _offset(tz, instant) == offset)
    if _offset(tz, end) != offset:
        end = _first_true(at, end, lambda instant: _offset(tz, instant) != offset)
    return start, end


def _add_months(day: date, months: int) -> date:
    index = day.year * 12 + day.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def _period_bounds(
    tz: ZoneInfo, at: datetime, first: date, step: Callable[[date, int], date]
) -> tuple[datetime, datetime]:
    """The period (day, week or month) beginning on a local date that contains ``at``.

    ``first`` is the period the local date of ``at`` falls in; ``step`` moves between periods. The
    loops only matter where clocks jumped across a period boundary and the local date misleads.
    """

    def boundary(day: date) -> datetime:
        return _first_instant_from(tz, datetime.combine(day, time()))

    start, end = boundary(first), boundary(step(first, 1))
    while end <= at:
        first = step(first, 1)
        start, end = end, boundary(step(first, 1))
    while start > at:
        first = step(first, -1)
        start, end = boundary(first), start
    return start, end


def _calendar_bounds(spec: WindowSpec, at: datetime) -> tuple[datetime, datetime]:
    tz = spec.tz
    if spec.window is TimeWindow.HOURLY:
        return _hour_bounds(tz, at)
    local_day = _wall(tz, at).date()
    if spec.window is TimeWindow.DAILY:
        return _period_bounds(tz, at, local_day, lambda day, n: day + timedelta(days=n))
    if spec.window is TimeWindow.WEEKLY:
        monday = local_day - timedelta(days=local_day.weekday())
        return _period_bounds(tz, at, monday, lambda day, n: day + timedelta(weeks=n))
    return _period_bounds(tz, at, local_day.replace(day=1), _add_months)


# -- public API -------------------------------------------------------------------------------------


def window_bounds(spec: WindowSpec, at: datetime) -> WindowBounds:
    """The window of ``spec`` that ``at`` falls in.

    Calendar windows are half-open ``[start, end)``. A rolling window is ``(at - length, at]``: it
    includes ``at`` itself, so it is returned with ``end == at`` and ``includes_end=True``.
    """
    instant = _require_aware(at, "time")
    try:
        if spec.is_rolling:
            return WindowBounds(instant - nominal_length(spec.window), instant, includes_end=True)
        start, end = _calendar_bounds(spec, instant)
    except (OverflowError, ValueError):
        # dates outside datetime's years 1-9999 once the window or time zone is applied
        raise ValidationError(f"time {instant.isoformat()} is outside the supported range") from None
    return WindowBounds(start, end)


def window_key(spec: WindowSpec, at: datetime) -> str:
    """A stable identifier of the window containing ``at``, for keying counters.

    Calendar windows: ``<window>@<zone>:<start>`` with the start in local time and its UTC offset,
    e.g. ``daily@Europe/Paris:2024-03-31T00:00:00+01:00``. The offset keeps the two passes through
    a repeated hour apart. Rolling windows have no fixed identity, so their key is
    ``<window>@rolling`` whatever ``at`` is.
    """
    if spec.is_rolling:
        _require_aware(at, "time")
        return f"{spec.window}@rolling"
    start = window_bounds(spec, at).start
    return f"{spec.window}@{spec.timezone}:{start.astimezone(spec.tz).isoformat()}"


def next_window_start(spec: WindowSpec, at: datetime) -> datetime:
    """When the calendar window after the one containing ``at`` begins (the current one's end)."""
    if spec.is_rolling:
        raise ValidationError(f"a rolling {spec.window} window has no next start: it slides with time")
    return window_bounds(spec, at).end
