"""Header hygiene on the way to the provider and back."""

from __future__ import annotations

from typing import Any

import pytest

from caracald.gateway.http_client import UpstreamResponse
from caracald.gateway.upstream import client_headers, upstream_headers
from caracald.runtime.config import UpstreamConfig

CLIENT = [
    (b"host", b"gateway:8443"),
    (b"authorization", b"Bearer ck_live_agent_key"),
    (b"x-api-key", b"ck_live_agent_key"),
    (b"content-type", b"application/json"),
    (b"content-length", b"42"),
    (b"accept-encoding", b"identity"),
    (b"connection", b"keep-alive, x-secret-hop"),
    (b"x-secret-hop", b"1"),
    (b"x-caracal-target-url", b"https://elsewhere"),
    (b"x-forwarded-for", b"10.0.0.1"),
    (b"cookie", b"session=1"),
    (b"openai-beta", b"assistants=v2"),
]


def test_the_agents_credential_and_hop_headers_stay_behind_and_the_providers_key_goes() -> None:
    sent = upstream_headers(CLIENT, UpstreamConfig(base_url="https://api.example", api_key="sk-provider"))
    assert sent == [
        (b"content-type", b"application/json"),
        (b"openai-beta", b"assistants=v2"),
        (b"authorization", b"Bearer sk-provider"),
    ]


def test_a_key_in_a_named_header() -> None:
    config = UpstreamConfig(base_url="https://api.example", api_key="sk-ant", auth="X-Api-Key")
    sent = upstream_headers([(b"x-api-key", b"ck_live_agent_key")], config)
    assert sent == [(b"x-api-key", b"sk-ant")]


def test_without_a_provider_key_nothing_is_added() -> None:
    assert upstream_headers(CLIENT[:3], UpstreamConfig(base_url="https://api.example")) == []


@pytest.mark.parametrize("key", ["sk-1\r\nX-Injected: 1", "sk-\x00", "sk-é"])
def test_a_provider_key_that_would_break_the_header_is_refused_at_configuration(key: str) -> None:
    with pytest.raises(ValueError, match="printable ASCII") as raised:
        UpstreamConfig(base_url="https://api.example", api_key=key)
    assert key not in str(raised.value)  # the error does not print the key


def _response(headers: list[tuple[bytes, bytes]], *, decoded: bool) -> UpstreamResponse:
    connection: Any = None  # headers only: the body is never read here
    return UpstreamResponse(connection, 200, headers, decoded)


ANSWER = [
    (b"Content-Type", b"text/event-stream"),
    (b"Content-Length", b"120"),
    (b"Content-Encoding", b"gzip"),
    (b"Connection", b"keep-alive, X-Hop"),
    (b"X-Hop", b"1"),
    (b"Set-Cookie", b"provider=1"),
    (b"X-Request-Id", b"req_123"),
]


def test_a_decoded_answer_loses_its_encoding_and_length() -> None:
    assert client_headers(_response(ANSWER, decoded=True)) == [
        (b"content-type", b"text/event-stream"),
        (b"x-request-id", b"req_123"),
    ]


def test_an_answer_passed_as_it_came_keeps_its_encoding() -> None:
    assert client_headers(_response(ANSWER, decoded=False)) == [
        (b"content-type", b"text/event-stream"),
        (b"content-encoding", b"gzip"),
        (b"x-request-id", b"req_123"),
    ]
