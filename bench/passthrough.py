"""The floor for bench/gateway_bench.py: a minimal Starlette pass-through proxy on aiohttp's client.

No checks at all: every request is forwarded to ``$PASSTHROUGH_UPSTREAM`` + its path, the answer streamed
back as it arrives. Run it like the gateway runs (uvicorn, one worker, uvloop and httptools, no access log):

    PASSTHROUGH_UPSTREAM=http://127.0.0.1:9000 uvicorn bench.passthrough:app --port 9001 --no-access-log
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

UPSTREAM = os.environ.get("PASSTHROUGH_UPSTREAM", "http://127.0.0.1:9000").rstrip("/")
DROP_IN = frozenset({"host", "content-length", "connection", "accept-encoding", "transfer-encoding"})
DROP_OUT = frozenset({"content-length", "content-encoding", "transfer-encoding", "connection"})
session: aiohttp.ClientSession | None = None


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global session
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000), auto_decompress=True)
    yield
    await session.close()


async def forward(request: Request) -> StreamingResponse:
    assert session is not None
    headers = {k: v for k, v in request.headers.items() if k not in DROP_IN}
    url = UPSTREAM + request.url.path + (f"?{request.url.query}" if request.url.query else "")
    upstream = await session.request(request.method, url, headers=headers, data=await request.body())

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.content.iter_any():
                yield chunk
        finally:
            upstream.release()

    out = {k: v for k, v in upstream.headers.items() if k.lower() not in DROP_OUT}
    return StreamingResponse(body(), status_code=upstream.status, headers=out)


app = Starlette(
    routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])],
    lifespan=lifespan,
)
