"""Budget policies: a limit per window, versioned, and bounded by what a parent agent delegates."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from caracald.core.errors import DelegationError, ValidationError
from caracald.core.money import Money
from caracald.core.windows import WindowSpec, nominal_length


class PolicyStatus(StrEnum):
    ACTIVE = "active"
    INACTIVE = "inactive"


@dataclass(frozen=True, slots=True)
class PolicyTerms:
    """What a policy version enforces."""

    limit: Money
    window: WindowSpec


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    """One immutable version of a policy. A change writes a new version; old ones stay as history."""

    policy_id: uuid.UUID
    agent_id: uuid.UUID
    version: int
    terms: PolicyTerms
    status: PolicyStatus
    change_reason: str
    changed_by: str
    created_at: datetime

    @property
    def is_active(self) -> bool:
        return self.status is PolicyStatus.ACTIVE


def check_change_reason(reason: str | None) -> str:
    if reason is None or not reason.strip():
        raise ValidationError("a change reason is required (--change-reason): say why the budget changes")
    if len(reason) > 1000:
        raise ValidationError("change reason must be at most 1000 characters")
    return reason.strip()


@dataclass(frozen=True, slots=True)
class DelegatedPolicy:
    """An active policy somewhere in the delegation tree, with whose it is for error messages."""

    agent_name: str
    policy_id: uuid.UUID
    terms: PolicyTerms


def _bounds(outer: PolicyTerms, inner: PolicyTerms) -> bool:
    """Whether ``outer`` caps ``inner``: same currency and a window at least as long.

    A parent's monthly $100 caps any child window (a child can never spend more than $100 in a day if its
    parent's month allows $100), while a parent's daily $10 does not directly compare with a child's monthly
    limit: admission still enforces both, since every request reserves on every ancestor.
    """
    return outer.limit.currency == inner.limit.currency and nominal_length(
        outer.window.window
    ) >= nominal_length(inner.window.window)


def check_within_ancestors(terms: PolicyTerms, ancestors: Iterable[DelegatedPolicy]) -> None:
    """Refuse a child policy whose limit exceeds what an ancestor's comparable policy delegates."""
    for ancestor in ancestors:
        if _bounds(ancestor.terms, terms) and terms.limit > ancestor.terms.limit:
            raise DelegationError(
                f"limit {terms.limit} exceeds the {ancestor.terms.limit} {ancestor.terms.window.window} "
                f"budget that agent {ancestor.agent_name} delegates (policy {ancestor.policy_id})"
            )


def check_covers_descendants(terms: PolicyTerms, descendants: Iterable[DelegatedPolicy]) -> None:
    """Refuse lowering a parent's policy below a comparable policy it already delegated."""
    for child in descendants:
        if _bounds(terms, child.terms) and child.terms.limit > terms.limit:
            raise DelegationError(
                f"limit {terms.limit} is below the {child.terms.limit} {child.terms.window.window} budget "
                f"already delegated to agent {child.agent_name} (policy {child.policy_id}); lower that first"
            )
