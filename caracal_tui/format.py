"""Text for the screens: times, amounts, bars and badges. Colour always comes with words or numbers beside it,
so a screen reads the same without colour (a monochrome terminal, a screenshot in a ticket)."""

from __future__ import annotations

import math
import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache

from rich.text import Text

from caracal_tui.sources import Health
from caracald.core.errors import CaracalError, ValidationError
from caracald.core.money import Money, format_amount, minor_units
from caracald.core.timeparse import parse_timestamp

_RELATIVE = re.compile(r"^\s*-\s*(\d+)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str, now: datetime, *, what: str = "time") -> datetime:
    """An operator's time: ISO 8601 (UTC unless it says otherwise), ``now``, or relative like ``-24h``."""
    match = _RELATIVE.match(text)
    if match:
        amount, unit = int(match.group(1)), match.group(2).lower()
        try:
            return now - timedelta(**{_UNITS[unit]: amount})
        except OverflowError:
            raise ValidationError(f"{what} {text!r} is too far back") from None
    if not text.strip():
        raise ValidationError(f"give a {what}: ISO 8601 such as 2025-03-01T00:00:00Z, 'now', or -24h")
    return parse_timestamp(text, now=now, what=what)


def describe(exc: BaseException) -> str:
    """One line for the operator; never a traceback."""
    if isinstance(exc, CaracalError):
        text = exc.message
    else:
        text = str(exc).strip()
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    first = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return first if len(first) <= 300 else first[:297] + "..."


def clock(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%H:%M:%S")


def stamp(at: datetime | None) -> str:
    """``03-14 11:23`` (UTC): short enough for a table column."""
    if at is None:
        return "-"
    return at.astimezone(UTC).strftime("%m-%d %H:%M")


def full_stamp(at: datetime | None) -> str:
    if at is None:
        return "-"
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def age(at: datetime | None, now: datetime) -> str:
    """``41 s``, ``12 min``, ``30 h``, ``3 d``."""
    if at is None:
        return "-"
    seconds = max((now - at).total_seconds(), 0)
    if seconds < 60:
        return f"{int(seconds)} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 86400 * 2:
        return f"{int(seconds // 3600)} h"
    return f"{int(seconds // 86400)} d"


def ago(at: datetime | None, now: datetime) -> str:
    return "-" if at is None else f"{age(at, now)} ago"


def short_id(value: uuid.UUID | str | None) -> str:
    return "-" if value is None else str(value)[:8]


@lru_cache(maxsize=256)
def _notation(currency: str) -> tuple[str, str, int]:
    """(symbol, suffix, minor digits) of a currency: ``("$", "", 2)``, ``("", " CHF", 2)``."""
    symbol = format_amount(Decimal(0), currency).rstrip("0.")
    return symbol, "" if symbol else f" {currency}", minor_units(currency)


def amount(money: Money, *, exact: bool = False) -> str:
    """``$12.34`` (or ``12.34 CHF`` where the currency has no symbol), rounded half-even to the minor unit
    as :func:`caracald.core.money.format_amount` does; ``exact`` keeps the sub-minor digits."""
    symbol, suffix, digits = _notation(money.currency)
    if exact:
        text = format_amount(money.amount, money.currency, exact=True)
        return text if symbol else f"{text}{suffix}"
    sign = "-" if money.amount < 0 else ""
    return f"{sign}{symbol}{abs(money.amount):,.{digits}f}{suffix}"


def compact(money: Money) -> str:
    """``$121.42``, ``$1,235``, ``$12.3k``, ``$1.2M``: for narrow columns (wide ones show exact amounts)."""
    value = abs(money.amount)
    if value < 1000:
        return amount(money)
    sign = "-" if money.amount < 0 else ""
    symbol, suffix, _digits = _notation(money.currency)
    if value < 10_000:
        return f"{sign}{symbol}{value.quantize(Decimal(1)):,}{suffix}"
    for power, unit in ((3, "k"), (6, "M"), (9, "B"), (12, "T")):
        scaled = value / Decimal(10) ** power
        shown = f"{scaled:.{1 if scaled < 100 else 0}f}"
        if Decimal(shown) < 1000 or unit == "T":
            return f"{sign}{symbol}{shown}{unit}{suffix}"
    raise AssertionError("unreachable")


def count(value: int) -> str:
    return f"{value:,}"


def rate(per_second: float | None) -> str:
    if per_second is None:
        return "measuring"
    if per_second >= 100:
        return f"{per_second:,.0f}/s"
    return f"{per_second:.1f}/s"


def level_style(fraction: float) -> str:
    if fraction >= 1:
        return "bold red"
    if fraction >= 0.9:
        return "red"
    if fraction >= 0.75:
        return "yellow"
    return "green"


def bar(fraction: float, width: int = 10) -> Text:
    """``███████░░░  72%``: the bar coloured by how close to the limit, the percentage always written."""
    whole = math.floor(fraction * 100 + 1e-9)  # 99.9% is not yet 100%
    return _bar(max(min(whole, 1000), 0), width)


@lru_cache(maxsize=4096)
def _bar(whole: int, width: int) -> Text:
    """One bar per whole percentage and width: a refresh of a thousand agents draws few distinct ones.
    (Cells are never changed in place, so sharing them is safe.)"""
    fraction = whole / 100
    full = round(max(0.0, min(fraction, 1.0)) * width)
    style = level_style(fraction)
    text = Text()
    text.append("█" * full, style=style)
    text.append("░" * (width - full), style="dim")
    percent = f"{whole:>3}%" if whole < 1000 else ">999%"
    text.append(f" {percent}", style=style if fraction >= 0.75 else "")
    return text


_BADGES: dict[Health, tuple[str, str]] = {
    Health.OK: ("● OK", "bold green"),
    Health.WARN: ("▲ WARN", "bold yellow"),
    Health.DOWN: ("✖ DOWN", "bold red"),
    Health.OFF: ("○ OFF", "dim"),
    Health.UNKNOWN: ("? UNKNOWN", "yellow"),
}


def badge(health: Health) -> Text:
    label, style = _BADGES[health]
    return Text(label, style=style)


@lru_cache(maxsize=16)
def status_text(status: str) -> Text:
    """An agent's status, with a mark and a colour (shared: cells are never changed in place)."""
    if status == "active":
        return Text("● active", style="green")
    if status == "suspended":
        return Text("■ suspended", style="bold yellow")
    return Text(status)


def verification_text(status: str | None) -> Text:
    if status == "passed":
        return Text("✔ passed", style="green")
    if status == "failed":
        return Text("✖ FAILED", style="bold red")
    return Text("· not verified", style="dim")


def tokens(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def percent(value: Decimal | float) -> str:
    return f"{float(value) * 100:.0f}%"
