"""The gateway's cache of agents, credentials, policies, allowlists and prices.

The request path never queries PostgreSQL: it reads an immutable :class:`Snapshot`, reloaded whole every
``cache_refresh_seconds`` in a worker thread. A change made with the CLI (a new agent, a suspension, a
revoked key, a policy or price) therefore takes effect within one refresh period. When a reload fails the
previous snapshot keeps serving and the cache reports ``degraded``; once the last good load is older than
``cache_max_staleness_seconds`` the cache refuses to serve (503 ``cache_stale``): stale enough that a
revoked key or a suspended agent must not be trusted any longer. Before the first load it serves nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

from caracald.budget.base import Scope
from caracald.core.agents import Agent
from caracald.core.allowlist import Allowlist, AllowlistRule
from caracald.core.errors import CaracalError
from caracald.core.policy import PolicyVersion
from caracald.core.pricebook import Pricebook
from caracald.gateway.errors import Denied
from caracald.store.database import Database
from caracald.store.gateway import StoreSnapshot, load_snapshot

log = logging.getLogger(__name__)

CacheState = Literal["ok", "degraded", "unavailable"]

#: Delegation chains deeper than this are cut (the store refuses cycles; this guards against them anyway).
MAX_CHAIN_DEPTH = 64

#: Allowlist decisions one snapshot remembers (then it forgets them all and starts again).
ALLOW_CACHE_SIZE = 10_000


class SnapshotSource(Protocol):
    """Store access for the cache: one consistent read of everything (blocking; run in a thread)."""

    def load_snapshot(self) -> StoreSnapshot: ...


class PostgresSnapshotSource:
    def __init__(self, db: Database) -> None:
        self._db = db

    def load_snapshot(self) -> StoreSnapshot:
        with self._db.read() as conn:
            return load_snapshot(conn)


@dataclass(frozen=True, slots=True)
class Snapshot:
    agents: Mapping[uuid.UUID, Agent]
    credentials: Mapping[str, tuple[uuid.UUID, bytes]]
    policies: Mapping[uuid.UUID, tuple[PolicyVersion, ...]]
    allowlists: Mapping[uuid.UUID, Allowlist]
    pricebook: Pricebook
    loaded_at: datetime
    _scopes: dict[uuid.UUID, tuple[Scope, ...]] = field(default_factory=dict, repr=False, compare=False)
    _allowed: dict[tuple[uuid.UUID, str], bool] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, raw: StoreSnapshot, loaded_at: datetime) -> Snapshot:
        policies: dict[uuid.UUID, list[PolicyVersion]] = {}
        for version in raw.policies:
            if version.is_active:
                policies.setdefault(version.agent_id, []).append(version)
        rules: dict[uuid.UUID, list[AllowlistRule]] = {}
        for entry in raw.allowlists:
            try:
                rule = AllowlistRule(str(entry.allowlist_id), entry.pattern, entry.pattern_type)
            except CaracalError as exc:  # stored patterns were checked on entry; skip one that fails now
                log.error("skipping allowlist entry %s: %s", entry.allowlist_id, exc)
                continue
            rules.setdefault(entry.agent_id, []).append(rule)
        return cls(
            agents={a.agent_id: a for a in raw.agents},
            credentials=dict(raw.credentials),
            policies={k: tuple(v) for k, v in policies.items()},
            allowlists={k: Allowlist(v) for k, v in rules.items()},
            pricebook=raw.pricebook,
            loaded_at=loaded_at,
        )

    def chain(self, agent_id: uuid.UUID) -> list[Agent]:
        """The agent followed by its delegating ancestors, nearest first (as ``agents.ancestors``)."""
        chain: list[Agent] = []
        seen: set[uuid.UUID] = set()
        current = self.agents.get(agent_id)
        while current is not None and current.agent_id not in seen and len(chain) <= MAX_CHAIN_DEPTH:
            chain.append(current)
            seen.add(current.agent_id)
            current = self.agents.get(current.parent_id) if current.parent_id else None
        return chain

    def scopes(self, agent_id: uuid.UUID) -> tuple[Scope, ...]:
        """Every active policy of the agent and of every ancestor: what one request must fit."""
        cached = self._scopes.get(agent_id)
        if cached is not None:
            return cached
        scopes = tuple(
            Scope(policy_id=p.policy_id, agent_id=p.agent_id, limit=p.terms.limit, window=p.terms.window)
            for agent in self.chain(agent_id)
            for p in self.policies.get(agent.agent_id, ())
        )
        self._scopes[agent_id] = scopes
        return scopes

    def allowlist(self, agent_id: uuid.UUID) -> Allowlist:
        return self.allowlists.get(agent_id) or Allowlist()

    def allows(self, agent_id: uuid.UUID, url: str) -> bool:
        """Whether the agent's allowlist allows ``url`` (``ValidationError`` when it is not a full URL).

        Decisions are remembered for the life of this snapshot (a reload starts afresh), up to
        ``ALLOW_CACHE_SIZE`` of them: an agent calls the same few endpoints over and over.
        """
        key = (agent_id, url)
        allowed = self._allowed.get(key)
        if allowed is None:
            allowed = self.allowlist(agent_id).allows(url)
            if len(self._allowed) >= ALLOW_CACHE_SIZE:
                self._allowed.clear()
            self._allowed[key] = allowed
        return allowed

    def sizes(self) -> dict[str, int]:
        return {
            "agents": len(self.agents),
            "credentials": len(self.credentials),
            "policies": sum(len(v) for v in self.policies.values()),
            "allowlist_rules": sum(len(v) for v in self.allowlists.values()),
            "token_prices": len(self.pricebook.token_prices),
            "resource_prices": len(self.pricebook.resource_prices),
        }


def _utcnow() -> datetime:
    return datetime.now(UTC)


class PolicyCache:
    def __init__(
        self,
        source: SnapshotSource,
        *,
        refresh_seconds: float,
        max_staleness_seconds: float,
        clock: Callable[[], datetime] = _utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self.refresh_seconds = refresh_seconds
        self.max_staleness_seconds = max_staleness_seconds
        self._clock = clock
        self._monotonic = monotonic
        self._snapshot: Snapshot | None = None
        self._loaded_mono: float | None = None
        self.store_reachable = False
        self.last_error: str | None = None
        self.loads = 0
        self.failures = 0

    async def refresh(self) -> bool:
        """Reload the snapshot; keep the previous one when the store cannot be read."""
        try:
            raw = await asyncio.to_thread(self._source.load_snapshot)
            snapshot = Snapshot.build(raw, self._clock())
        except Exception as exc:
            self.failures += 1
            self.store_reachable = False
            self.last_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.warning("cache refresh failed, serving the previous snapshot: %s", self.last_error)
            return False
        self._snapshot = snapshot
        self._loaded_mono = self._monotonic()
        self.store_reachable = True
        self.last_error = None
        self.loads += 1
        return True

    async def run(self) -> None:
        """Refresh forever (until cancelled)."""
        while True:
            await asyncio.sleep(self.refresh_seconds)
            await self.refresh()

    @property
    def age_seconds(self) -> float | None:
        return None if self._loaded_mono is None else self._monotonic() - self._loaded_mono

    @property
    def state(self) -> CacheState:
        age = self.age_seconds
        if age is None or age > self.max_staleness_seconds:
            return "unavailable"
        return "ok" if self.store_reachable else "degraded"

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def current(self) -> Snapshot:
        """The snapshot to decide with, or a 503 when there is none fresh enough."""
        age = self.age_seconds
        if self._snapshot is None or age is None:
            raise Denied(503, "cache_unavailable", "the gateway has not loaded its policies yet")
        if age > self.max_staleness_seconds:
            raise Denied(
                503,
                "cache_stale",
                f"the policy store has been unreachable for {age:.0f}s, beyond the allowed staleness",
            )
        return self._snapshot
