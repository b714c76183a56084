from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caracald.core.errors import ValidationError
from caracald.core.windows import (
    TimeWindow,
    WindowBounds,
    WindowSpec,
    WindowType,
    next_window_start,
    nominal_length,
    window_bounds,
    window_key,
)

ZONES = [
    "UTC",
    "America/New_York",
    "Europe/London",
    "Europe/Paris",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "America/Sao_Paulo",
    "Pacific/Apia",
    "America/Havana",
    "Asia/Beirut",
]

MICRO = timedelta(microseconds=1)
H = timedelta(hours=1)

DURATIONS = {
    TimeWindow.HOURLY: (timedelta(minutes=30), H),
    TimeWindow.DAILY: (timedelta(hours=22), timedelta(hours=26)),
    # Samoa skipped 2011-12-30, so one of its weeks had six days
    TimeWindow.WEEKLY: (timedelta(days=6), timedelta(days=7, hours=2)),
    TimeWindow.MONTHLY: (timedelta(days=28) - 2 * H, timedelta(days=31) + 2 * H),
}


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def local(
    zone: str,
    year: int,
    month: int,
    day: int,
    hour: int = 0,
    minute: int = 0,
    second: int = 0,
    *,
    fold: int = 0,
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=ZoneInfo(zone), fold=fold)


def cal(window: str, zone: str = "UTC") -> WindowSpec:
    return WindowSpec(TimeWindow(window), WindowType.CALENDAR, zone)


def rolling(window: str, zone: str = "UTC") -> WindowSpec:
    return WindowSpec(TimeWindow(window), WindowType.ROLLING, zone)


def offset_at(zone: str, instant: datetime) -> timedelta | None:
    return instant.astimezone(ZoneInfo(zone)).utcoffset()


@cache
def transitions(zone: str) -> tuple[datetime, ...]:
    """The instants in 1990-2040 at which the zone's UTC offset changes (found by scanning)."""
    tz = ZoneInfo(zone)
    found = []
    t = utc(1990, 1, 1)
    off = t.astimezone(tz).utcoffset()
    while t < utc(2041, 1, 1):
        nxt = t + timedelta(days=1)
        new = nxt.astimezone(tz).utcoffset()
        if new != off:
            lo, hi = t, nxt
            while hi - lo > timedelta(seconds=1):
                mid = lo + (hi - lo) / 2
                lo, hi = (lo, mid) if mid.astimezone(tz).utcoffset() != off else (mid, hi)
            found.append(hi.replace(microsecond=0))
            off = new
        t = nxt
    return tuple(found)


zones = st.sampled_from(ZONES)
calendar_windows = st.sampled_from(list(TimeWindow))
anywhen = st.datetimes(
    min_value=datetime(1990, 1, 1), max_value=datetime(2040, 12, 31), timezones=st.just(UTC)
)


@st.composite
def near_transition(draw: st.DrawFn) -> tuple[str, datetime]:
    """A zone and an instant within a few days of one of its clock changes (or anywhere if none)."""
    zone = draw(zones)
    changes = transitions(zone)
    if not changes:
        return zone, draw(anywhen)
    base = draw(st.sampled_from(changes))
    delta = draw(st.integers(min_value=-3 * 86_400_000_000, max_value=3 * 86_400_000_000))
    return zone, base + timedelta(microseconds=delta)


cases = st.one_of(st.tuples(zones, anywhen), near_transition())


def test_the_zone_list_has_clock_changes_to_test() -> None:
    assert transitions("UTC") == ()
    assert len(transitions("America/New_York")) == 2 * 51
    assert len(transitions("Asia/Kolkata")) == 0


# -- properties ---------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(case=cases, window=calendar_windows)
def test_calendar_windows_tile_time(case: tuple[str, datetime], window: TimeWindow) -> None:
    zone, at = case
    spec = cal(window, zone)
    bounds = window_bounds(spec, at)
    assert bounds.contains(at)
    assert bounds.start.tzinfo is UTC
    assert bounds.end.tzinfo is UTC
    # the next window starts exactly where this one ends, and the previous one ends where it starts
    following = window_bounds(spec, bounds.end)
    assert following.start == bounds.end
    assert window_bounds(spec, bounds.end - MICRO) == bounds
    assert window_bounds(spec, bounds.start) == bounds
    assert window_bounds(spec, bounds.start - MICRO).end == bounds.start
    assert next_window_start(spec, at) == bounds.end
    assert window_key(spec, bounds.start) == window_key(spec, at)
    assert window_key(spec, bounds.end) != window_key(spec, at)


@settings(max_examples=400, deadline=None)
@given(case=cases, window=calendar_windows)
def test_calendar_windows_start_on_local_boundaries(case: tuple[str, datetime], window: TimeWindow) -> None:
    zone, at = case
    tz = ZoneInfo(zone)
    bounds = window_bounds(cal(window, zone), at)
    start = bounds.start.astimezone(tz)
    before = (bounds.start - MICRO).astimezone(tz)
    clock_changed = before.utcoffset() != start.utcoffset()
    low, high = DURATIONS[window]
    assert low <= bounds.duration <= high
    if window is TimeWindow.HOURLY:
        assert (start.minute, start.second, start.microsecond) == (0, 0, 0) or clock_changed
        return
    # a day, week or month starts at local midnight, or when midnight was skipped, at the change
    assert start.date() != before.date()
    assert start.time() == datetime.min.time() or clock_changed
    if window is TimeWindow.WEEKLY:
        assert start.weekday() == 0
    if window is TimeWindow.MONTHLY:
        assert start.day == 1


@settings(max_examples=200, deadline=None)
@given(case=cases, window=calendar_windows, fraction=st.floats(min_value=0, max_value=1, exclude_max=True))
def test_every_instant_of_a_window_maps_to_it(
    case: tuple[str, datetime], window: TimeWindow, fraction: float
) -> None:
    zone, at = case
    spec = cal(window, zone)
    bounds = window_bounds(spec, at)
    inside = bounds.start + bounds.duration * fraction
    if inside >= bounds.end:  # float rounding
        inside = bounds.end - MICRO
    assert window_bounds(spec, inside) == bounds


@settings(max_examples=200, deadline=None)
@given(at=anywhen, zone=st.sampled_from(["UTC", "Asia/Kolkata", "Asia/Kathmandu"]))
def test_fixed_offset_zones_match_plain_arithmetic(at: datetime, zone: str) -> None:
    tz = ZoneInfo(zone)
    wall = at.astimezone(tz)
    hour = wall.replace(minute=0, second=0, microsecond=0)
    day = wall.replace(hour=0, minute=0, second=0, microsecond=0)
    monday = day - timedelta(days=day.weekday())
    first = day.replace(day=1)
    assert window_bounds(cal("hourly", zone), at) == WindowBounds(hour, hour + H)
    assert window_bounds(cal("daily", zone), at) == WindowBounds(day, day + timedelta(days=1))
    assert window_bounds(cal("weekly", zone), at) == WindowBounds(monday, monday + timedelta(days=7))
    next_month = (first + timedelta(days=32)).replace(day=1)
    assert window_bounds(cal("monthly", zone), at) == WindowBounds(first, next_month)


@settings(max_examples=200, deadline=None)
@given(at=anywhen, zone=zones, window=calendar_windows)
def test_rolling_windows_end_at_the_time_and_have_the_nominal_length(
    at: datetime, zone: str, window: TimeWindow
) -> None:
    spec = WindowSpec(window, WindowType.ROLLING, zone)
    bounds = window_bounds(spec, at)
    assert bounds.end == at
    assert bounds.duration == nominal_length(window)
    assert bounds.contains(at)
    assert not bounds.contains(bounds.start)
    assert bounds.contains(bounds.start + MICRO)
    assert not bounds.contains(at + MICRO)
    assert window_key(spec, at) == f"{window}@rolling"


# -- daylight saving time -------------------------------------------------------------------------


def test_us_spring_forward_day_is_23_hours() -> None:
    bounds = window_bounds(cal("daily", "America/New_York"), local("America/New_York", 2024, 3, 10, 12))
    assert bounds.start == utc(2024, 3, 10, 5)
    assert bounds.end == utc(2024, 3, 11, 4)
    assert bounds.duration == timedelta(hours=23)


def test_us_fall_back_day_is_25_hours() -> None:
    bounds = window_bounds(cal("daily", "America/New_York"), local("America/New_York", 2024, 11, 3, 12))
    assert bounds.start == utc(2024, 11, 3, 4)
    assert bounds.end == utc(2024, 11, 4, 5)
    assert bounds.duration == timedelta(hours=25)


def test_the_repeated_hour_is_two_hourly_windows() -> None:
    spec = cal("hourly", "America/New_York")
    first = window_bounds(spec, local("America/New_York", 2024, 11, 3, 1, 30, fold=0))
    second = window_bounds(spec, local("America/New_York", 2024, 11, 3, 1, 30, fold=1))
    assert first == WindowBounds(utc(2024, 11, 3, 5), utc(2024, 11, 3, 6))
    assert second == WindowBounds(utc(2024, 11, 3, 6), utc(2024, 11, 3, 7))
    assert window_key(spec, first.start) == "hourly@America/New_York:2024-11-03T01:00:00-04:00"
    assert window_key(spec, second.start) == "hourly@America/New_York:2024-11-03T01:00:00-05:00"


def test_the_skipped_hour_has_no_window() -> None:
    spec = cal("hourly", "America/New_York")
    before = window_bounds(spec, utc(2024, 3, 10, 6, 59))  # 01:59 EST
    after = window_bounds(spec, utc(2024, 3, 10, 7))  # 03:00 EDT
    assert before.end == after.start == utc(2024, 3, 10, 7)
    assert after.start.astimezone(ZoneInfo("America/New_York")).hour == 3


def test_paris_key_and_short_day() -> None:
    spec = cal("daily", "Europe/Paris")
    at = local("Europe/Paris", 2024, 3, 31, 15)
    assert window_key(spec, at) == "daily@Europe/Paris:2024-03-31T00:00:00+01:00"
    assert window_bounds(spec, at).duration == timedelta(hours=23)


def test_sao_paulo_day_without_midnight_starts_at_one() -> None:
    # 2018-11-04 00:00 did not exist in Sao Paulo: clocks went from 23:59:59 to 01:00
    tz = ZoneInfo("America/Sao_Paulo")
    spec = cal("daily", "America/Sao_Paulo")
    bounds = window_bounds(spec, local("America/Sao_Paulo", 2018, 11, 4, 12))
    start = bounds.start.astimezone(tz)
    assert start.replace(tzinfo=None) == datetime(2018, 11, 4, 1)
    assert bounds.start == utc(2018, 11, 4, 3)
    assert bounds.duration == timedelta(hours=23)
    assert window_bounds(spec, bounds.start - MICRO).end == bounds.start
    assert window_key(spec, bounds.start) == "daily@America/Sao_Paulo:2018-11-04T01:00:00-02:00"


def test_sao_paulo_fall_back_at_midnight_makes_a_25_hour_day() -> None:
    # 2019-02-17 00:00 -02 became 2019-02-16 23:00 -03
    bounds = window_bounds(cal("daily", "America/Sao_Paulo"), utc(2019, 2, 17, 2, 30))
    assert bounds == WindowBounds(utc(2019, 2, 16, 2), utc(2019, 2, 17, 3))


@pytest.mark.parametrize(
    ("zone", "day", "first_hour"),
    [("Asia/Beirut", date(2024, 3, 31), 1), ("America/Havana", date(2024, 3, 10), 1)],
)
def test_other_zones_that_skip_midnight(zone: str, day: date, first_hour: int) -> None:
    tz = ZoneInfo(zone)
    bounds = window_bounds(cal("daily", zone), datetime.combine(day, datetime.min.time(), tz) + 12 * H)
    start = bounds.start.astimezone(tz)
    assert (start.date(), start.hour, start.minute) == (day, first_hour, 0)
    assert bounds.duration == timedelta(hours=23)


def test_havana_repeats_midnight_and_the_day_still_starts_at_the_first_one() -> None:
    tz = ZoneInfo("America/Havana")
    bounds = window_bounds(cal("daily", "America/Havana"), local("America/Havana", 2024, 11, 3, 12))
    # (an aware time inside a repeated hour never equals one in another zone: compare in UTC)
    assert bounds.start == local("America/Havana", 2024, 11, 3, 0, fold=0).astimezone(UTC)
    assert bounds.start.astimezone(tz).utcoffset() == timedelta(hours=-4)
    assert bounds.duration == timedelta(hours=25)
    hourly = cal("hourly", "America/Havana")
    first = window_bounds(hourly, local("America/Havana", 2024, 11, 3, 0, 30, fold=0))
    second = window_bounds(hourly, local("America/Havana", 2024, 11, 3, 0, 30, fold=1))
    assert first.end == second.start
    assert first.duration == second.duration == H


def test_lord_howe_half_hour_shifts() -> None:
    zone = "Australia/Lord_Howe"
    hourly, daily = cal("hourly", zone), cal("daily", zone)
    # spring: 02:00 +10:30 became 02:30 +11:00
    gap = window_bounds(hourly, local(zone, 2024, 10, 6, 2, 45))
    assert gap.start.astimezone(ZoneInfo(zone)).replace(tzinfo=None) == datetime(2024, 10, 6, 2, 30)
    assert gap.duration == timedelta(minutes=30)
    assert window_bounds(hourly, gap.start - MICRO).duration == H
    assert window_bounds(daily, local(zone, 2024, 10, 6, 12)).duration == timedelta(hours=23, minutes=30)
    # autumn: 02:00 +11:00 became 01:30 +10:30; the repeated half hour is a window of its own
    first = window_bounds(hourly, local(zone, 2024, 4, 7, 1, 45, fold=0))
    again = window_bounds(hourly, local(zone, 2024, 4, 7, 1, 45, fold=1))
    assert first.duration == H
    assert again.start == first.end
    assert again.duration == timedelta(minutes=30)
    assert window_bounds(daily, local(zone, 2024, 4, 7, 12)).duration == timedelta(hours=24, minutes=30)


@pytest.mark.parametrize(("zone", "minute"), [("Asia/Kolkata", 30), ("Asia/Kathmandu", 15)])
def test_hours_in_zones_with_odd_offsets(zone: str, minute: int) -> None:
    bounds = window_bounds(cal("hourly", zone), utc(2024, 5, 1, 12, 50))
    assert bounds.start.minute == minute
    assert bounds.start.astimezone(ZoneInfo(zone)).minute == 0
    assert bounds.duration == H


def test_samoa_skipped_a_whole_day() -> None:
    zone = "Pacific/Apia"
    thursday = window_bounds(cal("daily", zone), local(zone, 2011, 12, 29, 12))
    saturday = window_bounds(cal("daily", zone), thursday.end)
    assert saturday.start.astimezone(ZoneInfo(zone)).date() == date(2011, 12, 31)
    assert thursday.duration == saturday.duration == timedelta(hours=24)
    assert window_bounds(cal("weekly", zone), thursday.end).duration == timedelta(days=6)


# -- calendar edges -----------------------------------------------------------------------------


def test_leap_day_is_in_a_29_day_february() -> None:
    for zone in ("UTC", "Europe/Paris"):
        bounds = window_bounds(cal("monthly", zone), local(zone, 2024, 2, 29, 12))
        assert bounds.start.astimezone(ZoneInfo(zone)).date() == date(2024, 2, 1)
        assert bounds.duration == timedelta(days=29)


def test_month_end_in_a_policy_zone() -> None:
    spec = cal("monthly", "Europe/Paris")
    january = window_bounds(spec, local("Europe/Paris", 2023, 1, 31, 23, 59, 59))
    february = window_bounds(spec, local("Europe/Paris", 2023, 2, 1))
    assert january.end == february.start == utc(2023, 1, 31, 23)
    assert (
        window_key(spec, local("Europe/Paris", 2023, 2, 1))
        == "monthly@Europe/Paris:2023-02-01T00:00:00+01:00"
    )
    # 23:30 UTC on January 31 is already February in Paris, but still January in UTC
    assert window_bounds(spec, utc(2023, 1, 31, 23, 30)) == february
    assert window_bounds(cal("monthly"), utc(2023, 1, 31, 23, 30)).end == utc(2023, 2, 1)


def test_december_rolls_into_the_next_year() -> None:
    bounds = window_bounds(cal("monthly"), utc(2023, 12, 31, 23, 59))
    assert bounds == WindowBounds(utc(2023, 12, 1), utc(2024, 1, 1))


def test_weekly_windows_start_monday_local() -> None:
    zone = "Pacific/Auckland"
    # Sunday 13:00 UTC is already Monday 01:00 in Auckland
    bounds = window_bounds(cal("weekly", zone), utc(2024, 6, 9, 13))
    start = bounds.start.astimezone(ZoneInfo(zone))
    assert (start.date(), start.hour) == (date(2024, 6, 10), 0)
    assert bounds.start == utc(2024, 6, 9, 12)
    # and in UTC the same instant is still in the week that began on Monday June 3
    assert window_bounds(cal("weekly"), utc(2024, 6, 9, 13)).start == utc(2024, 6, 3)


def test_iso_week_spans_a_new_year() -> None:
    bounds = window_bounds(cal("weekly"), utc(2025, 1, 1, 8))
    assert bounds == WindowBounds(utc(2024, 12, 30), utc(2025, 1, 6))


def test_the_end_is_exclusive() -> None:
    spec = cal("daily")
    assert window_bounds(spec, utc(2024, 1, 2) - MICRO).start == utc(2024, 1, 1)
    assert window_bounds(spec, utc(2024, 1, 2)).start == utc(2024, 1, 2)
    assert not window_bounds(spec, utc(2024, 1, 1)).contains(utc(2024, 1, 2))


def test_any_aware_time_is_accepted_and_bounds_are_utc() -> None:
    paris_one_am = local("Europe/Paris", 2024, 7, 1, 1)
    bounds = window_bounds(cal("daily"), paris_one_am)  # 2024-06-30T23:00Z
    assert bounds == WindowBounds(utc(2024, 6, 30), utc(2024, 7, 1))
    assert bounds.start.tzinfo is UTC


# -- keys, lengths, next start --------------------------------------------------------------------


def test_keys_are_per_window_and_zone() -> None:
    at = utc(2024, 3, 31, 12)
    assert window_key(cal("daily"), at) == "daily@UTC:2024-03-31T00:00:00+00:00"
    assert window_key(cal("hourly"), at) == "hourly@UTC:2024-03-31T12:00:00+00:00"
    assert window_key(cal("weekly"), at) == "weekly@UTC:2024-03-25T00:00:00+00:00"
    assert window_key(cal("monthly", "Asia/Kolkata"), at) == "monthly@Asia/Kolkata:2024-03-01T00:00:00+05:30"
    assert window_key(rolling("monthly"), at) == "monthly@rolling"


def test_nominal_lengths_order_the_windows() -> None:
    lengths = [
        nominal_length(w)
        for w in (TimeWindow.HOURLY, TimeWindow.DAILY, TimeWindow.WEEKLY, TimeWindow.MONTHLY)
    ]
    assert lengths == [H, timedelta(hours=24), timedelta(days=7), timedelta(days=30)]
    assert lengths == sorted(lengths)


def test_next_window_start() -> None:
    assert next_window_start(cal("daily", "Europe/Paris"), utc(2024, 3, 30, 23, 30)) == utc(2024, 3, 31, 22)
    with pytest.raises(ValidationError, match="rolling"):
        next_window_start(rolling("daily"), utc(2024, 1, 1))


# -- validation ---------------------------------------------------------------------------------


def test_spec_coerces_the_cli_words() -> None:
    spec = WindowSpec("Daily", " calendar ", "Europe/Paris")  # type: ignore[arg-type]
    assert spec.window is TimeWindow.DAILY
    assert spec.window_type is WindowType.CALENDAR
    assert spec.tz == ZoneInfo("Europe/Paris")
    assert spec == WindowSpec(TimeWindow.DAILY, WindowType.CALENDAR, "Europe/Paris")
    assert WindowSpec(TimeWindow.HOURLY, WindowType.ROLLING).timezone == "UTC"


def test_spec_rejects_unknown_words() -> None:
    with pytest.raises(
        ValidationError, match="unknown window 'fortnightly': use one of hourly, daily, weekly, monthly"
    ):
        WindowSpec("fortnightly", "calendar")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="unknown window type 'sliding': use one of calendar, rolling"):
        WindowSpec("daily", "sliding")  # type: ignore[arg-type]


@pytest.mark.parametrize("zone", ["Mars/Olympus", "America", "", "../etc/passwd", "/etc/localtime", "utc+2"])
def test_spec_rejects_unknown_zones(zone: str) -> None:
    with pytest.raises(ValidationError, match="unknown time zone") as info:
        WindowSpec("daily", "calendar", zone)  # type: ignore[arg-type]
    assert repr(zone) in str(info.value)
    assert "\n" not in str(info.value)


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValidationError, match="no time zone"):
        window_bounds(cal("daily"), datetime(2024, 1, 1))
    with pytest.raises(ValidationError, match="no time zone"):
        window_key(rolling("daily"), datetime(2024, 1, 1))
    with pytest.raises(ValidationError, match="no time zone"):
        WindowBounds(datetime(2024, 1, 1), utc(2024, 1, 2))


def test_bounds_must_be_ordered() -> None:
    with pytest.raises(ValidationError, match="not before"):
        WindowBounds(utc(2024, 1, 2), utc(2024, 1, 1))


def test_times_at_the_edge_of_the_calendar_are_refused_cleanly() -> None:
    with pytest.raises(ValidationError, match="outside the supported range"):
        window_bounds(cal("monthly", "Pacific/Kiritimati"), datetime.max.replace(tzinfo=UTC))
    with pytest.raises(ValidationError, match="outside the supported range"):
        window_bounds(rolling("monthly"), datetime.min.replace(tzinfo=UTC))
    with pytest.raises(ValidationError, match="outside the supported range"):
        window_bounds(cal("daily"), datetime.min.replace(tzinfo=ZoneInfo("Asia/Tokyo")))
