"""Requests the hostile-input drill (bench/drills/hostile.py) found answered with 503 ``internal_error`` or
``budget_unavailable``: each is now refused with a 4xx in the provider's error shape, or served, never failed.

A real gateway, real PostgreSQL, the fake upstream.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx2 as httpx
import pytest

from tests.e2e.gateway_harness import AgentKey, GatewayHarness, make_agent, set_model_price
from tests.integration.conftest import Cli

pytestmark = pytest.mark.integration

CHAT = "/openai/v1/chat/completions"


@pytest.fixture
def gateway(database_url: str, cli: Cli) -> Iterator[GatewayHarness]:
    set_model_price(cli, "gpt-test", "1000", "2000")
    with GatewayHarness(database_url) as gw:
        yield gw


@pytest.fixture
def agent(gateway: GatewayHarness, cli: Cli) -> AgentKey:
    created = make_agent(cli, "hostile", limit="5.00")
    gateway.refresh()
    return created


def send(gateway: GatewayHarness, agent: AgentKey, path: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}{path}",
        content=body,
        headers={"Authorization": f"Bearer {agent.api_key}", "Content-Type": "application/json", **headers},
        timeout=30,
    )


def chat(content: bytes = b'"hello"', extra: bytes = b"") -> bytes:
    return b'{"model":"gpt-test","messages":[{"role":"user","content":' + content + b"}]" + extra + b"}"


def assert_refused(reply: httpx.Response, status: int, reason: str) -> None:
    assert reply.status_code == status, reply.text
    assert reply.headers["x-caracal-deny-reason"] == reason
    assert reply.json()["error"]["code"] == reason


@pytest.mark.parametrize(
    "body",
    [
        chat(b'"\\ud800"'),  # a lone surrogate, escaped
        chat(b'"\\udc00\\ud800"'),  # surrogates in the wrong order
        chat(b'"\xed\xa0\x80"'),  # a surrogate encoded as bytes (CESU-8, not UTF-8)
        chat(b'"hi"', b',"tools":[{"type":"function","function":{"name":"\\udfff"}}]'),
        chat(b'"hi"', b',"\\ud800":1'),  # in a key
        chat(b'"\\ud800"', b',"stream":true'),
    ],
)
def test_a_body_with_a_lone_surrogate_is_invalid_json(
    gateway: GatewayHarness, agent: AgentKey, body: bytes
) -> None:
    assert_refused(send(gateway, agent, CHAT, body), 400, "invalid_json")
    target = {"X-Caracal-Target-URL": f"http://127.0.0.1:{gateway.upstream_port}/v1/chat/completions"}
    assert_refused(send(gateway, agent, "/proxy", body, **target), 400, "invalid_json")
    assert gateway.fake.requests == []


def test_an_output_limit_too_large_to_price_is_refused(gateway: GatewayHarness, agent: AgentKey) -> None:
    huge = b"1" + b"0" * 30
    assert_refused(send(gateway, agent, CHAT, chat(extra=b',"max_tokens":' + huge)), 400, "invalid_request")
    body = b'{"model":"gpt-test","input":"hi","max_output_tokens":' + huge + b"}"
    assert_refused(send(gateway, agent, "/openai/v1/responses", body), 400, "invalid_request")
    assert gateway.fake.requests == []


def test_an_output_limit_beyond_every_budget_is_clamped_like_any_unaffordable_one(
    gateway: GatewayHarness, agent: AgentKey
) -> None:
    # 2**63 tokens: a hold Money can hold, but beyond the budget counters' exact range (and every limit)
    for extra in (b',"max_tokens":9223372036854775808', b',"n":128,"max_tokens":1000000000000000000'):
        reply = send(gateway, agent, CHAT, chat(extra=extra))
        assert reply.status_code == 200, reply.text
        forwarded = gateway.fake.last.json()
        assert 0 < forwarded["max_tokens"] * forwarded.get("n", 1) <= 5 / 0.002


@pytest.mark.parametrize("target", ["http://[::1/", "http://[::1", "https://[/x"])
def test_a_target_url_that_does_not_parse_is_refused(
    gateway: GatewayHarness, agent: AgentKey, target: str
) -> None:
    assert_refused(
        send(gateway, agent, "/proxy", b"{}", **{"X-Caracal-Target-URL": target}), 400, "invalid_target"
    )
