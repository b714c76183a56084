"""Calls through the gateways, as agents make them, with every answer recorded.

Each call is ``POST /u/search/item/<n>`` on a gateway: the generic route to the fake provider, priced at a
flat amount per call, so that what a budget affords is an exact count. ``burst`` fires a list of calls at once
(all connections open, then released together); :class:`SteadyLoad` keeps a number of callers busy on a thread
of its own until stopped, spreading them over the gateways and moving on to the next gateway when one does not
answer (a killed process refuses connections).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from bench.drills.deployment import SEARCH, Agent

NO_ANSWER = 0  # the status recorded when the gateway did not answer (refused, reset, timed out)


@dataclass(frozen=True, slots=True)
class Reply:
    agent: Agent
    gateway: int
    status: int
    request_id: str | None
    reason: str | None
    started: float  # time.monotonic() when sent
    seconds: float

    @property
    def admitted(self) -> bool:
        return self.status == 200


async def call(session: aiohttp.ClientSession, url: str, gateway: int, agent: Agent) -> Reply:
    started = time.monotonic()
    try:
        async with session.post(
            f"{url}/u/{SEARCH}/item/{uuid.uuid4().hex[:12]}",
            data=b"{}",
            headers={"Authorization": f"Bearer {agent.api_key}", "Content-Type": "application/json"},
        ) as answer:
            await answer.read()
            return Reply(
                agent,
                gateway,
                answer.status,
                answer.headers.get("X-Caracal-Request-Id"),
                answer.headers.get("X-Caracal-Deny-Reason"),
                started,
                time.monotonic() - started,
            )
    except (TimeoutError, aiohttp.ClientError, OSError):
        return Reply(agent, gateway, NO_ANSWER, None, None, started, time.monotonic() - started)


def _session(timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=timeout),
    )


async def _burst(urls: Sequence[str], agents: Sequence[Agent]) -> list[Reply]:
    async with _session(180) as session:
        go = asyncio.Event()

        async def one(index: int, agent: Agent) -> Reply:
            await go.wait()
            return await call(session, urls[index % len(urls)], index % len(urls), agent)

        tasks = [asyncio.ensure_future(one(i, agent)) for i, agent in enumerate(agents)]
        await asyncio.sleep(0.05)
        go.set()
        return await asyncio.gather(*tasks)


def burst(urls: Sequence[str], agents: Sequence[Agent]) -> list[Reply]:
    """One call per entry of ``agents``, all at once, the i-th to gateway i mod len(urls)."""
    return asyncio.run(_burst(urls, agents))


class SteadyLoad:
    """``callers`` concurrent callers, each calling as soon as its previous call is answered."""

    def __init__(self, urls: Sequence[str], agents: Sequence[Agent], *, callers: int, seed: int = 0) -> None:
        self.urls = list(urls)
        self.agents = list(agents)
        self.callers = callers
        self.replies: list[Reply] = []
        self._random = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-load", daemon=True)

    def start(self) -> SteadyLoad:
        self._thread.start()
        return self

    def stop(self) -> list[Reply]:
        self._stop.set()
        self._thread.join(120)
        return self.replies

    def since(self, moment: float) -> list[Reply]:
        return [reply for reply in list(self.replies) if reply.started >= moment]

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        turn = itertools.count()
        async with _session(60) as session:

            async def caller() -> None:
                while not self._stop.is_set():
                    index = next(turn) % len(self.urls)
                    agent = self._random.choice(self.agents)
                    reply = await call(session, self.urls[index], index, agent)
                    self.replies.append(reply)
                    if reply.status == NO_ANSWER:
                        await asyncio.sleep(0.05)  # that gateway is down: the next call goes to the next one

            await asyncio.gather(*(caller() for _ in range(self.callers)))


def statuses(replies: Sequence[Reply]) -> Counter[str]:
    """How the calls were answered: ``200``, ``402 budget_exhausted``, ``503 budget_unavailable``..."""
    return Counter(
        "no answer" if r.status == NO_ANSWER else f"{r.status} {r.reason}" if r.reason else str(r.status)
        for r in replies
    )
