"""Relaying an upstream answer as it arrives: an ASGI response that never buffers the whole body.

With a :class:`~caracald.gateway.streaming.StreamMeter` the body is an SSE stream relayed event by event;
when the stream's cost bound passes its hold, Caracal sends a final error event in the provider's shape and
closes the upstream connection, so the provider stops generating. Without a meter the bytes pass through as
they come (and an upstream that breaks off leaves the answer unfinished: the server drops the connection, so
the client cannot take a part for the whole). A watcher on the client's side notices a disconnect even while
no byte is being written; the upstream is then closed at once. Whatever happens, ``on_end`` runs exactly once
with what was relayed, in a task of its own (a cancelled request still gets settled).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from starlette.types import Receive, Scope, Send

from caracald.gateway.errors import Flavor, stream_error_event
from caracald.gateway.http_client import UpstreamError, UpstreamResponse
from caracald.gateway.streaming import EventTooLargeError, SseSplitter, StreamMeter

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RelayOutcome:
    status: int
    completed: bool = False
    cut: bool = False
    client_disconnected: bool = False
    upstream_error: str | None = None
    bytes_relayed: int = 0


class Relay:
    def __init__(
        self,
        upstream: UpstreamResponse,
        headers: list[tuple[bytes, bytes]],
        *,
        meter: StreamMeter | None,
        flavor: Flavor,
        on_end: Callable[[RelayOutcome], Coroutine[Any, Any, None]],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    ) -> None:
        self.upstream = upstream
        self.status = upstream.status
        self.headers = headers
        self.meter = meter
        self.flavor = flavor
        self.on_end = on_end
        self.spawn = spawn

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = RelayOutcome(self.upstream.status)
        pump = asyncio.ensure_future(self._pump(send, outcome))
        watch = asyncio.ensure_future(self._watch(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():
                outcome.client_disconnected = True
        finally:
            for task in (pump, watch):
                task.cancel()
            results = await asyncio.gather(pump, watch, return_exceptions=True)
            if isinstance(results[0], Exception):
                outcome.upstream_error = outcome.upstream_error or repr(results[0])
            if not outcome.completed:
                self.upstream.close()  # stop the provider: nobody reads the rest
            else:
                self.upstream.release()
            await asyncio.shield(self.spawn(self.on_end(outcome)))

    @staticmethod
    async def _watch(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    async def _body(self, send: Send, data: bytes, outcome: RelayOutcome) -> None:
        outcome.bytes_relayed += len(data)
        await send({"type": "http.response.body", "body": data, "more_body": True})

    async def _cut(self, send: Send, outcome: RelayOutcome, status: int, reason: str, message: str) -> None:
        outcome.cut = True
        await self._body(send, stream_error_event(self.flavor, status, reason, message), outcome)

    async def _pump(self, send: Send, outcome: RelayOutcome) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        splitter = SseSplitter() if self.meter is not None else None
        try:
            async for chunk in self.upstream.iter_chunks():
                if splitter is None or self.meter is None:
                    await self._body(send, chunk, outcome)
                    continue
                for event in splitter.feed(chunk):
                    seen = self.meter.observe(event)
                    if seen.over_hold:
                        await self._cut(
                            send, outcome, 402, "hold_exhausted", "the stream used up its budget hold"
                        )
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                        return
                    if seen.forward:
                        await self._body(send, event, outcome)
            if splitter is not None and self.meter is not None:
                rest = splitter.rest()
                if rest.strip():
                    self.meter.observe(rest)
                    await self._body(send, rest, outcome)
            outcome.completed = True
        except EventTooLargeError as exc:
            await self._cut(send, outcome, 502, "upstream_invalid", str(exc))
        except UpstreamError as exc:
            outcome.upstream_error = f"{type(exc).__name__}: {exc}"
            log.warning("upstream stream failed: %s", outcome.upstream_error)
            if self.meter is None:
                # Bytes passed through as they came: the client must see the answer broken off too, not a
                # complete one. Left unfinished, the server drops the connection without its last chunk.
                return
            await self._cut(send, outcome, 502, "upstream_failed", "the provider's stream broke off")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
