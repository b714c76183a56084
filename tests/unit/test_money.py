from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from caracald.core.errors import CurrencyMismatchError, ValidationError
from caracald.core.money import (
    LEDGER_EXTRA_DIGITS,
    Money,
    check_currency,
    format_amount,
    format_average,
    ledger_scale,
    minor_units,
    parse_decimal,
)

# Amounts at the USD ledger scale (8 places), small enough that no sum leaves Decimal's precision.
ledger_amounts = st.decimals(
    min_value=Decimal("-1000000000"), max_value=Decimal("1000000000"), places=8, allow_nan=False
)


def usd(text: str) -> Money:
    return Money(Decimal(text), "USD")


# -- parsing --------------------------------------------------------------------------------------


def test_parse_limit_accepts_minor_unit_amounts() -> None:
    assert Money.parse_limit("100", "USD") == usd("100")
    assert Money.parse_limit(" 12.34 ", "usd") == usd("12.34")
    assert Money.parse_limit(1000, "JPY") == Money(Decimal(1000), "JPY")
    assert Money.parse_limit(Decimal("0.001"), "BHD").amount == Decimal("0.001")
    assert Money.parse_limit("1e2", "USD") == usd("100")


@pytest.mark.parametrize(
    ("text", "currency", "message"),
    [
        ("-5", "USD", "limit must be greater than zero, got -5"),
        ("0", "USD", "limit must be greater than zero, got 0"),
        ("0.00", "USD", "limit must be greater than zero, got 0.00"),
        ("abc", "USD", "limit 'abc' is not a number"),
        ("", "USD", "limit '' is not a number"),
        ("NaN", "USD", "limit 'NaN' is not a finite number"),
        ("Infinity", "USD", "limit 'Infinity' is not a finite number"),
        ("1.234", "USD", "limit 1.234 has more than 2 decimal places for USD"),
        ("1.5", "JPY", "limit 1.5 has more than 0 decimal places for JPY"),
        ("10", "XYZ", "unknown currency 'XYZ': use an ISO 4217 code such as USD or EUR"),
    ],
)
def test_parse_limit_refusals(text: str, currency: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        Money.parse_limit(text, currency)
    assert str(info.value) == message
    assert info.value.reason == "invalid_input"


@pytest.mark.parametrize("value", [1.5, 100.0, True])
def test_floats_are_refused(value: object) -> None:
    with pytest.raises(ValidationError, match="must be given as a decimal string, not a float"):
        Money.parse_limit(value, "USD")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="not a float"):
        Money.parse(value, "USD")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Decimal"):
        Money(value, "USD")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        usd("1").times(value)  # type: ignore[arg-type]


def test_parse_allows_ledger_precision_but_no_finer() -> None:
    assert Money.parse("0.00000001", "USD").amount == Decimal("0.00000001")
    assert Money.parse("-0.5", "USD").is_negative()
    with pytest.raises(ValidationError, match=r"^cost 0.000000001 has more than 8 decimal places for USD$"):
        Money.parse("0.000000001", "usd", what="cost")
    with pytest.raises(ValidationError, match="unknown currency"):
        Money.parse("1", "XX")


def test_currency_codes() -> None:
    assert check_currency(" eur ") == "EUR"
    assert minor_units("JPY") == 0
    assert minor_units("KWD") == 3
    assert ledger_scale("USD") == 2 + LEDGER_EXTRA_DIGITS
    with pytest.raises(ValidationError, match="unknown currency 'dollars'"):
        check_currency("dollars")
    with pytest.raises(ValidationError, match="unknown currency"):
        Money.zero("BTC")


def test_parse_decimal_is_exact() -> None:
    assert parse_decimal("0.1") + parse_decimal("0.2") == Decimal("0.3")
    assert parse_decimal(7) == Decimal(7)


def test_numbers_beyond_decimal_precision_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"^limit 1e30 is too large$"):
        Money.parse_limit("1e30", "USD")
    with pytest.raises(ValidationError, match=r"^amount 1e30 is too large$"):
        Money.parse("1e30", "USD")


def test_huge_computed_amounts_raise_a_caracal_error() -> None:
    with pytest.raises(ValidationError):
        Money(Decimal("1e30"), "USD")


# -- arithmetic -----------------------------------------------------------------------------------


@given(a=ledger_amounts, b=ledger_amounts, c=ledger_amounts)
def test_addition_is_exact_and_associative(a: Decimal, b: Decimal, c: Decimal) -> None:
    x, y, z = Money(a, "USD"), Money(b, "USD"), Money(c, "USD")
    assert (x + y) + z == x + (y + z)
    assert (x + y).amount == a + b
    assert x + y == y + x
    assert (x + y) - y == x
    assert x - x == Money.zero("USD")
    assert (-x) + x == Money.zero("USD")
    assert -x == Money(-a, "USD")
    assert (x + Money.zero("USD")) == x


@given(a=ledger_amounts, n=st.integers(min_value=0, max_value=10_000))
def test_times_an_integer_is_repeated_addition(a: Decimal, n: int) -> None:
    price = Money(a, "USD")
    assert price.times(n).amount == a * n
    if n <= 20:
        total = Money.zero("USD")
        for _ in range(n):
            total = total + price
        assert total == price.times(n)


@given(a=ledger_amounts, b=ledger_amounts)
def test_comparisons_follow_the_amounts(a: Decimal, b: Decimal) -> None:
    x, y = Money(a, "USD"), Money(b, "USD")
    assert (x < y) == (a < b)
    assert (x <= y) == (a <= b)
    assert (x > y) == (a > b)
    assert (x >= y) == (a >= b)
    assert (x == y) == (a == b)


def test_no_float_drift() -> None:
    total = Money.zero("USD")
    for _ in range(10):
        total = total + usd("0.1")
    assert total == usd("1")
    assert usd("0.1") + usd("0.2") == usd("0.3")


def test_equal_amounts_are_equal_whatever_their_exponent() -> None:
    assert usd("1.0") == Money(Decimal("1.00"), "usd")
    assert hash(usd("1.0")) == hash(usd("1.00000000"))


@pytest.mark.parametrize(
    "combine",
    [
        lambda a, b: a + b,
        lambda a, b: a - b,
        lambda a, b: a < b,
        lambda a, b: a <= b,
        lambda a, b: a > b,
        lambda a, b: a >= b,
    ],
)
def test_currency_mismatch_raises(combine) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CurrencyMismatchError, match="cannot combine USD with EUR") as info:
        combine(usd("1"), Money(Decimal(1), "EUR"))
    assert info.value.reason == "currency_mismatch"
    assert isinstance(info.value, ValidationError)


def test_money_does_not_mix_with_plain_numbers() -> None:
    with pytest.raises(TypeError, match="cannot combine Money with int"):
        usd("1") + 1  # type: ignore[operator]
    with pytest.raises(TypeError):
        assert usd("1") < Decimal(1)  # type: ignore[operator]


def test_ceiling_rounding_at_ledger_scale() -> None:
    assert usd("0.000000001").amount == Decimal("0.00000001")
    assert usd("0.000000011").amount == Decimal("0.00000002")
    assert usd("-0.000000019").amount == Decimal("-0.00000001")
    assert Money(Decimal("0.0000001"), "JPY").amount == Decimal("0.000001")
    half_a_unit = usd("0.00000001").times(Decimal("0.5"))
    assert half_a_unit.amount == Decimal("0.00000001")
    # the price of 1 token at $2.50 per million tokens
    per_token = usd("2.50").times(Decimal(1)).amount / 1_000_000
    assert Money(per_token, "USD").amount == Decimal("0.0000025")
    assert usd("0.000003").times(Decimal("0.3333")).amount == Decimal("0.000001")


@given(a=st.decimals(min_value=Decimal(-1000), max_value=Decimal(1000), places=12, allow_nan=False))
def test_rounding_never_lowers_a_cost(a: Decimal) -> None:
    kept = Money(a, "USD").amount
    assert kept >= a
    assert kept - a < Decimal("0.00000001")
    assert kept == kept.quantize(Decimal("0.00000001"))


# -- presentation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("money", "shown"),
    [
        (Money(Decimal(100), "USD"), "$100.00 USD"),
        (Money(Decimal(1000), "JPY"), "¥1,000 JPY"),
        (Money(Decimal("1234567.891"), "BHD"), "1,234,567.891 BHD"),
        (Money(Decimal("-1234.5"), "EUR"), "-€1,234.50 EUR"),
        (Money(Decimal("0.005"), "GBP"), "£0.00 GBP"),
        (Money(Decimal("0.015"), "USD"), "$0.02 USD"),
        (Money(Decimal("99.999"), "INR"), "₹100.00 INR"),
    ],
)
def test_format(money: Money, shown: str) -> None:
    assert money.format() == shown
    assert str(money) == shown


def test_exact_format_keeps_sub_cent_digits() -> None:
    assert usd("0.00012345").format(exact=True) == "$0.00012345 USD"
    assert usd("12").format(exact=True) == "$12.00 USD"
    assert usd("12.5").format(exact=True) == "$12.50 USD"
    assert Money(Decimal(1000), "JPY").format(exact=True) == "¥1,000 JPY"
    assert format_amount(Decimal("1234.5"), "usd") == "$1,234.50"


def test_format_average() -> None:
    assert format_average(usd("45.67"), 1234) == "$0.037"
    assert format_average(usd("1"), 3) == "$0.333"
    assert format_average(usd("4567"), 2) == "$2,283.50"
    assert format_average(usd("45.67"), 0) == "$0.00"
    assert format_average(Money(Decimal(1000), "JPY"), 3) == "¥333"


def test_minor_units_amount() -> None:
    assert usd("12.34").minor_units_amount() == 1234
    assert usd("1.23000001").minor_units_amount() == 124
    assert usd("0").minor_units_amount() == 0
    assert usd("-1.235").minor_units_amount() == -123
    assert Money(Decimal(1000), "JPY").minor_units_amount() == 1000
    assert Money(Decimal("1.0005"), "KWD").minor_units_amount() == 1001


def test_decimal_string() -> None:
    assert usd("12").decimal_string() == "12.00"
    assert usd("0.00012345").decimal_string() == "0.00012345"
    assert usd("-3.1").decimal_string() == "-3.10"
    assert Money(Decimal(1000), "JPY").decimal_string() == "1000"


def test_helpers() -> None:
    assert Money.zero("EUR").is_zero()
    assert not usd("0.00000001").is_zero()
    assert usd("-0.01").is_negative()
    assert not Money.zero("USD").is_negative()
