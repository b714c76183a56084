"""Policy terms and the delegation rule."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from caracald.core.errors import DelegationError, ValidationError
from caracald.core.money import Money
from caracald.core.policy import (
    DelegatedPolicy,
    PolicyTerms,
    check_change_reason,
    check_covers_descendants,
    check_within_ancestors,
)
from caracald.core.windows import TimeWindow, WindowSpec, WindowType, nominal_length

windows = st.sampled_from(list(TimeWindow))
kinds = st.sampled_from(list(WindowType))
cents = st.integers(min_value=1, max_value=10_000_000)
currencies = st.sampled_from(["USD", "EUR"])


def terms(
    amount_cents: int, window: TimeWindow, kind: WindowType = WindowType.CALENDAR, currency: str = "USD"
) -> PolicyTerms:
    return PolicyTerms(Money(Decimal(amount_cents).scaleb(-2), currency), WindowSpec(window, kind))


def parent(t: PolicyTerms) -> DelegatedPolicy:
    return DelegatedPolicy("parent-agent", uuid.uuid4(), t)


@given(cents, cents, windows, windows, kinds, kinds, currencies, currencies)
def test_a_child_never_exceeds_a_comparable_parent_limit(
    child_cents: int,
    parent_cents: int,
    child_window: TimeWindow,
    parent_window: TimeWindow,
    child_kind: WindowType,
    parent_kind: WindowType,
    child_currency: str,
    parent_currency: str,
) -> None:
    child = terms(child_cents, child_window, child_kind, child_currency)
    ancestor = terms(parent_cents, parent_window, parent_kind, parent_currency)
    comparable = child_currency == parent_currency and nominal_length(parent_window) >= nominal_length(
        child_window
    )
    should_refuse = comparable and child_cents > parent_cents
    try:
        check_within_ancestors(child, [parent(ancestor)])
        refused = False
    except DelegationError as exc:
        refused = True
        assert "parent-agent" in str(exc)
    assert refused == should_refuse
    # the same rule, seen from the parent being lowered under an existing child
    try:
        check_covers_descendants(ancestor, [DelegatedPolicy("child-agent", uuid.uuid4(), child)])
        lowered_refused = False
    except DelegationError:
        lowered_refused = True
    assert lowered_refused == should_refuse


def test_every_ancestor_up_the_tree_is_checked() -> None:
    grandparent = terms(5_000, TimeWindow.MONTHLY)
    parent_terms = terms(20_000, TimeWindow.MONTHLY)
    with pytest.raises(DelegationError, match=r"\$50\.00"):
        check_within_ancestors(terms(10_000, TimeWindow.DAILY), [parent(parent_terms), parent(grandparent)])
    check_within_ancestors(terms(4_000, TimeWindow.DAILY), [parent(parent_terms), parent(grandparent)])


def test_a_shorter_parent_window_does_not_cap_a_longer_child_window() -> None:
    # a $10 daily parent still lets a child hold a $100 monthly budget: admission enforces both
    check_within_ancestors(terms(10_000, TimeWindow.MONTHLY), [parent(terms(1_000, TimeWindow.DAILY))])


@pytest.mark.parametrize("reason", [None, "", "   "])
def test_a_change_needs_a_reason(reason: str | None) -> None:
    with pytest.raises(ValidationError, match="change reason is required"):
        check_change_reason(reason)


def test_a_reason_is_kept_trimmed() -> None:
    assert check_change_reason("  Initial budget allocation ") == "Initial budget allocation"
