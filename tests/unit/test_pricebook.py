from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from caracald.core.allowlist import PatternType
from caracald.core.errors import CurrencyMismatchError, ValidationError
from caracald.core.money import Money
from caracald.core.pricebook import (
    UNLIMITED_TOKENS,
    Pricebook,
    ResourcePrice,
    TokenPrice,
    TokenUsage,
    max_output_tokens_affordable,
    prices_from_records,
    request_cost,
    token_cost,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)
T1 = datetime(2024, 6, 1, tzinfo=UTC)
T2 = datetime(2025, 1, 1, tzinfo=UTC)


def tp(
    model: str = "gpt-4o",
    inp: str = "2.50",
    out: str = "10.00",
    cached: str | None = None,
    when: datetime = T0,
    currency: str = "USD",
) -> TokenPrice:
    return TokenPrice(
        model=model,
        currency=currency,
        input_per_mtok=Decimal(inp),
        output_per_mtok=Decimal(out),
        cached_input_per_mtok=None if cached is None else Decimal(cached),
        effective_from=when,
    )


def rp(
    pattern: str,
    per_request: str = "0",
    per_unit: str = "0",
    unit: str | None = None,
    kind: PatternType = PatternType.GLOB,
    when: datetime = T0,
) -> ResourcePrice:
    return ResourcePrice(
        pattern=pattern,
        pattern_type=kind,
        currency="USD",
        per_request=Decimal(per_request),
        per_unit=Decimal(per_unit),
        unit=unit,
        effective_from=when,
    )


def usd(text: str) -> Money:
    return Money(Decimal(text), "USD")


# -- costs -------------------------------------------------------------------------------------------


def test_gpt4o_cost_is_exact() -> None:
    cost = token_cost(tp(), TokenUsage(input_tokens=1000, output_tokens=500))
    assert cost == usd("0.0075")
    assert cost.amount == Decimal("0.0075")


def test_cached_input_is_a_subset_of_input() -> None:
    price = tp(cached="1.25")
    cost = token_cost(price, TokenUsage(input_tokens=1000, output_tokens=0, cached_input_tokens=400))
    # 600 uncached at 2.50 + 400 cached at 1.25, per million
    assert cost.amount == Decimal("0.002")


def test_cached_input_defaults_to_the_input_price() -> None:
    price = tp(cached=None)
    assert price.cached_input_price_per_mtok == Decimal("2.50")
    with_cache = token_cost(price, TokenUsage(1000, 500, cached_input_tokens=1000))
    without = token_cost(price, TokenUsage(1000, 500))
    assert with_cache == without


def test_token_cost_rounds_up_at_ledger_scale() -> None:
    # one token at $0.15/Mtok is $0.00000015, finer than the 8-place USD ledger scale
    cost = token_cost(tp(model="gpt-4o-mini", inp="0.15", out="0.60"), TokenUsage(1, 0))
    assert cost.amount == Decimal("0.00000015")
    cost = token_cost(tp(inp="0.000001", out="0"), TokenUsage(1, 0))
    assert cost.amount == Decimal("0.00000001")


def test_token_cost_is_exact_for_huge_counts() -> None:
    cost = token_cost(tp(inp="3", out="15"), TokenUsage(10**12, 10**12))
    assert cost.amount == Decimal(18_000_000)


def test_token_cost_in_another_currency() -> None:
    cost = token_cost(tp(currency="eur", inp="1", out="1"), TokenUsage(500_000, 0))
    assert cost == Money(Decimal("0.5"), "EUR")


def test_request_cost() -> None:
    price = rp("https://api.search.example/*", per_request="0.005", per_unit="0.001", unit="result")
    assert request_cost(price) == usd("0.005")
    assert request_cost(price, 10) == usd("0.015")
    with pytest.raises(ValidationError, match="units must not be negative"):
        request_cost(price, -1)


def test_zero_price_is_allowed_when_explicit() -> None:
    free = rp("https://free.example/*")
    assert request_cost(free, 3).is_zero()


# -- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": " "}, "model name is empty"),
        ({"inp": "-1"}, "input price must not be negative"),
        ({"out": "-0.01"}, "output price must not be negative"),
        ({"cached": "-1"}, "cached input price must not be negative"),
        ({"currency": "USX"}, "unknown currency 'USX'"),
        ({"when": datetime(2024, 1, 1)}, "has no timezone"),
    ],
)
def test_token_price_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        tp(**kwargs)  # type: ignore[arg-type]


def test_token_price_normalises() -> None:
    price = tp(
        model=" gpt-4o ", currency="usd", when=datetime(2024, 1, 1, 2, tzinfo=timezone(timedelta(hours=2)))
    )
    assert price.model == "gpt-4o"
    assert price.currency == "USD"
    assert price.effective_from == T0
    assert price.effective_from.tzinfo is UTC


def test_token_price_refuses_float() -> None:
    with pytest.raises(ValidationError, match="not a float"):
        TokenPrice("m", "USD", 2.5, Decimal(1), None, T0)  # type: ignore[arg-type]


def test_resource_price_validation() -> None:
    with pytest.raises(ValidationError, match="unterminated"):
        rp("https://a.com/[")
    with pytest.raises(ValidationError, match="per_unit price but no unit"):
        rp("https://a.com/*", per_unit="0.01")
    with pytest.raises(ValidationError, match="per_request price must not be negative"):
        rp("https://a.com/*", per_request="-1")
    with pytest.raises(ValidationError, match="unknown pattern type"):
        ResourcePrice("https://a.com/*", "wild", "USD", Decimal(0), Decimal(0), None, T0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("usage", "message"),
    [
        ((-1, 0, 0), "input_tokens must not be negative"),
        ((0, -1, 0), "output_tokens must not be negative"),
        ((10, 0, 11), r"cached_input_tokens \(11\) cannot exceed input_tokens \(10\)"),
        ((True, 0, 0), "whole number"),
        ((1.0, 0, 0), "whole number"),
    ],
)
def test_token_usage_validation(usage: tuple[int, int, int], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TokenUsage(*usage)


# -- lookups -----------------------------------------------------------------------------------------


def test_effective_dated_lookup_keeps_past_prices() -> None:
    old = tp(inp="5", out="15", when=T0)
    book = Pricebook([old])
    event_time = T1 + timedelta(days=1)
    assert book.token_price("gpt-4o", event_time) is old
    # a cheaper price published later does not rewrite what the event was charged
    new = tp(inp="2.50", out="10", when=T2)
    book = Pricebook([new, old])
    assert book.token_price("gpt-4o", event_time) is old
    assert book.token_price("gpt-4o", T2) is new
    assert book.token_price("gpt-4o", T2 + timedelta(days=30)) is new
    assert book.token_price("gpt-4o", T2 - timedelta(microseconds=1)) is old


def test_no_price_before_the_first_is_in_force() -> None:
    book = Pricebook([tp(when=T1)])
    assert book.token_price("gpt-4o", T0) is None


def test_lookup_time_must_be_aware() -> None:
    book = Pricebook([tp()])
    with pytest.raises(ValidationError, match="no timezone"):
        book.token_price("gpt-4o", datetime(2024, 5, 1))


def test_lookup_compares_times_across_zones() -> None:
    book = Pricebook([tp(when=T1)])
    just_before = T1.astimezone(timezone(timedelta(hours=-5))) - timedelta(seconds=1)
    assert book.token_price("gpt-4o", just_before) is None
    assert book.token_price("gpt-4o", T1.astimezone(timezone(timedelta(hours=9)))) is not None


def test_duplicate_effective_dates_are_refused() -> None:
    with pytest.raises(ValidationError, match="model 'gpt-4o' has two prices effective from 2024-01-01"):
        Pricebook([tp(), tp(inp="3")])
    with pytest.raises(ValidationError, match="two prices effective"):
        Pricebook(resource_prices=[rp("https://a.com/*"), rp("https://a.com/*", per_request="1")])


def test_dated_model_variants_use_the_family_price() -> None:
    family = tp(model="gpt-4o")
    book = Pricebook([family])
    assert book.token_price("gpt-4o-2024-08-06", T1) is family
    assert book.token_price("gpt-4o", T1) is family
    assert book.token_price("gpt-4", T1) is None
    assert book.token_price("gpt-4omni", T1) is None
    assert book.token_price("GPT-4o", T1) is None


def test_longest_model_prefix_wins() -> None:
    family = tp(model="gpt-4o")
    mini = tp(model="gpt-4o-mini", inp="0.15", out="0.60")
    book = Pricebook([family, mini])
    assert book.token_price("gpt-4o-mini-2024-07-18", T1) is mini
    assert book.token_price("gpt-4o-2024-08-06", T1) is family
    exact = tp(model="gpt-4o-2024-08-06", inp="2")
    book = Pricebook([family, mini, exact])
    assert book.token_price("gpt-4o-2024-08-06", T1) is exact


def test_exact_model_not_yet_priced_falls_back_to_family() -> None:
    family = tp(model="claude-3-5-sonnet", when=T0)
    dated = tp(model="claude-3-5-sonnet-20241022", when=T2)
    book = Pricebook([family, dated])
    assert book.token_price("claude-3-5-sonnet-20241022", T1) is family
    assert book.token_price("claude-3-5-sonnet-20241022", T2) is dated


def test_most_specific_resource_pattern_wins() -> None:
    broad = rp("https://api.example.com/*", per_request="0.01")
    narrow = rp("https://api.example.com/v1/images/*", per_unit="0.04", unit="image")
    for order in ([broad, narrow], [narrow, broad]):
        book = Pricebook(resource_prices=order)
        assert book.resource_price("https://api.example.com/v1/images/generate", T1) is narrow
        assert book.resource_price("https://api.example.com/v1/search", T1) is broad
    assert Pricebook(resource_prices=[broad]).resource_price("https://other.example.com/", T1) is None


def test_equally_long_patterns_go_by_given_order() -> None:
    first = rp("https://a.com/x*", per_request="1")
    second = rp("https://a.com/*y", per_request="2")
    assert Pricebook(resource_prices=[first, second]).resource_price("https://a.com/xy", T1) is first
    assert Pricebook(resource_prices=[second, first]).resource_price("https://a.com/xy", T1) is second


def test_resource_lookup_only_considers_prices_in_force() -> None:
    broad = rp("https://api.example.com/*", per_request="0.01", when=T0)
    narrow_later = rp("https://api.example.com/v1/*", per_request="0.02", when=T2)
    narrow_old = rp("https://api.example.com/v1/*", per_request="0.03", when=T0)
    book = Pricebook(resource_prices=[broad, narrow_later])
    assert book.resource_price("https://api.example.com/v1/x", T1) is broad
    assert book.resource_price("https://api.example.com/v1/x", T2) is narrow_later
    book = Pricebook(resource_prices=[broad, narrow_later, narrow_old])
    assert book.resource_price("https://api.example.com/v1/x", T1) is narrow_old


def test_resource_lookup_normalises_host_and_is_anchored() -> None:
    price = rp(r"https://api\.example\.com/v1/.*", per_request="1", kind=PatternType.REGEX)
    book = Pricebook(resource_prices=[price])
    assert book.resource_price("HTTPS://API.Example.com/v1/x", T1) is price
    assert book.resource_price("https://evil.com/?https://api.example.com/v1/x", T1) is None
    with pytest.raises(ValidationError, match="not a full URL"):
        book.resource_price("api.example.com/v1/x", T1)


def test_pricebook_keeps_entries() -> None:
    prices = [tp(), tp(when=T2)]
    book = Pricebook(prices, [rp("https://a.com/*")])
    assert book.token_prices == tuple(prices)
    assert len(book.resource_prices) == 1


# -- affordability -----------------------------------------------------------------------------------


def test_max_output_tokens_affordable_example() -> None:
    price = tp()
    # $0.0075 buys 1000 in + 500 out exactly
    assert max_output_tokens_affordable(price, usd("0.0075"), 1000) == 500
    assert max_output_tokens_affordable(price, usd("0.00749999"), 1000) == 499
    assert max_output_tokens_affordable(price, usd("0.0025"), 1000) == 0
    assert max_output_tokens_affordable(price, usd("0.0024"), 1000) == 0
    assert max_output_tokens_affordable(price, usd("-1"), 0) == 0


def test_free_output_is_unlimited() -> None:
    price = tp(out="0")
    assert max_output_tokens_affordable(price, usd("1"), 1000) == UNLIMITED_TOKENS
    assert max_output_tokens_affordable(price, usd("0.001"), 1000) == 0


def test_max_output_tokens_affordable_checks_currency() -> None:
    with pytest.raises(CurrencyMismatchError):
        max_output_tokens_affordable(tp(), Money(Decimal(1), "EUR"), 0)


_PRICES = st.decimals(min_value=0, max_value=100, places=4, allow_nan=False, allow_infinity=False)


@given(
    inp=_PRICES,
    out=_PRICES.filter(lambda d: d > 0),
    remaining=st.decimals(min_value=-1, max_value=50, places=8, allow_nan=False, allow_infinity=False),
    input_tokens=st.integers(min_value=0, max_value=2_000_000),
)
def test_max_output_tokens_affordable_is_the_largest(
    inp: Decimal, out: Decimal, remaining: Decimal, input_tokens: int
) -> None:
    price = tp(inp=str(inp), out=str(out))
    budget = usd(str(remaining))
    n = max_output_tokens_affordable(price, budget, input_tokens)
    assert n >= 0
    if token_cost(price, TokenUsage(input_tokens, 0)) > budget:
        assert n == 0
        return
    assert token_cost(price, TokenUsage(input_tokens, n)) <= budget
    assert token_cost(price, TokenUsage(input_tokens, n + 1)) > budget


# -- records -----------------------------------------------------------------------------------------


def parse(*records: Mapping[str, object]) -> tuple[list[TokenPrice], list[ResourcePrice]]:
    return prices_from_records(records, default_effective_from=T0)


def test_records_build_token_and_resource_prices() -> None:
    tokens, resources = parse(
        {"model": "gpt-4o", "input": "2.50", "output": "10.00", "cached_input": "1.25"},
        {"model": "claude-3-5-haiku", "input": 1, "output": Decimal(5), "currency": "eur",
         "effective_from": "2024-11-04T00:00:00Z"},
        {"pattern": "https://api.search.example/*", "per_request": "0.005"},
        {"pattern": r"https://img\.example/.*", "pattern_type": "regex", "per_unit": "0.04",
         "unit": "image", "effective_from": "2024-06-01"},
    )  # fmt: skip
    assert tokens == [
        tp(cached="1.25"),
        tp(
            model="claude-3-5-haiku", inp="1", out="5", currency="EUR", when=datetime(2024, 11, 4, tzinfo=UTC)
        ),
    ]
    assert resources[0] == rp("https://api.search.example/*", per_request="0.005")
    assert resources[1] == rp(
        r"https://img\.example/.*", per_unit="0.04", unit="image", kind=PatternType.REGEX, when=T1
    )


def test_record_effective_from_forms() -> None:
    for value in ["2024-06-01T00:00:00Z", "2024-06-01T02:00:00+02:00", "2024-06-01", date(2024, 6, 1), T1]:
        tokens, _ = parse({"model": "m", "input": "1", "output": "1", "effective_from": value})
        assert tokens[0].effective_from == T1, value


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"model": "m", "input": "1", "output": "1", "currency": "USX"}, "unknown currency 'USX'"),
        ({"model": "m", "input": "1", "output": "1", "currency": ""}, "unknown currency ''"),
        ({"model": "m", "input": 2.5, "output": "1"}, r"input 2\.5 is a float: quote it"),
        ({"pattern": "https://a.com/*", "per_request": 0.01}, "per_request 0.01 is a float: quote it"),
        ({"model": "m", "output": "1"}, "missing 'input'"),
        ({"model": "m", "input": "1"}, "missing 'output'"),
        ({"model": "m", "input": "x", "output": "1"}, "input 'x' is not a number"),
        ({"model": "m", "input": "-1", "output": "1"}, "must not be negative"),
        (
            {"model": "m", "input": "1", "output": "1", "ouput": "1"},
            "unknown field 'ouput' for a token price",
        ),
        ({"pattern": "https://a.com/*", "input": "1"}, "unknown field 'input' for a resource price"),
        ({"model": "m", "pattern": "x", "input": "1", "output": "1"}, "both 'model' and 'pattern'"),
        ({"input": "1"}, "needs 'model'"),
        ({"pattern": "https://a.com/[", "per_request": "1"}, "unterminated"),
        ({"pattern": "https://a.com/*", "pattern_type": "wild"}, "unknown pattern type 'wild'"),
        ({"pattern": "https://a.com/*", "per_unit": "1"}, "no unit name"),
        ({"model": 4, "input": "1", "output": "1"}, "model must be a string"),
        ({"model": "m", "input": True, "output": "1"}, "input must be a number"),
        ({"model": "m", "input": "1", "output": "1", "effective_from": "June"}, "not an ISO 8601 time"),
        ({"model": "m", "input": "1", "output": "1", "effective_from": "2024-06-01T00:00"}, "no timezone"),
        ({"model": "m", "input": "1", "output": "1", "effective_from": 20240601}, "ISO 8601 string"),
    ],
)
def test_record_errors_name_the_record(record: Mapping[str, object], message: str) -> None:
    good = {"model": "ok", "input": "1", "output": "1"}
    with pytest.raises(ValidationError, match=rf"^record 3: .*{message}"):
        parse(good, good, record)


def test_non_mapping_record_is_refused() -> None:
    with pytest.raises(ValidationError, match="record 1: expected a mapping"):
        prices_from_records(["gpt-4o"], default_effective_from=T0)  # type: ignore[list-item]


def test_records_need_an_aware_default() -> None:
    with pytest.raises(ValidationError, match="default_effective_from"):
        prices_from_records([], default_effective_from=datetime(2024, 1, 1))


def test_records_feed_a_pricebook() -> None:
    tokens, resources = parse(
        {"model": "gpt-4o", "input": "5", "output": "15"},
        {"model": "gpt-4o", "input": "2.50", "output": "10", "effective_from": "2024-08-06T00:00:00Z"},
    )
    book = Pricebook(tokens, resources)
    early = book.token_price("gpt-4o-2024-05-13", T1)
    late = book.token_price("gpt-4o-2024-08-06", T2)
    assert early is not None
    assert late is not None
    assert token_cost(early, TokenUsage(1000, 500)).amount == Decimal("0.0125")
    assert token_cost(late, TokenUsage(1000, 500)).amount == Decimal("0.0075")
