"""Budget status and counter rebuilds, computed from the store and the ledger.

A policy's spend is everything charged to its agent and to every agent below it in the delegation tree,
since each of their requests reserved on it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from caracald.admin.common import require_agent
from caracald.budget.base import Scope, ScopeStatus
from caracald.core.agents import Agent
from caracald.core.budget import bucket_seconds, rolling_buckets, spend_slot
from caracald.core.money import Money
from caracald.core.policy import PolicyVersion
from caracald.core.windows import WindowBounds, WindowSpec, window_bounds
from caracald.store import agents as agent_store
from caracald.store import catalog as catalog_store
from caracald.store import policies as policy_store
from caracald.store import spend as spend_store
from caracald.store.database import Connection, Database


def _scope(p: PolicyVersion) -> Scope:
    return Scope(policy_id=p.policy_id, agent_id=p.agent_id, limit=p.terms.limit, window=p.terms.window)


def scopes_for(db: Database, agent_id: uuid.UUID) -> list[Scope]:
    """Every active policy a request of this agent must fit: its own and each ancestor's."""
    with db.read() as conn:
        require_agent(conn, agent_id)
        chain = [agent_id, *(a.agent_id for a in agent_store.ancestors(conn, agent_id))]
        return [_scope(p) for p in policy_store.current_for_agents(conn, chain)]


def all_scopes(db: Database) -> list[Scope]:
    with db.read() as conn:
        ids = [a.agent_id for a in agent_store.list_all(conn, limit=1_000_000)]
        return [_scope(p) for p in policy_store.current_for_agents(conn, ids)]


def _subtree(conn: Connection, agent_id: uuid.UUID) -> list[uuid.UUID]:
    return [agent_id, *(a.agent_id for a in agent_store.descendants(conn, agent_id))]


def ledger_totals(db: Database, scopes: Sequence[Scope], at: datetime) -> dict[tuple[uuid.UUID, str], Money]:
    """Settled spend per ``(policy_id, spend_slot)`` for the windows in force at ``at``."""
    totals: dict[tuple[uuid.UUID, str], Money] = {}
    with db.read() as conn:
        for scope in scopes:
            agents = _subtree(conn, scope.agent_id)
            currency = scope.limit.currency
            if scope.window.is_rolling:
                seconds = bucket_seconds(scope.window.window)
                buckets = rolling_buckets(scope.window, at)
                start = datetime.fromtimestamp(buckets.start * seconds, tz=UTC)
                end = datetime.fromtimestamp(buckets.stop * seconds, tz=UTC)
                for bucket, amount in spend_store.charged_by_bucket(
                    conn, agents, currency, start, end, seconds
                ).items():
                    instant = datetime.fromtimestamp(bucket * seconds, tz=UTC)
                    totals[(scope.policy_id, spend_slot(scope.window, instant))] = Money(amount, currency)
            else:
                bounds = window_bounds(scope.window, at)
                amount = spend_store.charged_total(conn, agents, currency, bounds.start, bounds.end)
                totals[(scope.policy_id, spend_slot(scope.window, at))] = Money(amount, currency)
    return totals


def ledger_status(
    db: Database, scopes: Sequence[Scope], at: datetime, *, hold_ttl: timedelta
) -> list[ScopeStatus]:
    """Limit, settled and held per scope as the ledger records them (the embedded deployment's view)."""
    statuses = []
    with db.read() as conn:
        for scope in scopes:
            agents = _subtree(conn, scope.agent_id)
            currency = scope.limit.currency
            bounds = window_bounds(scope.window, at)
            settled = spend_store.charged_total(conn, agents, currency, bounds.start, bounds.end)
            held, holds = spend_store.open_reservations(conn, agents, currency, at - hold_ttl)
            statuses.append(
                ScopeStatus(scope, bounds, Money(settled, currency), Money(held, currency), holds)
            )
    return statuses


def agent_names(db: Database, agent_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
    with db.read() as conn:
        return {a: (require_agent(conn, a).name) for a in set(agent_ids)}


@dataclass(frozen=True, slots=True)
class Catalog:
    """Every agent and the scope of every active policy, as of one :func:`fingerprint` of their tables."""

    fingerprint: tuple[int, int]
    agents: list[Agent]
    scopes: list[Scope]


def catalog(db: Database, previous: Catalog | None = None) -> Catalog:
    """The agents and policy scopes; ``previous`` itself when nothing in their tables has changed since.

    A dashboard refreshing every few seconds re-reads and re-validates thousands of rows only when one of
    them changed.
    """
    with db.read() as conn:
        mark = catalog_store.fingerprint(conn)
        if previous is not None and previous.fingerprint == mark:
            return previous
        # Read after the fingerprint: a change in between makes the next fingerprint differ, never stale.
        agents = agent_store.list_all(conn, limit=1_000_000)
        scopes = [_scope(p) for p in policy_store.current_all(conn)]
    return Catalog(mark, agents, scopes)


@dataclass(frozen=True, slots=True)
class LedgerFigures:
    """Every active policy's figures as the ledger sums them, before they become money: what
    :func:`all_ledger_status` reports, for a caller that keeps the previous ones and rebuilds only what
    changed."""

    scopes: list[Scope]
    bounds: dict[WindowSpec, WindowBounds]  # each distinct window's, at the instant asked for
    #: ``{policy_id: (settled, held, holds)}``; a policy created since its scope was read is missing (nothing
    #: charged to it yet).
    totals: dict[uuid.UUID, tuple[Decimal, Decimal, int]]


def all_ledger_figures(
    db: Database, at: datetime, *, hold_ttl: timedelta, scopes: Sequence[Scope] | None = None
) -> LedgerFigures:
    """The figures behind :func:`all_ledger_status`, of every active policy (or of ``scopes``), in one
    statement whatever their number."""
    with db.read() as conn:
        if scopes is None:
            scopes = [_scope(p) for p in policy_store.current_all(conn)]
        bounds = {w: window_bounds(w, at) for w in {s.window for s in scopes}}  # a few distinct windows
        totals = spend_store.policy_totals(
            conn, [(w, b.start, b.end) for w, b in bounds.items()], at - hold_ttl
        )
    return LedgerFigures(list(scopes), bounds, totals)


def all_ledger_status(
    db: Database, at: datetime, *, hold_ttl: timedelta, scopes: Sequence[Scope] | None = None
) -> list[ScopeStatus]:
    """:func:`ledger_status` of every active policy (or of ``scopes``, every active policy's as read a
    moment ago), in one statement whatever their number."""
    figures = all_ledger_figures(db, at, hold_ttl=hold_ttl, scopes=scopes)
    money = ZeroShared()
    statuses = []
    for scope in figures.scopes:
        currency = scope.limit.currency
        settled, held, holds = figures.totals.get(scope.policy_id, NOTHING)
        window = figures.bounds[scope.window]
        statuses.append(ScopeStatus(scope, window, money(settled, currency), money(held, currency), holds))
    return statuses


#: The figures of a policy the ledger has nothing for.
NOTHING: tuple[Decimal, Decimal, int] = (Decimal(0), Decimal(0), 0)


class ZeroShared:
    """``Money(amount, currency)``, with one zero per currency: most policies hold nothing, and a thousand
    identical zeros cost a thousand constructions."""

    def __init__(self) -> None:
        self._zeros: dict[str, Money] = {}

    def __call__(self, amount: Decimal, currency: str) -> Money:
        if amount:
            return Money(amount, currency)
        found = self._zeros.get(currency)
        if found is None:
            found = self._zeros[currency] = Money.zero(currency)
        return found
