"""Exact money: a Decimal amount with its currency, never a float.

Two precisions matter. Limits and reports speak in the currency's minor unit (cents for USD).
Costs are finer: one token of a cheap model costs a small fraction of a cent, so amounts are kept
at a *ledger scale* of the minor unit plus ``LEDGER_EXTRA_DIGITS`` decimal places. Computed costs round
up (ceiling) to that scale, so rounding can never let spending slip under a limit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Final

from caracald.core.errors import CurrencyMismatchError, ValidationError

#: Digits kept beyond the currency's minor unit for metered costs.
LEDGER_EXTRA_DIGITS: Final = 6

#: ISO 4217 codes with their minor units. Deliberately a closed list: an unknown code is a typo.
CURRENCY_MINOR_UNITS: Final[dict[str, int]] = {
    "AED": 2,
    "ARS": 2,
    "AUD": 2,
    "BHD": 3,
    "BRL": 2,
    "CAD": 2,
    "CHF": 2,
    "CLP": 0,
    "CNY": 2,
    "COP": 2,
    "CZK": 2,
    "DKK": 2,
    "EGP": 2,
    "EUR": 2,
    "GBP": 2,
    "HKD": 2,
    "HUF": 2,
    "IDR": 2,
    "ILS": 2,
    "INR": 2,
    "ISK": 0,
    "JOD": 3,
    "JPY": 0,
    "KRW": 0,
    "KWD": 3,
    "MXN": 2,
    "MYR": 2,
    "NGN": 2,
    "NOK": 2,
    "NZD": 2,
    "OMR": 3,
    "PHP": 2,
    "PKR": 2,
    "PLN": 2,
    "RON": 2,
    "SAR": 2,
    "SEK": 2,
    "SGD": 2,
    "THB": 2,
    "TRY": 2,
    "TWD": 2,
    "UAH": 2,
    "USD": 2,
    "VND": 0,
    "ZAR": 2,
}

_SYMBOLS: Final[dict[str, str]] = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥", "INR": "₹"}


def check_currency(code: str) -> str:
    """Return the normalised ISO 4217 code, or raise a clear error for an unknown one."""
    normalised = code.strip().upper()
    if normalised not in CURRENCY_MINOR_UNITS:
        raise ValidationError(f"unknown currency {code!r}: use an ISO 4217 code such as USD or EUR")
    return normalised


def minor_units(currency: str) -> int:
    return CURRENCY_MINOR_UNITS[check_currency(currency)]


def ledger_scale(currency: str) -> int:
    return minor_units(currency) + LEDGER_EXTRA_DIGITS


def _exponent(scale: int) -> Decimal:
    return Decimal(1).scaleb(-scale)


_QUANTA: dict[str, tuple[str, Decimal]] = {}


def ledger_quantum(currency: str) -> tuple[str, Decimal]:
    """``(normalised code, ledger quantum)`` of a currency as spelled, memoised: every Money needs it."""
    found = _QUANTA.get(currency)
    if found is None:
        code = check_currency(currency)
        found = (code, _exponent(ledger_scale(code)))
        if len(_QUANTA) < 1024:  # only valid spellings get here; a bound all the same
            _QUANTA[currency] = found
    return found


def parse_decimal(text: str | int | Decimal, *, what: str = "amount") -> Decimal:
    """Parse a user-supplied number exactly. Floats are refused: they are already inexact."""
    if isinstance(text, bool | float):
        raise ValidationError(f"{what} must be given as a decimal string, not a float")
    try:
        value = text if isinstance(text, Decimal) else Decimal(str(text).strip())
    except InvalidOperation:
        raise ValidationError(f"{what} {text!r} is not a number") from None
    if not value.is_finite():
        raise ValidationError(f"{what} {text!r} is not a finite number")
    return value


def at_ledger_scale(amount: Decimal, currency: str) -> tuple[Decimal, str]:
    """``(amount rounded up to the ledger scale, normalised currency code)``: what :class:`Money` holds,
    for callers that need the values without the object."""
    code, quantum = ledger_quantum(currency)
    if not amount.is_finite():
        raise ValidationError("amount must be finite")
    try:
        return amount.quantize(quantum, rounding=ROUND_CEILING), code
    except InvalidOperation:  # more digits than the decimal context holds
        raise ValidationError(f"amount {amount} {code} is too large") from None


@dataclass(frozen=True, slots=True)
class Money:
    """An exact amount in one currency, held at the currency's ledger scale."""

    amount: Decimal
    currency: str

    def __post_init__(self) -> None:
        if not isinstance(self.amount, Decimal):
            raise TypeError(f"Money amount must be a Decimal, got {type(self.amount).__name__}")
        scaled, currency = at_ledger_scale(self.amount, self.currency)
        object.__setattr__(self, "currency", currency)
        object.__setattr__(self, "amount", scaled)

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def zero(cls, currency: str) -> Money:
        # immutable: one per currency will do
        return _zero(currency) if cls is Money else cls(Decimal(0), currency)

    @classmethod
    def parse(cls, text: str | int | Decimal, currency: str, *, what: str = "amount") -> Money:
        """Parse an amount given by a user, which may not be finer than the ledger scale."""
        value = parse_decimal(text, what=what)
        scale = ledger_scale(currency)
        try:
            if value != value.quantize(_exponent(scale), rounding=ROUND_HALF_EVEN):
                raise ValidationError(
                    f"{what} {text} has more than {scale} decimal places for {currency.upper()}"
                )
            return cls(value, currency)
        except InvalidOperation:  # more digits than the decimal context holds
            raise ValidationError(f"{what} {text} is too large") from None

    @classmethod
    def parse_limit(cls, text: str | int | Decimal, currency: str) -> Money:
        """Parse a budget limit: positive and no finer than the currency's minor unit."""
        value = parse_decimal(text, what="limit")
        code = check_currency(currency)
        if value <= 0:
            raise ValidationError(f"limit must be greater than zero, got {text}")
        digits = minor_units(code)
        try:
            if value != value.quantize(_exponent(digits), rounding=ROUND_HALF_EVEN):
                raise ValidationError(f"limit {text} has more than {digits} decimal places for {code}")
            return cls(value, code)
        except InvalidOperation:  # more digits than the decimal context holds
            raise ValidationError(f"limit {text} is too large") from None

    # -- arithmetic ---------------------------------------------------------------------------------

    def _check(self, other: Money) -> None:
        if not isinstance(other, Money):
            raise TypeError(f"cannot combine Money with {type(other).__name__}")
        if other.currency != self.currency:
            raise CurrencyMismatchError(f"cannot combine {self.currency} with {other.currency}")

    def __add__(self, other: Money) -> Money:
        self._check(other)
        return Money(self.amount + other.amount, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._check(other)
        return Money(self.amount - other.amount, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.amount, self.currency)

    def times(self, factor: Decimal | int) -> Money:
        """Multiply by an exact factor (a token count, a unit count); rounds up to the ledger scale."""
        if isinstance(factor, float | bool):
            raise TypeError("factor must be a Decimal or an int")
        return Money(self.amount * factor, self.currency)

    def __lt__(self, other: Money) -> bool:
        self._check(other)
        return self.amount < other.amount

    def __le__(self, other: Money) -> bool:
        self._check(other)
        return self.amount <= other.amount

    def __gt__(self, other: Money) -> bool:
        self._check(other)
        return self.amount > other.amount

    def __ge__(self, other: Money) -> bool:
        self._check(other)
        return self.amount >= other.amount

    def is_zero(self) -> bool:
        return self.amount == 0

    def is_negative(self) -> bool:
        return self.amount < 0

    # -- presentation -------------------------------------------------------------------------------

    def minor_units_amount(self) -> int:
        """The amount in integer minor units, rounded up (for counters that need integers)."""
        digits = minor_units(self.currency)
        return int(self.amount.scaleb(digits).to_integral_value(rounding=ROUND_CEILING))

    def decimal_string(self) -> str:
        """Plain text for machines: the minor unit's digits at least, no trailing zeros beyond."""
        digits = minor_units(self.currency)
        text = f"{self.amount:f}"
        if "." not in text:
            return text
        whole, frac = text.split(".")
        frac = frac.rstrip("0").ljust(digits, "0")
        return f"{whole}.{frac}" if frac else whole

    def format(self, *, exact: bool = False) -> str:
        """``$100.00 USD``. With ``exact`` the sub-minor digits are kept (trailing zeros dropped)."""
        return f"{format_amount(self.amount, self.currency, exact=exact)} {self.currency}"

    def __str__(self) -> str:
        return self.format()


def format_amount(amount: Decimal, currency: str, *, exact: bool = False) -> str:
    """The amount with its symbol, at the minor unit, or at least that precise when ``exact``."""
    code = check_currency(currency)
    digits = minor_units(code)
    if exact:
        shown = amount.quantize(_exponent(ledger_scale(code)))
        text = f"{shown:f}"
        if "." in text:
            whole, frac = text.split(".")
            frac = frac.rstrip("0").ljust(digits, "0")
            text = f"{whole}.{frac}" if frac else whole
    else:
        text = f"{amount.quantize(_exponent(digits), rounding=ROUND_HALF_EVEN):f}"
    sign = ""
    if text.startswith("-"):
        sign, text = "-", text[1:]
    whole, _, frac = text.partition(".")
    whole = f"{int(whole):,}"
    body = f"{whole}.{frac}" if frac else whole
    symbol = _SYMBOLS.get(code, "")
    return f"{sign}{symbol}{body}"


def format_average(total: Money, count: int) -> str:
    """Average cost per event, rounded to three significant digits below one minor unit's precision."""
    if count <= 0:
        return format_amount(Decimal(0), total.currency)
    average = total.amount / count
    digits = minor_units(total.currency)
    if average != 0 and abs(average) < 1:
        # keep three significant digits so a cost of a fraction of a cent still reads as something
        significant = max(digits, -average.adjusted() + 2)
        shown = average.quantize(_exponent(min(significant, ledger_scale(total.currency))))
        return format_amount(shown, total.currency, exact=True)
    return format_amount(average, total.currency)


@functools.lru_cache(maxsize=256)
def _zero(currency: str) -> Money:
    return Money(Decimal(0), currency)
