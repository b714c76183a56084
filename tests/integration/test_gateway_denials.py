"""Everything the gateway refuses, and how: a real gateway, real PostgreSQL, the fake upstream.

Each refusal is checked for its status, its ``X-Caracal-Deny-Reason`` and ``X-Caracal-Request-Id``
headers, its body in the calling provider's error shape, and for never reaching the provider.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import openai
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from caracald.budget.base import AdmissionRequest
from caracald.budget.redis_backend import RedisBudget
from caracald.core.events import MeteringEvent
from caracald.gateway.journal import ChargeJournal
from caracald.gateway.sinks import MemorySink
from caracald.runtime.config import UpstreamConfig
from caracald.store.database import Database
from caracald.store.gateway import DENY_ALL, set_switch
from tests.e2e.fake_upstream import OPENAI_KEY
from tests.e2e.gateway_harness import (
    AgentKey,
    GatewayHarness,
    make_agent,
    set_model_price,
    set_request_price,
)
from tests.harness.ports import free_port
from tests.harness.postgres import PostgresService
from tests.integration.conftest import Cli

pytestmark = pytest.mark.integration

INPUT, OUTPUT = Decimal("0.001"), Decimal("0.002")
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20}
MESSAGE = {"model": "claude-test", "max_tokens": 20, "messages": [{"role": "user", "content": "hello"}]}


def prices(cli: Cli) -> None:
    set_model_price(cli, "gpt-test", "1000", "2000")
    set_model_price(cli, "claude-test", "1000", "2000")
    set_request_price(cli, "http://127.0.0.1:*/search-api/priced/*", "0.25")


@pytest.fixture
def gateway(database_url: str, cli: Cli) -> Iterator[GatewayHarness]:
    prices(cli)
    with GatewayHarness(database_url, max_body_bytes=4096) as gw:
        yield gw


@pytest.fixture
def agent(gateway: GatewayHarness, cli: Cli) -> AgentKey:
    created = make_agent(cli, "agent-one", limit="5.00")
    gateway.refresh()
    return created


def post(gateway: GatewayHarness, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
    headers = kwargs.pop("headers", {})
    if key is not None and isinstance(headers, dict):
        headers = {"Authorization": f"Bearer {key}", **headers}
    return httpx.post(f"{gateway.url}{path}", headers=headers, timeout=30, **kwargs)


def assert_denied(response: httpx.Response, status: int, reason: str, shape: str = "openai") -> None:
    assert response.status_code == status, response.text
    assert response.headers["x-caracal-deny-reason"] == reason
    assert len(response.headers["x-caracal-request-id"]) == 36
    body = response.json()
    if shape == "anthropic":
        assert body["type"] == "error"
        assert set(body["error"]) == {"type", "message"}
        assert reason in body["error"]["message"]
    else:
        assert set(body["error"]) == {"message", "type", "code"}
        assert body["error"]["code"] == reason


def denial_reasons(gateway: GatewayHarness, agent: AgentKey) -> list[str]:
    gateway.settled()
    deadline = time.monotonic() + 5
    while True:
        rows = gateway.ledger(agent.agent_id, "denial")
        if rows or time.monotonic() > deadline:
            return [r["metadata"]["deny_reason"] for r in rows]
        time.sleep(0.05)


# -- 401 ------------------------------------------------------------------------------------------------------


def test_unauthenticated_requests_get_401_in_the_provider_shape(
    gateway: GatewayHarness, agent: AgentKey
) -> None:
    key_id = agent.api_key.split("_")[1]
    cases: list[tuple[dict[str, str] | list[tuple[str, str]], str]] = [
        ({}, "missing_credentials"),
        ({"Authorization": "Bearer not-a-key"}, "invalid_credentials"),
        ({"Authorization": "Basic abc"}, "invalid_credentials"),
        ({"Authorization": "Bearer ck_0123456789abcdef01_secret"}, "invalid_credentials"),
        ({"Authorization": f"Bearer ck_{key_id}_wrong-secret"}, "invalid_credentials"),
        ({"Authorization": f"Bearer {agent.api_key}", "x-api-key": OPENAI_KEY}, "ambiguous_credentials"),
        (
            [("Authorization", f"Bearer {agent.api_key}"), ("Authorization", "Bearer x")],
            "ambiguous_credentials",
        ),
    ]
    for headers, reason in cases:
        assert_denied(post(gateway, "/openai/v1/chat/completions", json=CHAT, headers=headers), 401, reason)
    assert_denied(
        post(gateway, "/anthropic/v1/messages", json=MESSAGE), 401, "missing_credentials", "anthropic"
    )
    assert gateway.fake.requests == []


def test_the_sdks_raise_their_own_authentication_errors(gateway: GatewayHarness) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key="ck_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "invalid_credentials"
    claude = anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key="ck_nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        claude.messages.create(model="claude-test", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert refused.value.response.headers["x-caracal-deny-reason"] == "invalid_credentials"


def test_a_rotated_key_stops_working(gateway: GatewayHarness, agent: AgentKey, cli: Cli) -> None:
    assert post(gateway, "/openai/v1/chat/completions", agent.api_key, json=CHAT).status_code == 200
    cli.ok("agent", "rotate-key", "--agent-id", agent.agent_id)
    gateway.refresh()
    assert_denied(
        post(gateway, "/openai/v1/chat/completions", agent.api_key, json=CHAT), 401, "invalid_credentials"
    )


# -- 403 ------------------------------------------------------------------------------------------------------


def test_suspended_agent_and_suspended_parent(gateway: GatewayHarness, agent: AgentKey, cli: Cli) -> None:
    child = make_agent(cli, "child-agent", limit="1.00", parent=agent.agent_id)
    cli.ok("agent", "suspend", "--agent-id", agent.agent_id, "--reason", "incident")
    gateway.refresh()
    assert_denied(
        post(gateway, "/openai/v1/chat/completions", agent.api_key, json=CHAT), 403, "agent_suspended"
    )
    assert_denied(
        post(gateway, "/openai/v1/chat/completions", child.api_key, json=CHAT), 403, "ancestor_suspended"
    )
    assert gateway.fake.requests == []
    assert denial_reasons(gateway, agent) == ["agent_suspended"]


def test_allowlist_miss(gateway: GatewayHarness, cli: Cli) -> None:
    narrow = make_agent(cli, "narrow", allow=("http://127.0.0.1:*/v1/embeddings",))
    gateway.refresh()
    assert_denied(
        post(gateway, "/openai/v1/chat/completions", narrow.api_key, json=CHAT), 403, "not_allowlisted"
    )
    target = "http://127.0.0.1:1/elsewhere"
    reply = post(gateway, "/proxy", narrow.api_key, headers={"X-Caracal-Target-URL": target})
    assert_denied(reply, 403, "not_allowlisted")
    assert gateway.fake.requests == []
    assert denial_reasons(gateway, narrow) == ["not_allowlisted", "not_allowlisted"]


def test_agent_without_policy(gateway: GatewayHarness, cli: Cli) -> None:
    free = make_agent(cli, "no-budget", limit=None)
    gateway.refresh()
    assert_denied(post(gateway, "/openai/v1/chat/completions", free.api_key, json=CHAT), 403, "no_policy")


def test_deny_all_reaches_the_gateway_within_a_second(database_url: str, cli: Cli, db: Database) -> None:
    prices(cli)
    with GatewayHarness(database_url, switch_poll_seconds=0.5) as gateway:
        agent = make_agent(cli, "agent-one")
        gateway.refresh()
        assert post(gateway, "/openai/v1/chat/completions", agent.api_key, json=CHAT).status_code == 200

        def flip(enabled: bool) -> float:
            with db.transaction() as conn:
                set_switch(
                    conn, DENY_ALL, enabled, reason="drill", actor="ops@example.com", now=datetime.now(UTC)
                )
            flipped = time.monotonic()
            want = 403 if enabled else 200
            while post(gateway, "/openai/v1/chat/completions", agent.api_key, json=CHAT).status_code != want:
                assert time.monotonic() - flipped < 1.0, "the switch took more than a second"
                time.sleep(0.02)
            return time.monotonic() - flipped

        assert flip(True) < 1.0
        reply = post(gateway, "/anthropic/v1/messages", agent.api_key, json=MESSAGE)
        assert_denied(reply, 403, "deny_all", "anthropic")
        assert httpx.get(f"{gateway.url}/health").json()["deny_all"] is True
        assert flip(False) < 1.0


# -- 402 ------------------------------------------------------------------------------------------------------


def test_budget_exhausted(gateway: GatewayHarness, cli: Cli) -> None:
    poor = make_agent(cli, "poor", limit="0.10")
    gateway.refresh()
    # The input bound alone (over a hundred tokens at $0.001) is more than $0.10.
    assert_denied(
        post(gateway, "/openai/v1/chat/completions", poor.api_key, json=CHAT), 402, "budget_exhausted"
    )
    # A $0.25 request on a $0.10 budget: the admission refuses it.
    reply = httpx.get(f"{gateway.url}/u/search/priced/x", headers={"x-api-key": poor.api_key})
    assert_denied(reply, 402, "budget_exhausted")
    assert gateway.fake.requests == []
    assert denial_reasons(gateway, poor) == ["budget_exhausted", "budget_exhausted"]


def test_budget_runs_out_across_requests(gateway: GatewayHarness, cli: Cli) -> None:
    agent = make_agent(cli, "spender", limit="1.00")
    gateway.refresh()
    statuses = [
        httpx.get(f"{gateway.url}/u/search/priced/{i}", headers={"x-api-key": agent.api_key}).status_code
        for i in range(6)
    ]
    assert statuses == [200, 200, 200, 200, 402, 402]
    gateway.settled()
    assert gateway.spent(agent.agent_id) == Decimal("1.00")


def test_concurrent_requests_never_overspend(gateway: GatewayHarness, cli: Cli) -> None:
    agent = make_agent(cli, "crowd", limit="2.00")
    gateway.refresh()
    streamed = {**CHAT, "stream": True, "max_tokens": 200}

    async def crowd() -> list[int]:
        async with httpx.AsyncClient(timeout=30, headers={"x-api-key": agent.api_key}) as client:
            flat = [client.get(f"{gateway.url}/u/search/priced/{i}") for i in range(20)]
            streams = [
                client.post(
                    f"{gateway.url}/openai/v1/chat/completions",
                    json=streamed,
                    headers={"X-Fake-Output-Tokens": "150"},
                )
                for _ in range(20)
            ]
            replies = await asyncio.gather(*flat, *streams)
        return [r.status_code for r in replies]

    statuses = asyncio.run(crowd())
    assert set(statuses) == {200, 402}
    gateway.settled()
    assert gateway.spent(agent.agent_id) <= Decimal("2.00")
    assert len(gateway.ledger(agent.agent_id, "settlement")) == statuses.count(200)


def test_a_parent_budget_caps_its_child(gateway: GatewayHarness, cli: Cli) -> None:
    parent = make_agent(cli, "parent", limit="0.50")
    child = make_agent(cli, "child", limit="0.50", parent=parent.agent_id)
    gateway.refresh()
    get = lambda who, i: httpx.get(f"{gateway.url}/u/search/priced/{i}", headers={"x-api-key": who.api_key})  # noqa: E731
    assert get(child, 1).status_code == 200
    assert get(parent, 2).status_code == 200
    assert_denied(get(child, 3), 402, "budget_exhausted")


# -- 422 / 413 / 400 / 404 ------------------------------------------------------------------------------------


def test_unpriced_and_unpriceable_requests(gateway: GatewayHarness, agent: AgentKey) -> None:
    chat = "/openai/v1/chat/completions"
    assert_denied(post(gateway, chat, agent.api_key, json={**CHAT, "model": "gpt-unknown"}), 422, "unpriced")
    assert_denied(post(gateway, "/u/search/free/x", agent.api_key), 422, "unpriced")
    audio = {**CHAT, "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}
    assert_denied(post(gateway, chat, agent.api_key, json=audio), 422, "unpriceable_content")
    searching = {**MESSAGE, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    reply = post(gateway, "/anthropic/v1/messages", agent.api_key, json=searching)
    assert_denied(reply, 422, "unpriceable_tool", "anthropic")
    assert gateway.fake.requests == []


def test_body_too_large(gateway: GatewayHarness, agent: AgentKey) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_denied(
        post(gateway, "/openai/v1/chat/completions", agent.api_key, json=big), 413, "body_too_large"
    )

    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"y" * 1000

    reply = post(gateway, "/anthropic/v1/messages", agent.api_key, content=chunks())
    assert_denied(reply, 413, "body_too_large", "anthropic")
    assert gateway.fake.requests == []


def test_malformed_requests(gateway: GatewayHarness, agent: AgentKey) -> None:
    chat = "/openai/v1/chat/completions"
    assert_denied(post(gateway, chat, agent.api_key, content=b"{not json"), 400, "invalid_json")
    assert_denied(post(gateway, chat, agent.api_key, content=b"[1, 2]"), 400, "invalid_json")
    assert_denied(post(gateway, chat, agent.api_key, content=b'{"model": NaN}'), 400, "invalid_json")
    reply = post(gateway, "/anthropic/v1/messages", agent.api_key, content=b"nope")
    assert_denied(reply, 400, "invalid_json", "anthropic")
    assert_denied(post(gateway, chat, agent.api_key, json={"messages": []}), 400, "invalid_request")
    bad_limit = {**CHAT, "max_tokens": "lots"}
    assert_denied(post(gateway, chat, agent.api_key, json=bad_limit), 400, "invalid_request")
    for path in ("/openai/v1/%2e%2e/admin", "/openai/v1/..%2fadmin", "/openai/v1/a%5cb"):
        assert_denied(post(gateway, path, agent.api_key, json=CHAT), 400, "invalid_path")
    for target in ("ftp://x/y", "http://user:pw@127.0.0.1/x", "not a url", "http://127.0.0.1/a/../b"):
        reply = post(gateway, "/proxy", agent.api_key, headers={"X-Caracal-Target-URL": target})
        assert reply.status_code == 400, (target, reply.text)
    assert gateway.fake.requests == []


def test_unknown_routes(gateway: GatewayHarness, agent: AgentKey) -> None:
    assert_denied(post(gateway, "/v1/chat/completions", agent.api_key, json=CHAT), 404, "unknown_route")
    assert_denied(post(gateway, "/u/nowhere/v1/x", agent.api_key), 404, "unknown_upstream")
    reply = httpx.delete(f"{gateway.url}/openai", headers={"Authorization": f"Bearer {agent.api_key}"})
    assert_denied(reply, 404, "unknown_route")


def test_generic_route_can_be_switched_off(database_url: str, cli: Cli) -> None:
    with GatewayHarness(database_url, generic_route=False) as gateway:
        agent = make_agent(cli, "agent-one")
        gateway.refresh()
        reply = post(
            gateway, "/proxy", agent.api_key, headers={"X-Caracal-Target-URL": "http://127.0.0.1:1/x"}
        )
        assert_denied(reply, 404, "unknown_route")


# -- hostile headers ------------------------------------------------------------------------------------------


def test_hostile_headers_are_not_forwarded(gateway: GatewayHarness, agent: AgentKey) -> None:
    reply = post(
        gateway,
        "/openai/v1/chat/completions",
        agent.api_key,
        json=CHAT,
        headers={
            "Authorization": f"Bearer {agent.api_key}",
            "Host": "evil.example",
            "X-Caracal-Target-URL": "http://evil.example/steal",
            "X-Forwarded-For": "6.6.6.6",
            "Forwarded": "for=6.6.6.6",
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "hop-by-hop",
            "Cookie": "session=1",
            "OpenAI-Beta": "kept",
        },
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-caracal-request-id"]
    sent = {k.lower(): v for k, v in gateway.fake.last.headers.items()}
    assert sent["authorization"] == f"Bearer {OPENAI_KEY}"
    assert sent["host"].startswith("127.0.0.1")
    for name in ("x-caracal-target-url", "x-forwarded-for", "forwarded", "x-secret", "cookie"):
        assert name not in sent, name
    assert sent["openai-beta"] == "kept"
    assert agent.api_key not in str(sent)


def test_output_limit_smuggled_in_a_duplicate_key_is_clamped(gateway: GatewayHarness, cli: Cli) -> None:
    poor = make_agent(cli, "poor", limit="1.00")
    gateway.refresh()
    body = b'{"model": "gpt-test", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "max_tokens": 999999}'
    reply = post(gateway, "/openai/v1/chat/completions", poor.api_key, content=body)
    assert reply.status_code == 200, reply.text
    sent = gateway.fake.last.json()
    assert gateway.fake.last.body.count(b"max_tokens") == 1
    assert sent["max_tokens"] * OUTPUT <= Decimal("1.00")


# -- streams --------------------------------------------------------------------------------------------------


def test_a_stream_is_cut_when_it_uses_up_its_hold(gateway: GatewayHarness, agent: AgentKey) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=agent.api_key, max_retries=0)
    received: list[str] = []

    def consume() -> None:
        for chunk in client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "go on forever"}],
            max_tokens=50,
            stream=True,
            extra_headers={"X-Fake-Ignore-Max": "1", "X-Fake-Output-Tokens": "2000", "X-Fake-Delay": "0.002"},
        ):
            if chunk.choices:
                received.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIError) as caught:
        consume()
    assert "hold_exhausted" in str(caught.value)
    assert 0 < len([text for text in received if text]) <= 50  # never more tokens than the hold pays for
    rows = settled_rows(gateway, agent)
    hold = Decimal(rows[0]["metadata"]["hold"])
    settlement = rows[1]
    assert settlement["metadata"]["stream_cut"] is True
    assert settlement["cost"] == hold
    deadline = time.monotonic() + 5
    while gateway.fake.aborted_streams < 1:  # the provider was told to stop
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_an_honest_stream_runs_to_its_max_tokens_uncut(gateway: GatewayHarness, agent: AgentKey) -> None:
    # 200 tokens of four bytes each: 800 bytes, far more bytes than the hold's 200 tokens
    client = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=agent.api_key, max_retries=0)
    chunks = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "write at length"}],
            max_tokens=200,
            stream=True,
            extra_headers={"X-Fake-Output-Tokens": "200"},
        )
        if chunk.choices
    ]
    assert len([text for text in chunks if text]) == 200
    settlement = settled_rows(gateway, agent)[1]
    assert settlement["output_tokens"] == 200
    assert settlement["metadata"]["stream_cut"] is False


def test_an_anthropic_stream_is_cut_with_an_error_event(gateway: GatewayHarness, agent: AgentKey) -> None:
    client = anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key=agent.api_key, max_retries=0)

    def consume() -> None:
        with client.messages.stream(
            model="claude-test",
            max_tokens=30,
            messages=[{"role": "user", "content": "go"}],
            extra_headers={"X-Fake-Ignore-Max": "1", "X-Fake-Output-Tokens": "500"},
        ) as stream:
            for _ in stream.text_stream:
                pass

    with pytest.raises(anthropic.APIStatusError) as caught:
        consume()
    assert "hold_exhausted" in str(caught.value)
    rows = settled_rows(gateway, agent)
    assert rows[1]["metadata"]["stream_cut"] is True
    assert rows[1]["cost"] <= Decimal(rows[0]["metadata"]["hold"])


def settled_rows(gateway: GatewayHarness, agent: AgentKey) -> list[dict[str, Any]]:
    gateway.settled()
    rows = gateway.ledger(agent.agent_id, "reservation", "settlement")
    assert [r["event_type"] for r in rows] == ["reservation", "settlement"]
    return rows


def test_a_client_that_disconnects_is_charged_for_what_was_streamed(
    gateway: GatewayHarness, agent: AgentKey
) -> None:
    body = {**CHAT, "max_tokens": 400, "stream": True}
    headers = {
        "Authorization": f"Bearer {agent.api_key}",
        "X-Fake-Output-Tokens": "400",
        "X-Fake-Delay": "0.02",
    }
    with httpx.stream(
        "POST", f"{gateway.url}/openai/v1/chat/completions", json=body, headers=headers
    ) as reply:
        assert reply.status_code == 200
        seen = 0
        for line in reply.iter_lines():
            if '"content": "tok "' in line:
                seen += 1
                if seen == 10:
                    break
    rows = settled_rows(gateway, agent)
    reservation, settlement = rows
    hold = Decimal(reservation["metadata"]["hold"])
    assert settlement["metadata"]["client_disconnected"] is True
    assert settlement["metadata"]["usage_source"] == "partial"
    bound = reservation["metadata"]["input_token_bound"]
    assert settlement["input_tokens"] == bound
    assert 40 <= settlement["output_tokens"] < 400 * 4
    assert settlement["cost"] == bound * INPUT + settlement["output_tokens"] * OUTPUT
    assert 0 < settlement["cost"] < hold
    deadline = time.monotonic() + 5
    while gateway.fake.aborted_streams < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)


# -- 503: the budget or the store away ------------------------------------------------------------------------


def test_budget_backend_unavailable_is_503(database_url: str, cli: Cli) -> None:
    prices(cli)
    budget = RedisBudget.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.2)
    with GatewayHarness(database_url, budget=budget) as gateway:
        agent = make_agent(cli, "agent-one")
        gateway.refresh()
        assert_denied(
            post(gateway, "/openai/v1/chat/completions", agent.api_key, json=CHAT), 503, "budget_unavailable"
        )
        health = httpx.get(f"{gateway.url}/health")
        assert health.status_code == 503
        assert health.json()["components"]["budget"]["status"] == "unavailable"
        assert gateway.fake.requests == []


class FlakySink(MemorySink):
    """A sink that refuses every event while ``failing``."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False

    async def emit(self, event: MeteringEvent) -> None:
        if self.failing:
            raise RuntimeError("the sink is down")
        await super().emit(event)


def _priced_calls(
    gateway: GatewayHarness, agent: AgentKey
) -> tuple[Callable[[], Decimal], Callable[[int], httpx.Response]]:
    """What the agent's budget holds now (settled and held), and a call at $0.25 on the priced route."""
    assert gateway.state is not None
    scopes = gateway.state.cache.current().scopes(uuid.UUID(agent.agent_id))

    def spent() -> Decimal:
        (status,) = gateway.run(gateway.budget.status(scopes, datetime.now(UTC)))
        return status.settled.amount + status.held.amount

    def call(i: int) -> httpx.Response:
        return httpx.get(
            f"{gateway.url}/u/search/priced/{i}", headers={"x-api-key": agent.api_key}, timeout=30
        )

    return spent, call


def test_without_a_journal_an_undeliverable_reservation_event_is_503_then_nothing_goes_out_unrecorded(
    database_url: str, cli: Cli
) -> None:
    prices(cli)
    sink = FlakySink()
    with GatewayHarness(database_url, sink=sink, journal=False) as gateway:
        agent = make_agent(cli, "agent-one", limit="5.00")
        gateway.refresh()
        spent, call = _priced_calls(gateway, agent)

        assert call(1).status_code == 200
        gateway.settled()
        assert spent() == Decimal("0.25")
        # The sink breaks while healthy: the call went out with its event in flight; the answer is withheld
        # and the hold charged (the provider may have done the work).
        sink.failing = True
        assert_denied(call(2), 503, "event_sink_unavailable")
        assert len(gateway.fake.requests) == 2
        gateway.settled()
        assert spent() == Decimal("0.50")
        # From now on each call waits for its event: nothing goes out, nothing is charged.
        assert_denied(call(3), 503, "event_sink_unavailable")
        assert len(gateway.fake.requests) == 2
        gateway.settled()
        assert spent() == Decimal("0.50")
        # Back up: the first call waits for its event, which is delivered, and all is normal again.
        sink.failing = False
        assert call(4).status_code == 200
        assert call(5).status_code == 200
        assert len(gateway.fake.requests) == 4
        gateway.settled()
        assert spent() == Decimal("1.00")
        kinds = [(str(e.kind), str(e.request_id)) for e in sink.events]
        assert [k for k, _ in kinds] == ["reservation", "settlement"] * 3


def test_with_a_journal_the_answer_does_not_wait_for_the_sink_and_the_events_follow_once(
    database_url: str, cli: Cli, tmp_path: Path
) -> None:
    prices(cli)
    sink = FlakySink()
    journal = ChargeJournal(tmp_path / "charges.journal")
    with GatewayHarness(database_url, sink=sink, journal=journal) as gateway:
        agent = make_agent(cli, "agent-one", limit="5.00")
        gateway.refresh()
        assert gateway.state is not None
        billing = gateway.state.billing
        spent, call = _priced_calls(gateway, agent)

        # Healthy: the reservation event goes out once the provider has answered, before the settlement.
        assert call(0).status_code == 200
        gateway.settled()
        assert [str(e.kind) for e in sink.events] == ["reservation", "settlement"]
        assert len(journal) == 0
        sink.events.clear()
        # The sink is down: the reservation is journalled, so the call is answered; its events wait in the
        # journal (the live path gives up after its retries).
        sink.failing = True
        first = call(1)
        assert first.status_code == 200
        gateway.settled()
        assert spent() == Decimal("0.50")
        assert sink.events == []
        assert sorted(i.kind for i in journal.pending()) == ["reserve", "settle"]
        # Back up: running the journal again delivers both, and a second run delivers nothing more.
        sink.failing = False
        assert gateway.run(billing.recover()) == 2
        assert gateway.run(billing.recover()) == 0
        request_id = first.headers["x-caracal-request-id"]
        assert sorted((str(e.kind), str(e.request_id)) for e in sink.events) == [
            ("reservation", request_id),
            ("settlement", request_id),
        ]
        assert len(journal) == 0
        # A journal that cannot be written: nothing goes out, the hold is released, nothing is recorded.
        journal.close()
        assert_denied(call(2), 503, "event_sink_unavailable")
        assert len(gateway.fake.requests) == 2
        gateway.settled()
        assert spent() == Decimal("0.50")
        assert len(sink.events) == 2


def _allow_connections(postgres_service: PostgresService, database_url: str, allow: bool) -> None:
    name = conninfo_to_dict(database_url)["dbname"]
    with postgres_service.connect() as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(str(name)), sql.SQL("true" if allow else "false")
            )
        )
        if not allow:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )


def test_postgres_down_serves_degraded_from_the_cache_then_fails_closed(
    database_url: str, cli: Cli, postgres_service: PostgresService
) -> None:
    prices(cli)
    sink = MemorySink()
    with GatewayHarness(
        database_url, sink=sink, cache_max_staleness_seconds=8, cache_refresh_seconds=60
    ) as gateway:
        agent = make_agent(cli, "agent-one")
        gateway.refresh()
        assert httpx.get(f"{gateway.url}/health").json()["status"] == "ok"
        _allow_connections(postgres_service, database_url, False)
        try:
            assert gateway.state is not None
            assert gateway.run(gateway.state.cache.refresh()) is False
            health = httpx.get(f"{gateway.url}/health")
            assert health.status_code == 200
            assert health.json()["status"] == "degraded"
            assert health.json()["components"]["store"]["status"] == "unreachable"
            metrics = httpx.get(gateway.metrics_url).text
            assert "caracal_gateway_degraded 1.0" in metrics
            reply = post(gateway, "/openai/v1/chat/completions", agent.api_key, json=CHAT)
            assert reply.status_code == 200, reply.text
            gateway.settled()
            assert [str(e.kind) for e in sink.events] == ["reservation", "settlement"]
            time.sleep(max(0.0, 8.2 - (gateway.state.cache.age_seconds or 0)))
            assert_denied(
                post(gateway, "/openai/v1/chat/completions", agent.api_key, json=CHAT), 503, "cache_stale"
            )
            assert httpx.get(f"{gateway.url}/health").status_code == 503
        finally:
            _allow_connections(postgres_service, database_url, True)


# -- expiry, metrics, stats -----------------------------------------------------------------------------------


def test_an_unsettled_hold_expires_and_is_charged(gateway: GatewayHarness, agent: AgentKey) -> None:
    assert gateway.state is not None
    snapshot = gateway.state.cache.current()
    import uuid

    from caracald.core.money import Money

    request_id = uuid.uuid4()
    scopes = snapshot.scopes(uuid.UUID(agent.agent_id))
    admitted = gateway.run(
        gateway.budget.admit(
            AdmissionRequest(
                request_id,
                uuid.UUID(agent.agent_id),
                scopes,
                Money(Decimal("0.42"), "USD"),
                datetime.now(UTC),
                timedelta(seconds=0.2),
            )
        )
    )
    assert admitted.admitted
    deadline = time.monotonic() + 10
    while not gateway.ledger(agent.agent_id, "expiry"):
        assert time.monotonic() < deadline, "no expiry event"
        time.sleep(0.1)
    (expiry,) = gateway.ledger(agent.agent_id, "expiry")
    assert expiry["request_id"] == request_id
    assert expiry["cost"] == Decimal("0.42")


def test_metrics_and_stats(gateway: GatewayHarness, agent: AgentKey) -> None:
    assert post(gateway, "/openai/v1/chat/completions", agent.api_key, json=CHAT).status_code == 200
    post(gateway, "/openai/v1/chat/completions", "ck_bad", json=CHAT)
    gateway.settled()
    text = httpx.get(gateway.metrics_url).text
    for name in (
        'caracal_gateway_requests_total{route="openai",status="200"} 1.0',
        "caracal_gateway_request_duration_seconds_bucket",
        'caracal_policy_evaluations_total{result="admitted"} 1.0',
        'caracal_gateway_auth_failures_total{reason="invalid_credentials"} 1.0',
        "caracal_gateway_admission_duration_seconds_count 1.0",
        'caracal_gateway_denials_total{reason="invalid_credentials"} 1.0',
        "caracal_gateway_hold_age_seconds_count 1.0",
        "caracal_gateway_degraded 0.0",
    ):
        assert name in text, name
    stats = httpx.get(f"{gateway.url}/stats").json()
    assert stats["cache"]["agents"] == 1
    assert stats["holds_in_flight"] == 0
    health = httpx.get(f"{gateway.url}/health").json()
    assert health["status"] == "ok"
    assert health["components"]["budget"]["status"] == "ok"


async def _misbehave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A provider that breaks off its answer when asked to (``X-Misbehave: break``), and else never answers."""
    head = await reader.readuntil(b"\r\n\r\n")
    if b"x-misbehave: break" in head.lower():
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"par')
        await writer.drain()
        writer.close()
        return
    await reader.read()  # hang until the gateway gives up


def test_a_provider_that_fails_is_answered_in_its_kind_and_charged_only_if_it_may_have_worked(
    database_url: str, cli: Cli
) -> None:
    prices(cli)
    bad_port = free_port()
    upstreams = {
        "dead": UpstreamConfig(base_url=f"http://127.0.0.1:{free_port()}/search-api"),
        "bad": UpstreamConfig(base_url=f"http://127.0.0.1:{bad_port}", api_key="sk-bad", flavor="openai"),
        "bad-generic": UpstreamConfig(base_url=f"http://127.0.0.1:{bad_port}/search-api"),
    }
    with GatewayHarness(database_url, upstreams=upstreams, upstream_timeout_seconds=1) as gateway:
        agent = make_agent(cli, "agent-one", limit="5.00")
        gateway.refresh()
        server = gateway.run(asyncio.start_server(_misbehave, "127.0.0.1", bad_port))

        def charged() -> list[tuple[Decimal, Decimal]]:
            """(cost, hold) of each settlement so far, in order."""
            gateway.settled()
            rows = sorted(gateway.ledger(agent.agent_id, "settlement"), key=lambda r: r["occurred_at"])
            return [(Decimal(r["cost"]), Decimal(r["metadata"]["hold"])) for r in rows]

        try:
            # Nobody listening: nothing was sent, nothing is charged.
            reply = httpx.get(
                f"{gateway.url}/u/dead/priced/1", headers={"x-api-key": agent.api_key}, timeout=30
            )
            assert_denied(reply, 502, "upstream_unavailable")
            assert charged() == [(Decimal("0"), Decimal("0.25"))]
            # Sent, then silence past the timeout: the provider may have done the work; the hold is charged.
            started = time.monotonic()
            assert_denied(
                post(gateway, "/u/bad/v1/chat/completions", agent.api_key, json=CHAT), 504, "upstream_timeout"
            )
            assert time.monotonic() - started < 5
            (_, (cost, hold)) = charged()
            assert cost == hold > 0
            # An answer that breaks off: charged at the hold as well.
            broken = post(
                gateway,
                "/u/bad/v1/chat/completions",
                agent.api_key,
                json=CHAT,
                headers={"X-Misbehave": "break"},
            )
            assert_denied(broken, 502, "upstream_failed")
            (*_, (cost, hold)) = charged()
            assert cost == hold > 0
            # Passed through as it came, an answer that breaks off breaks off for the client too (it must not
            # look complete); charged at the hold.
            with pytest.raises(httpx.RemoteProtocolError):
                httpx.get(
                    f"{gateway.url}/u/bad-generic/priced/1",
                    headers={"x-api-key": agent.api_key, "X-Misbehave": "break"},
                    timeout=30,
                )
            assert charged()[-1] == (Decimal("0.25"), Decimal("0.25"))
            assert len(charged()) == 4
        finally:
            server.close()
