"""The contract every budget backend keeps.

A *scope* is one active policy that a request must fit: the agent's own and every delegating ancestor's.
Admission is one atomic step over all scopes (all or nothing); a hold then sits against every scope until
its settlement replaces it with the actual cost, or until it expires and is charged at its reserved amount.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from caracald.core.errors import CaracalError, CurrencyMismatchError
from caracald.core.money import Money
from caracald.core.windows import WindowBounds, WindowSpec


class BudgetUnavailableError(CaracalError):
    """The budget counters cannot be reached (or hold no data yet): fail closed, answer 503."""

    reason = "budget_unavailable"


@dataclass(frozen=True, slots=True)
class Scope:
    policy_id: uuid.UUID
    agent_id: uuid.UUID
    limit: Money
    window: WindowSpec


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    request_id: uuid.UUID
    agent_id: uuid.UUID
    scopes: tuple[Scope, ...]
    amount: Money  # the upper-bound estimate to hold
    at: datetime
    hold_ttl: timedelta


@dataclass(frozen=True, slots=True)
class Admission:
    request_id: uuid.UUID
    admitted: bool
    amount: Money
    #: The first scope that could not take the amount (when denied).
    denied_scope: Scope | None = None
    #: True when this request id had already been decided: the same answer is returned again.
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Settlement:
    request_id: uuid.UUID
    #: What the hold was charged: the actual cost, or the reserved amount at expiry.
    charged: Money
    #: A settlement arriving after its hold expired corrects the expiry by this much (actual - reserved).
    correction: Money | None = None
    #: True when this request was already settled: nothing changed.
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class ExpiredHold:
    request_id: uuid.UUID
    agent_id: uuid.UUID
    amount: Money
    policy_ids: tuple[uuid.UUID, ...]
    reserved_at: datetime


@dataclass(frozen=True, slots=True)
class ScopeStatus:
    scope: Scope
    bounds: WindowBounds
    settled: Money
    held: Money
    holds: int

    @property
    def remaining(self) -> Money:
        return self.scope.limit - self.settled - self.held


#: Called with the request ids of the holds an expiry sweep is about to charge.
DueHook = Callable[[Sequence[uuid.UUID]], None]


class BudgetBackend(Protocol):
    async def remaining(self, scopes: Sequence[Scope], at: datetime) -> Money | None:
        """The least any scope can still take (limit - settled - held), or None with no scopes."""
        ...

    async def admit(self, request: AdmissionRequest) -> Admission:
        """Hold ``amount`` on every scope if each can take it, else on none. Idempotent by request id."""
        ...

    async def settle(self, request_id: uuid.UUID, actual: Money, at: datetime) -> Settlement:
        """Replace the hold by the actual cost. Idempotent; a late settlement yields a correction."""
        ...

    async def expire_due(
        self, now: datetime, limit: int = 1000, *, before: DueHook | None = None
    ) -> list[ExpiredHold]:
        """Charge every hold past its expiry at its reserved amount, and return them. ``before`` is called
        with the request ids found due before any is charged (the gateway journals them there)."""
        ...

    async def expired(self, request_ids: Sequence[uuid.UUID]) -> list[ExpiredHold]:
        """The holds among ``request_ids`` that expired (and were not settled late since): what an expiry
        charged, for recording it again after a crash."""
        ...

    async def status(self, scopes: Sequence[Scope], at: datetime) -> list[ScopeStatus]: ...

    async def holds_in_flight(self) -> int: ...

    async def close(self) -> None: ...


def least_remaining(statuses: Sequence[ScopeStatus]) -> Money | None:
    """The least any scope can still take, or None with no scopes (all must share one currency)."""
    if not statuses:
        return None
    currencies = {status.scope.limit.currency for status in statuses}
    if len(currencies) > 1:
        raise CurrencyMismatchError(f"scopes budget in several currencies ({', '.join(sorted(currencies))})")
    return min((status.remaining for status in statuses), key=lambda money: money.amount)


def denied_scope_of(scopes: Sequence[Scope], index: int | None, policy_id: uuid.UUID | None) -> Scope | None:
    """The scope that denied: by position when it is still that policy (a replay may differ), else by id."""
    if index is not None and 0 <= index < len(scopes) and scopes[index].policy_id == policy_id:
        return scopes[index]
    return next((scope for scope in scopes if scope.policy_id == policy_id), None)
