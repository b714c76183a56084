"""Timestamps given by operators, and how Caracal prints them back. Everything is UTC inside."""

from __future__ import annotations

from datetime import UTC, datetime

from caracald.core.errors import ValidationError


def utc_now() -> datetime:
    return datetime.now(UTC)


def parse_timestamp(text: str, *, now: datetime | None = None, what: str = "time") -> datetime:
    """Parse an operator's timestamp into an aware UTC datetime.

    Accepted: ISO 8601 with ``Z`` or an offset (``2024-01-31T23:59:59+02:00``), a date alone
    (midnight UTC), a date-time without offset (taken as UTC, never as the host's local time, so
    the answer does not depend on where the command runs), and ``now`` (``now`` if given, else
    the current time).
    """
    if not isinstance(text, str):
        raise ValidationError(f"{what} must be text, got {type(text).__name__}")
    cleaned = text.strip()
    if cleaned.lower() == "now":
        if now is None:
            return utc_now()
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValidationError(f"the current {what} must be timezone-aware")
        return now.astimezone(UTC)
    invalid = ValidationError(f"invalid {what} {text!r}: use ISO 8601 such as 2024-01-01T00:00:00Z or 'now'")
    # ISO 8601 is ASCII: refuse anything else outright rather than rely on the parser to.
    if not cleaned.isascii():
        raise invalid
    try:
        # upper-casing lets RFC 3339's lower-case 't' and 'z' through
        parsed = datetime.fromisoformat(cleaned.upper())
    except ValueError:
        raise invalid from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ValidationError(f"{what} {text!r} is outside the supported range") from None


def format_timestamp(ts: datetime) -> str:
    """``2024-01-15T10:30:00Z``: UTC with a ``Z``; microseconds appear only when not zero."""
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValidationError(f"time {ts.isoformat()} has no time zone: give it in UTC")
    return ts.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"
