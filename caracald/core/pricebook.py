"""The pricebook: what each call costs, exactly, at the moment it was made.

Token prices are per *million* tokens, the unit providers publish. Other resources are priced per
request and/or per unit (an image, a search) by URL pattern, with the syntax of
:mod:`caracald.core.allowlist`. A resource with no entry is *unpriced*; a zero price is a deliberate
entry.

Every price carries ``effective_from``. A new price is added as a new entry rather than replacing the
old one, so an event keeps the price that was in force when it happened.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Decimal, localcontext
from fractions import Fraction
from typing import Final, Generic, TypeVar

from caracald.core.allowlist import PatternType, compile_pattern, normalise_resource, parse_pattern_type
from caracald.core.errors import CurrencyMismatchError, ValidationError
from caracald.core.money import Money, check_currency, parse_decimal

#: Token prices are quoted per this many tokens.
TOKENS_PER_PRICE_UNIT: Final = 1_000_000

#: What :func:`max_output_tokens_affordable` returns when output tokens are free.
UNLIMITED_TOKENS: Final = 2**63 - 1

DEFAULT_CURRENCY: Final = "USD"


def _require_aware(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime):
        raise ValidationError(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError(f"{what} {value.isoformat()} has no timezone; give one, e.g. UTC")
    return value.astimezone(UTC)


#: Prices are stored exactly as ``numeric(38, 12)``: finer or larger ones would be rounded or refused there.
PRICE_DECIMAL_PLACES: Final = 12
_PRICE_INTEGER_DIGITS: Final = 38 - PRICE_DECIMAL_PLACES


def _price(value: Decimal, what: str) -> Decimal:
    amount = parse_decimal(value, what=what)
    if amount < 0:
        raise ValidationError(f"{what} must not be negative, got {amount}")
    if amount.adjusted() >= _PRICE_INTEGER_DIGITS:
        raise ValidationError(f"{what} {value} is too large")
    _, digits, exponent = amount.as_tuple()
    assert isinstance(exponent, int)  # a finite number
    trailing_zeros = len(digits) - len("".join(map(str, digits)).rstrip("0"))
    if amount != 0 and exponent + trailing_zeros < -PRICE_DECIMAL_PLACES:
        raise ValidationError(f"{what} {value} has more than {PRICE_DECIMAL_PLACES} decimal places")
    return amount


def _count(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{what} must be a whole number, got {value!r}")
    if value < 0:
        raise ValidationError(f"{what} must not be negative, got {value}")
    return value


def _exact_sum(terms: Iterable[tuple[int, Decimal]], scale: int = 0) -> Decimal:
    """``sum(count * price) * 10**-scale`` without the context rounding anything."""
    with localcontext() as ctx:
        ctx.prec, ctx.Emax, ctx.Emin = MAX_PREC, MAX_EMAX, MIN_EMIN
        total = sum((price * count for count, price in terms), Decimal(0))
        return total.scaleb(-scale)


@dataclass(frozen=True, slots=True)
class TokenPrice:
    """Prices of one model per million tokens, from ``effective_from`` (UTC) on.

    ``cached_input_per_mtok`` is what a prompt-cache hit costs; None means the provider does not
    discount cached input, so it costs the input price.
    """

    model: str
    currency: str
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None
    effective_from: datetime

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValidationError("model name is empty")
        object.__setattr__(self, "model", self.model.strip())
        object.__setattr__(self, "currency", check_currency(self.currency))
        object.__setattr__(self, "input_per_mtok", _price(self.input_per_mtok, "input price"))
        object.__setattr__(self, "output_per_mtok", _price(self.output_per_mtok, "output price"))
        if self.cached_input_per_mtok is not None:
            cached = _price(self.cached_input_per_mtok, "cached input price")
            object.__setattr__(self, "cached_input_per_mtok", cached)
        object.__setattr__(self, "effective_from", _require_aware(self.effective_from, "effective_from"))

    @property
    def cached_input_price_per_mtok(self) -> Decimal:
        """The price charged for cached input tokens: the cached price, else the input price."""
        if self.cached_input_per_mtok is None:
            return self.input_per_mtok
        return self.cached_input_per_mtok


@dataclass(frozen=True, slots=True)
class ResourcePrice:
    """Price of calls to URLs matching ``pattern``: ``per_request`` for each call plus ``per_unit``
    for each ``unit`` it consumes, from ``effective_from`` (UTC) on."""

    pattern: str
    pattern_type: PatternType
    currency: str
    per_request: Decimal
    per_unit: Decimal
    unit: str | None
    effective_from: datetime
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kind = parse_pattern_type(self.pattern_type)
        object.__setattr__(self, "pattern_type", kind)
        object.__setattr__(self, "_regex", compile_pattern(self.pattern, kind))
        object.__setattr__(self, "currency", check_currency(self.currency))
        object.__setattr__(self, "per_request", _price(self.per_request, "per_request price"))
        object.__setattr__(self, "per_unit", _price(self.per_unit, "per_unit price"))
        if self.unit is not None:
            if not isinstance(self.unit, str) or not self.unit.strip():
                raise ValidationError("unit name is empty; leave it out when nothing is priced per unit")
            object.__setattr__(self, "unit", self.unit.strip())
        elif self.per_unit != 0:
            raise ValidationError(f"pattern {self.pattern!r} has a per_unit price but no unit name")
        object.__setattr__(self, "effective_from", _require_aware(self.effective_from, "effective_from"))

    def matches(self, url: str) -> bool:
        """Whether the whole URL matches, after normalising its scheme and host."""
        return self._matches_normalised(normalise_resource(url))

    def _matches_normalised(self, url: str) -> bool:
        return self._regex.fullmatch(url) is not None


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens one call consumed.

    Cached input tokens are a *subset* of the input tokens, as OpenAI reports them. Anthropic
    reports cache reads apart from ``input_tokens``; add them in before building a usage.
    """

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0

    def __post_init__(self) -> None:
        _count(self.input_tokens, "input_tokens")
        _count(self.output_tokens, "output_tokens")
        _count(self.cached_input_tokens, "cached_input_tokens")
        if self.cached_input_tokens > self.input_tokens:
            raise ValidationError(
                f"cached_input_tokens ({self.cached_input_tokens}) cannot exceed "
                f"input_tokens ({self.input_tokens}): cached tokens are part of the input"
            )


def token_cost(price: TokenPrice, usage: TokenUsage) -> Money:
    """Exact cost of ``usage``; only the total is rounded, up, to the ledger scale."""
    uncached = usage.input_tokens - usage.cached_input_tokens
    terms = [
        (uncached, price.input_per_mtok),
        (usage.cached_input_tokens, price.cached_input_price_per_mtok),
        (usage.output_tokens, price.output_per_mtok),
    ]
    return Money(_exact_sum(terms, scale=6), price.currency)


def request_cost(price: ResourcePrice, units: int = 0) -> Money:
    """Exact cost of one request consuming ``units`` of the price's unit."""
    _count(units, "units")
    return Money(_exact_sum([(1, price.per_request), (units, price.per_unit)]), price.currency)


def max_output_tokens_affordable(price: TokenPrice, remaining: Money, input_tokens: int) -> int:
    """The largest output-token count whose cost, with ``input_tokens`` of uncached input, is at most
    ``remaining`` (as :func:`token_cost` would charge it); 0 when even no output is affordable.

    Free output tokens are unlimited: :data:`UNLIMITED_TOKENS` is returned.
    """
    _count(input_tokens, "input_tokens")
    if remaining.currency != price.currency:
        raise CurrencyMismatchError(
            f"cannot weigh a {remaining.currency} budget against {price.currency} prices"
        )
    # ``remaining`` lies on the ledger-scale grid, so rounding the cost up to that grid keeps it
    # within ``remaining`` exactly when the unrounded cost is.
    input_cost = input_tokens * Fraction(price.input_per_mtok)
    budget = Fraction(remaining.amount) * TOKENS_PER_PRICE_UNIT - input_cost
    if budget < 0:
        return 0
    if price.output_per_mtok == 0:
        return UNLIMITED_TOKENS
    return min(int(budget // Fraction(price.output_per_mtok)), UNLIMITED_TOKENS)


_P = TypeVar("_P", TokenPrice, ResourcePrice)


class _History(Generic[_P]):
    """The dated versions of one price, oldest first."""

    __slots__ = ("_starts", "_versions")

    def __init__(self, versions: Sequence[_P], name: str) -> None:
        ordered = sorted(versions, key=lambda p: p.effective_from)
        for earlier, later in itertools.pairwise(ordered):
            if earlier.effective_from == later.effective_from:
                raise ValidationError(
                    f"{name} has two prices effective from {later.effective_from.isoformat()}"
                )
        self._versions: list[_P] = ordered
        self._starts = [p.effective_from for p in ordered]

    def at(self, when: datetime) -> _P | None:
        i = bisect.bisect_right(self._starts, when)
        return self._versions[i - 1] if i else None


class Pricebook:
    """All known prices, each looked up as it stood at a given moment.

    Models: an exact entry is preferred; otherwise the longest entry name that is a prefix of the
    model followed by ``-`` prices it, so ``gpt-4o`` prices ``gpt-4o-2024-08-06``. That also makes
    ``gpt-4o`` price ``gpt-4o-mini`` unless ``gpt-4o-mini`` has its own entry: price each distinct
    model explicitly. Candidates are tried from most to least specific, and the first with a price
    in force wins. Model names are case-sensitive.

    Resources: among the patterns with a price in force, the longest matching pattern wins as the
    most specific; patterns of equal length go by the order given.
    """

    __slots__ = ("_models", "_resource_order", "_resource_prices", "_resources", "_token_prices")

    def __init__(
        self, token_prices: Iterable[TokenPrice] = (), resource_prices: Iterable[ResourcePrice] = ()
    ) -> None:
        self._token_prices = tuple(token_prices)
        self._resource_prices = tuple(resource_prices)

        by_model: dict[str, list[TokenPrice]] = {}
        for tp in self._token_prices:
            by_model.setdefault(tp.model, []).append(tp)
        self._models = {m: _History(v, f"model {m!r}") for m, v in by_model.items()}

        by_pattern: dict[tuple[str, PatternType], list[ResourcePrice]] = {}
        for rp in self._resource_prices:
            by_pattern.setdefault((rp.pattern, rp.pattern_type), []).append(rp)
        self._resources = {
            key: _History(v, f"{key[1].value} pattern {key[0]!r}") for key, v in by_pattern.items()
        }
        # dicts keep insertion order and sorted() is stable, so ties stay in the given order
        self._resource_order = sorted(self._resources, key=lambda key: -len(key[0]))

    @property
    def token_prices(self) -> tuple[TokenPrice, ...]:
        return self._token_prices

    @property
    def resource_prices(self) -> tuple[ResourcePrice, ...]:
        return self._resource_prices

    def token_price(self, model: str, at: datetime) -> TokenPrice | None:
        """The price of ``model`` in force at ``at``, or None if it is unpriced then."""
        when = _require_aware(at, "at")
        candidate = model.strip()
        while candidate:
            history = self._models.get(candidate)
            if history is not None:
                found = history.at(when)
                if found is not None:
                    return found
            candidate = candidate.rpartition("-")[0]
        return None

    def resource_price(self, url: str, at: datetime) -> ResourcePrice | None:
        """The price of calling ``url`` in force at ``at``, or None if it is unpriced then."""
        when = _require_aware(at, "at")
        normalised = normalise_resource(url)
        for key in self._resource_order:
            found = self._resources[key].at(when)
            if found is not None and found._matches_normalised(normalised):
                return found
        return None


_TOKEN_FIELDS: Final = ("model", "input", "output", "cached_input", "currency", "effective_from")
_RESOURCE_FIELDS: Final = (
    "pattern", "pattern_type", "per_request", "per_unit", "unit", "currency", "effective_from",
)  # fmt: skip


def _record_decimal(record: Mapping[str, object], key: str, *, default: Decimal | None = None) -> Decimal:
    if key not in record or record[key] is None:
        if default is None:
            raise ValidationError(f"missing {key!r}")
        return default
    value = record[key]
    if isinstance(value, float):
        raise ValidationError(f'{key} {value!r} is a float: quote it, e.g. "2.50", so it stays exact')
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise ValidationError(f"{key} must be a number, got {value!r}")
    return parse_decimal(value, what=key)


def _record_text(record: Mapping[str, object], key: str) -> str | None:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise ValidationError(f"{key} must be a string, got {value!r}")
    return value


def _record_text_or(record: Mapping[str, object], key: str, default: str) -> str:
    value = _record_text(record, key)
    return default if value is None else value


def _record_when(record: Mapping[str, object], default: datetime) -> datetime:
    value = record.get("effective_from")
    if value is None:
        return default
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, date):
        # a bare date (as YAML loads one) means the start of that day in UTC
        when = datetime(value.year, value.month, value.day, tzinfo=UTC)
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            day = date.fromisoformat(text)
        except ValueError:
            try:
                when = datetime.fromisoformat(text)
            except ValueError:
                raise ValidationError(
                    f"effective_from {value!r} is not an ISO 8601 time, e.g. 2024-05-01T00:00:00Z"
                ) from None
        else:
            when = datetime(day.year, day.month, day.day, tzinfo=UTC)
    else:
        raise ValidationError(f"effective_from must be an ISO 8601 string, got {value!r}")
    return _require_aware(when, "effective_from")


def _check_fields(record: Mapping[str, object], allowed: tuple[str, ...], kind: str) -> None:
    for key in record:
        if key not in allowed:
            raise ValidationError(f"unknown field {key!r} for a {kind}; expected {', '.join(allowed)}")


def _token_record(record: Mapping[str, object], default: datetime) -> TokenPrice:
    _check_fields(record, _TOKEN_FIELDS, "token price")
    model = _record_text(record, "model")
    assert model is not None  # the caller picked this kind because "model" is present
    cached = _record_decimal(record, "cached_input") if record.get("cached_input") is not None else None
    return TokenPrice(
        model=model,
        currency=_record_text_or(record, "currency", DEFAULT_CURRENCY),
        input_per_mtok=_record_decimal(record, "input"),
        output_per_mtok=_record_decimal(record, "output"),
        cached_input_per_mtok=cached,
        effective_from=_record_when(record, default),
    )


def _resource_record(record: Mapping[str, object], default: datetime) -> ResourcePrice:
    _check_fields(record, _RESOURCE_FIELDS, "resource price")
    pattern = _record_text(record, "pattern")
    assert pattern is not None  # the caller picked this kind because "pattern" is present
    return ResourcePrice(
        pattern=pattern,
        pattern_type=parse_pattern_type(_record_text_or(record, "pattern_type", PatternType.GLOB)),
        currency=_record_text_or(record, "currency", DEFAULT_CURRENCY),
        per_request=_record_decimal(record, "per_request", default=Decimal(0)),
        per_unit=_record_decimal(record, "per_unit", default=Decimal(0)),
        unit=_record_text(record, "unit"),
        effective_from=_record_when(record, default),
    )


def prices_from_records(
    records: Iterable[Mapping[str, object]], *, default_effective_from: datetime
) -> tuple[list[TokenPrice], list[ResourcePrice]]:
    """Build prices from already-parsed records, such as a YAML or JSON price file.

    A token price is ``{model, input, output, cached_input?, currency?, effective_from?}`` with
    prices per million tokens; a resource price is ``{pattern, pattern_type?, per_request?,
    per_unit?, unit?, currency?, effective_from?}``. The currency defaults to USD and the pattern
    type to glob. Numbers are strings, integers or Decimals; floats are refused because they are
    already inexact. ``effective_from`` is ISO 8601 with a timezone (a trailing ``Z`` is accepted),
    or a bare date meaning midnight UTC; it defaults to ``default_effective_from``.

    Errors name the offending record, counting from 1: ``record 3: unknown currency 'USX' ...``.
    """
    default = _require_aware(default_effective_from, "default_effective_from")
    tokens: list[TokenPrice] = []
    resources: list[ResourcePrice] = []
    for number, record in enumerate(records, start=1):
        try:
            if not isinstance(record, Mapping):
                raise ValidationError(f"expected a mapping with 'model' or 'pattern', got {record!r}")
            has_model, has_pattern = "model" in record, "pattern" in record
            if has_model and has_pattern:
                raise ValidationError("has both 'model' and 'pattern'; a price is for one or the other")
            if has_model:
                tokens.append(_token_record(record, default))
            elif has_pattern:
                resources.append(_resource_record(record, default))
            else:
                raise ValidationError("needs 'model' (a token price) or 'pattern' (a resource price)")
        except ValidationError as exc:
            raise ValidationError(f"record {number}: {exc.message}") from None
    return tokens, resources
