"""Keeps the shared budget counters loaded: a Redis that lost its data is rebuilt from the ledger.

The gateway runs the Redis backend with ``require_loaded``: admission refuses (503, fail closed) while the
counters lack the marker that ``rebuild`` sets, because empty counters would admit any spend again. This
guard checks the marker at start and then every few seconds; when it is missing (a new deployment, or a
Redis restarted without its data) one gateway (a lock in Redis elects it) recomputes every active policy's
settled spend from the ledger, as ``caracal budget rebuild`` does, and the others wait for the marker.

What the rebuild cannot know: events still on their way to the ledger (the ledger writer's lag) and the
holds in flight when Redis lost them (their settlements are still recorded in the ledger, and the next
rebuild counts them). Both are small and short-lived next to a window's spend.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from datetime import UTC, datetime

from caracald.admin import budget as budget_admin
from caracald.budget.redis_backend import RedisBudget
from caracald.core.money import Money
from caracald.store.database import Database

log = logging.getLogger(__name__)

#: How long one rebuild may hold the lock before another gateway may take over.
LOCK_SECONDS = 300.0


class CounterGuard:
    def __init__(self, budget: RedisBudget, db: Database, *, poll_seconds: float = 2.0) -> None:
        self.budget = budget
        self.db = db
        self.poll_seconds = poll_seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.rebuilds = 0

    async def ensure_loaded(self) -> bool:
        """Rebuild the counters if they hold no data and no other gateway is at it; whether this one did."""
        if await self.budget.loaded():
            return False
        if not await self.budget.lock_rebuild(self.owner, LOCK_SECONDS):
            log.info("budget counters not loaded: another gateway is rebuilding them")
            return False
        try:
            if await self.budget.loaded():  # rebuilt while this one waited for the lock
                return False
            log.warning(
                "budget counters hold no data (new, or Redis lost it): rebuilding them from the ledger"
            )
            totals = await asyncio.to_thread(self._ledger_totals)
            await self.budget.rebuild(totals)
            self.rebuilds += 1
            log.warning("budget counters rebuilt from the ledger: %d counter(s)", len(totals))
            return True
        finally:
            await self.budget.unlock_rebuild(self.owner)

    def _ledger_totals(self) -> dict[tuple[uuid.UUID, str], Money]:
        scopes = budget_admin.all_scopes(self.db)
        return budget_admin.ledger_totals(self.db, scopes, datetime.now(UTC))

    async def run(self) -> None:
        while True:
            try:
                await self.ensure_loaded()
            except Exception as exc:  # Redis or PostgreSQL unreachable: admission fails closed meanwhile
                log.warning("budget counters not checked: %s", exc)
            await asyncio.sleep(self.poll_seconds)
