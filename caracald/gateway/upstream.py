"""Talking to the providers: one pooled aiohttp session, header hygiene, the provider's key.

Requests go out with the agent's Caracal credential removed, hop-by-hop and forwarding headers removed
(including any header the client names in ``Connection``), every ``X-Caracal-*`` header removed, and the
upstream's own key injected as its ``auth`` setting says. Redirects are never followed (a redirect could lead
outside the allowlist): they are passed back. aiohttp asks for gzip, deflate and brotli and decompresses, so
answers lose their ``Content-Encoding`` and ``Content-Length`` on the way back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from caracald.runtime.config import GatewayConfig, UpstreamConfig

_REQUEST_DROP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
        "expect",
        "authorization",
        "x-api-key",
        "cookie",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-real-ip",
    }
)
_RESPONSE_DROP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "set-cookie",
    }
)


def _connection_listed(headers: Iterable[tuple[str, str]]) -> set[str]:
    listed: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            listed.update(token.strip().lower() for token in value.split(","))
    return listed


def upstream_headers(
    client_headers: Sequence[tuple[bytes, bytes]], upstream: UpstreamConfig | None
) -> CIMultiDict[str]:
    decoded = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in client_headers]
    drop = _REQUEST_DROP | _connection_listed(decoded)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in decoded:
        lowered = name.lower()
        if lowered in drop or lowered.startswith("x-caracal-"):
            continue
        headers.add(name, value)
    if upstream is not None and upstream.api_key is not None:
        key = upstream.api_key.get_secret_value()
        if upstream.auth.lower() == "bearer":
            headers["Authorization"] = f"Bearer {key}"
        else:
            headers[upstream.auth] = key
    return headers


def client_headers(upstream_response: aiohttp.ClientResponse) -> list[tuple[str, str]]:
    """The upstream's answer headers fit to pass back to the client."""
    raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in upstream_response.raw_headers]
    drop = _RESPONSE_DROP | _connection_listed(raw)
    return [(k, v) for k, v in raw if k.lower() not in drop]


def make_session(config: GatewayConfig) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=1000,
        limit_per_host=500,
        keepalive_timeout=60,
        ttl_dns_cache=300,
        force_close=False,
    )
    timeout = aiohttp.ClientTimeout(
        total=config.upstream_timeout_seconds,
        sock_connect=min(30.0, config.upstream_timeout_seconds),
        sock_read=config.upstream_timeout_seconds,
    )
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=True, trust_env=False, raise_for_status=False
    )


async def send(
    session: aiohttp.ClientSession, method: str, url: str, headers: CIMultiDict[str], body: bytes
) -> aiohttp.ClientResponse:
    """Send the request and return once the answer's headers arrived (the body is read by the caller)."""
    return await session.request(
        method, URL(url, encoded=True), headers=headers, data=body if body else None, allow_redirects=False
    )
