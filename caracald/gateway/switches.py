"""The deny-all switch: operators refuse every request on every replica within a second.

Two sources, either of which turns it on: the ``gateway_switches`` row ``deny_all`` in PostgreSQL (the
embedded and the distributed deployment) and, in distributed mode, the Redis key ``caracal:gateway:deny_all``
(any value but ``0`` or empty means on), which keeps working while PostgreSQL is down. Each replica polls
them every ``POLL_SECONDS``. A source that cannot be read keeps its last known value: an outage neither
turns the switch on nor off.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final, Protocol

from caracald.store.database import Database
from caracald.store.gateway import DENY_ALL, get_switch

log = logging.getLogger(__name__)

POLL_SECONDS: Final = 0.5
REDIS_KEY: Final = "caracal:gateway:deny_all"


class SwitchSource(Protocol):
    name: str

    async def deny_all(self) -> bool:
        """Whether this source says deny everything; raises when it cannot be read."""
        ...


class PostgresSwitch:
    name = "postgres"

    def __init__(self, db: Database) -> None:
        self._db = db

    def _read(self) -> bool:
        with self._db.read() as conn:
            switch = get_switch(conn, DENY_ALL)
        return bool(switch and switch.enabled)

    async def deny_all(self) -> bool:
        return await asyncio.to_thread(self._read)


class RedisSwitch:
    name = "redis"

    def __init__(self, url: str, key: str = REDIS_KEY) -> None:
        from redis.asyncio import Redis

        self._client = Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._key = key

    async def deny_all(self) -> bool:
        value = await self._client.get(self._key)
        return value not in (None, b"", b"0")

    async def close(self) -> None:
        await self._client.aclose()


class DenyAllSwitch:
    """The combined switch the request path reads (a plain attribute: no I/O per request)."""

    def __init__(self, sources: list[SwitchSource], poll_seconds: float = POLL_SECONDS) -> None:
        self._sources = sources
        self.poll_seconds = poll_seconds
        self._known: dict[str, bool] = {}
        self.errors: dict[str, str] = {}

    @property
    def on(self) -> bool:
        return any(self._known.values())

    async def poll(self) -> None:
        for source in self._sources:
            try:
                value = await source.deny_all()
            except Exception as exc:
                self.errors[source.name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                continue
            self.errors.pop(source.name, None)
            if value != self._known.get(source.name, False):
                log.warning("deny-all switch %s in %s", "ON" if value else "off", source.name)
            self._known[source.name] = value

    async def run(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(self.poll_seconds)
