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
from caracald.core.windows import window_bounds
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


def all_ledger_status(
    db: Database, at: datetime, *, hold_ttl: timedelta, scopes: Sequence[Scope] | None = None
) -> list[ScopeStatus]:
    """:func:`ledger_status` of every active policy (or of ``scopes``, every active policy's as read a
    moment ago), in a few statements whatever their number."""
    with db.read() as conn:
        if scopes is None:
            scopes = [_scope(p) for p in policy_store.current_all(conn)]
        bounds = {w: window_bounds(w, at) for w in {s.window for s in scopes}}  # a few distinct windows
        totals = spend_store.policy_totals(
            conn, [(w, b.start, b.end) for w, b in bounds.items()], at - hold_ttl
        )
    zeros: dict[str, Money] = {}  # most policies hold nothing: one zero per currency, not one each

    def money(amount: Decimal, currency: str) -> Money:
        if amount:
            return Money(amount, currency)
        found = zeros.get(currency)
        if found is None:
            found = zeros[currency] = Money.zero(currency)
        return found

    statuses = []
    for scope in scopes:
        currency = scope.limit.currency
        # a policy created since it was read is not in the totals: nothing charged to it yet
        settled, held, holds = totals.get(scope.policy_id, (Decimal(0), Decimal(0), 0))
        window = bounds[scope.window]
        statuses.append(ScopeStatus(scope, window, money(settled, currency), money(held, currency), holds))
    return statuses
