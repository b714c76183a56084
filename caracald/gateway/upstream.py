"""Talking to the providers: header hygiene, the provider's key, the pooled client.

Requests go out with the agent's Caracal credential removed, hop-by-hop and forwarding headers removed
(including any header the client names in ``Connection``), every ``X-Caracal-*`` header removed, and the
upstream's own key injected as its ``auth`` setting says. Redirects are never followed (a redirect could lead
outside the allowlist): they are passed back. The client (:mod:`caracald.gateway.http_client`) asks for gzip,
deflate and brotli and decodes them, so those answers lose their ``Content-Encoding`` on the way back (an
answer in another encoding passes as it came); the gateway frames every answer itself (its own
``Content-Length``, or chunks for a stream).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from caracald.gateway.http_client import Header, UpstreamClient, UpstreamResponse
from caracald.runtime.config import GatewayConfig, UpstreamConfig

#: Hop-by-hop headers (RFC 9110 7.6.1, and the older ones still seen): each connection has its own.
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
_REQUEST_DROP: Final = _HOP_BY_HOP | {
    b"proxy-authorization",
    b"host",
    b"content-length",
    b"accept-encoding",  # the client asks for what it decodes
    b"expect",
    b"authorization",  # the agent's Caracal key (or the provider's own, injected below)
    b"x-api-key",
    b"cookie",
    b"forwarded",
    b"x-forwarded-for",
    b"x-forwarded-host",
    b"x-forwarded-proto",
    b"x-forwarded-port",
    b"x-real-ip",
}
_RESPONSE_DROP: Final = _HOP_BY_HOP | {
    b"set-cookie",
    b"content-length",  # the gateway frames what it sends back itself
}
#: Dropped too from an answer the client decoded: it described the encoded bytes.
_DECODED_DROP: Final = _RESPONSE_DROP | {b"content-encoding"}


def _connection_listed(headers: Iterable[Header]) -> set[bytes]:
    listed: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            listed.update(token.strip().lower() for token in value.split(b","))
    return listed


def upstream_headers(client_headers: Sequence[Header], upstream: UpstreamConfig | None) -> list[Header]:
    """The client's headers fit to go to the provider (names lower case, as the server gave them), with the
    provider's key."""
    drop = _REQUEST_DROP | _connection_listed(client_headers)
    headers = [
        (name, value)
        for name, value in client_headers
        if name not in drop and not name.startswith(b"x-caracal-")
    ]
    if upstream is not None and upstream.api_key is not None:
        key = upstream.api_key.get_secret_value().encode("latin-1")
        if upstream.auth.lower() == "bearer":
            headers.append((b"authorization", b"Bearer " + key))
        else:
            headers.append((upstream.auth.lower().encode("latin-1"), key))
    return headers


def client_headers(upstream_response: UpstreamResponse) -> list[Header]:
    """The upstream's answer headers fit to pass back to the client (names lower case)."""
    raw = upstream_response.headers
    drop = (_DECODED_DROP if upstream_response.decoded else _RESPONSE_DROP) | _connection_listed(raw)
    lowered = [(name.lower(), value) for name, value in raw]
    return [(name, value) for name, value in lowered if name not in drop]


def make_client(config: GatewayConfig) -> UpstreamClient:
    return UpstreamClient(
        connect_timeout=min(30.0, config.upstream_timeout_seconds),
        read_timeout=config.upstream_timeout_seconds,
        total_timeout=config.upstream_timeout_seconds,
    )
