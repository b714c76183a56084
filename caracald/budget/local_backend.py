"""The embedded deployment's budget backend: counters in this process.

``LocalBudget`` drives the pure ``caracald.core.budget.BudgetBook`` under one ``asyncio.Lock``, so an
admission over every scope is one atomic step. It has the Redis backend's semantics (same counters,
buckets, idempotency and expiry rules) but serves one process only: the embedded gateway, which runs
a single process. At start-up, ``seed`` loads the settled spend from the ledger; holds in flight when
the process stopped are the ledger's to settle (their reservations and expiries are ledger events).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from caracald.budget.base import (
    Admission,
    AdmissionRequest,
    DueHook,
    ExpiredHold,
    Scope,
    ScopeStatus,
    Settlement,
    denied_scope_of,
    least_remaining,
)
from caracald.core.budget import (
    DEFAULT_DECISION_TTL,
    BudgetBook,
    HoldRecord,
    HoldState,
    counter_ref,
    from_units,
    plan_checks,
    to_units,
)
from caracald.core.errors import ValidationError
from caracald.core.money import Money


def _utcnow() -> datetime:
    return datetime.now(UTC)


class LocalBudget:
    """In-process ``BudgetBackend``."""

    def __init__(
        self,
        *,
        decision_ttl: timedelta = DEFAULT_DECISION_TTL,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._book = BudgetBook(decision_ttl=decision_ttl)
        self._lock = asyncio.Lock()
        self._clock = clock

    async def seed(self, totals: Mapping[tuple[uuid.UUID, str], Money]) -> None:
        """Load settled spend per ``(policy_id, spend_slot)`` from the ledger, replacing those slots."""
        units = {key: to_units(money) for key, money in totals.items()}
        async with self._lock:
            now = self._clock()
            for (policy_id, slot), value in units.items():
                self._book.load(policy_id, slot, value, now)

    async def remaining(self, scopes: Sequence[Scope], at: datetime) -> Money | None:
        return least_remaining(await self.status(scopes, at))

    async def admit(self, request: AdmissionRequest) -> Admission:
        units, checks = plan_checks(
            request.amount, ((s.policy_id, s.limit, s.window) for s in request.scopes), request.at
        )
        async with self._lock:
            outcome = self._book.admit(
                request_id=request.request_id,
                agent_id=request.agent_id,
                currency=request.amount.currency,
                amount=units,
                at=request.at,
                hold_ttl=request.hold_ttl,
                checks=checks,
                now=self._clock(),
            )
        return Admission(
            request_id=request.request_id,
            admitted=outcome.admitted,
            amount=from_units(outcome.amount, outcome.currency),
            denied_scope=None
            if outcome.admitted
            else denied_scope_of(request.scopes, outcome.denied_index, outcome.denied_policy),
            replayed=outcome.replayed,
        )

    async def settle(self, request_id: uuid.UUID, actual: Money, at: datetime) -> Settlement:
        units = to_units(actual)
        if units < 0:
            raise ValidationError(f"cannot settle a negative cost ({actual.format(exact=True)})")
        async with self._lock:
            outcome = self._book.settle(request_id, actual.currency, units, self._clock())
        return Settlement(
            request_id=request_id,
            charged=from_units(outcome.charged, outcome.currency),
            correction=None
            if outcome.correction is None
            else from_units(outcome.correction, outcome.currency),
            replayed=outcome.replayed,
        )

    async def expire_due(
        self, now: datetime, limit: int = 1000, *, before: DueHook | None = None
    ) -> list[ExpiredHold]:
        async with self._lock:
            records = self._book.expire_due(now, limit)
        # In process, finding and charging are one step: the hook hears of them after (a crash loses both).
        if before is not None and records:
            before([record.request_id for record in records])
        return [_expired_hold(record) for record in records]

    async def expired(self, request_ids: Sequence[uuid.UUID]) -> list[ExpiredHold]:
        async with self._lock:
            records = [self._book.record(request_id) for request_id in request_ids]
        return [
            _expired_hold(record)
            for record in records
            if record is not None
            and (
                record.state is HoldState.EXPIRED
                or (record.state is HoldState.SETTLED and record.settled_from is HoldState.EXPIRED)
            )
        ]

    async def status(self, scopes: Sequence[Scope], at: datetime) -> list[ScopeStatus]:
        refs = [counter_ref(scope.policy_id, scope.window, at) for scope in scopes]
        async with self._lock:
            usages = [self._book.usage(ref) for ref in refs]
        statuses = []
        for scope, ref, usage in zip(scopes, refs, usages, strict=True):
            currency = scope.limit.currency
            statuses.append(
                ScopeStatus(
                    scope=scope,
                    bounds=ref.bounds,
                    settled=from_units(usage.settled, currency),
                    held=from_units(usage.held, currency),
                    holds=usage.holds,
                )
            )
        return statuses

    async def holds_in_flight(self) -> int:
        return self._book.holds_in_flight

    async def close(self) -> None:
        return None


def _expired_hold(record: HoldRecord) -> ExpiredHold:
    return ExpiredHold(
        request_id=record.request_id,
        agent_id=record.agent_id,
        amount=from_units(record.amount, record.currency),
        policy_ids=record.policy_ids,
        reserved_at=record.at,
    )
