from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from caracald.core.errors import ValidationError
from caracald.core.timeparse import format_timestamp, parse_timestamp, utc_now

NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-01T00:00:00Z", datetime(2024, 1, 1, tzinfo=UTC)),
        ("2024-01-31T23:59:59+02:00", datetime(2024, 1, 31, 21, 59, 59, tzinfo=UTC)),
        ("2024-01-31T20:00:00-05:30", datetime(2024, 2, 1, 1, 30, tzinfo=UTC)),
        ("2024-01-01", datetime(2024, 1, 1, tzinfo=UTC)),
        ("2024-01-01T12:30:00", datetime(2024, 1, 1, 12, 30, tzinfo=UTC)),
        ("2024-01-01 12:30", datetime(2024, 1, 1, 12, 30, tzinfo=UTC)),
        ("2024-01-01T12:30:00.250Z", datetime(2024, 1, 1, 12, 30, 0, 250_000, tzinfo=UTC)),
        ("2024-01-01t12:30:00z", datetime(2024, 1, 1, 12, 30, tzinfo=UTC)),
        ("  2024-02-29T00:00:00Z\n", datetime(2024, 2, 29, tzinfo=UTC)),
    ],
)
def test_accepted_forms(text: str, expected: datetime) -> None:
    parsed = parse_timestamp(text)
    assert parsed == expected
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize("text", ["now", "NOW", " Now "])
def test_now_uses_the_given_clock(text: str) -> None:
    assert parse_timestamp(text, now=NOW) == NOW
    paris = NOW.astimezone(timezone(timedelta(hours=2)))
    assert parse_timestamp(text, now=paris).tzinfo is UTC
    assert parse_timestamp(text, now=paris) == NOW


def test_now_without_a_clock_is_the_current_time() -> None:
    before = utc_now()
    parsed = parse_timestamp("now")
    assert before <= parsed <= utc_now()
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [
        "yesterday-ish",
        "",
        "   ",
        "2024-13-01",
        "2024-02-30",
        "2024-01-01T25:00:00Z",
        "1704067200",
        "now-1h",
        "２０２４-01-01",
    ],
)
def test_anything_else_is_refused_with_a_hint(text: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_timestamp(text)
    message = str(info.value)
    assert message == f"invalid time {text!r}: use ISO 8601 such as 2024-01-01T00:00:00Z or 'now'"
    assert "\n" not in message


def test_the_message_names_what_was_parsed() -> None:
    with pytest.raises(ValidationError, match=r"^invalid --since 'yesterday-ish': use ISO 8601"):
        parse_timestamp("yesterday-ish", what="--since")


def test_out_of_range_is_refused_cleanly() -> None:
    with pytest.raises(ValidationError, match="outside the supported range"):
        parse_timestamp("0001-01-01T00:00:00+01:00")


def test_a_naive_clock_is_refused() -> None:
    with pytest.raises(ValidationError, match="timezone-aware"):
        parse_timestamp("now", now=datetime(2024, 1, 1))


def test_format() -> None:
    assert format_timestamp(datetime(2024, 1, 15, 10, 30, tzinfo=UTC)) == "2024-01-15T10:30:00Z"
    assert (
        format_timestamp(datetime(2024, 1, 15, 10, 30, 0, 1500, tzinfo=UTC)) == "2024-01-15T10:30:00.001500Z"
    )
    offset = timezone(timedelta(hours=-5))
    assert format_timestamp(datetime(2024, 1, 15, 22, tzinfo=offset)) == "2024-01-16T03:00:00Z"
    with pytest.raises(ValidationError, match="no time zone"):
        format_timestamp(datetime(2024, 1, 15))


def test_utc_now_is_aware() -> None:
    assert utc_now().tzinfo is UTC


@given(
    ts=st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=5, minutes=45)), timezone(timedelta(hours=-11))]
        ),
    )
)
def test_format_and_parse_round_trip(ts: datetime) -> None:
    text = format_timestamp(ts)
    assert text.endswith("Z")
    assert parse_timestamp(text) == ts
    assert format_timestamp(parse_timestamp(text)) == text
