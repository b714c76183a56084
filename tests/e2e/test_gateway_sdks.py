"""The official OpenAI and Anthropic SDKs, unchanged, through a real gateway to the fake upstream.

Each test checks what the SDK got back, what the provider received (the provider key, never the Caracal
key; the output limit the gateway set), and the ledger rows and their exact costs.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import anthropic
import httpx2 as httpx
import openai
import pytest

from tests.e2e.fake_upstream import ANTHROPIC_KEY, OPENAI_KEY, TOKEN_TEXT
from tests.e2e.gateway_harness import AgentKey, GatewayHarness, make_agent, set_model_price, set_request_price
from tests.integration.conftest import Cli, cli, database_url, migrated_template  # noqa: F401

pytestmark = pytest.mark.integration

#: $0.001 per input token, $0.002 per output token, $0.0005 per cached input token.
INPUT, OUTPUT, CACHED = Decimal("0.001"), Decimal("0.002"), Decimal("0.0005")


def cost(inputs: int, outputs: int, cached: int = 0) -> Decimal:
    return (inputs - cached) * INPUT + outputs * OUTPUT + cached * CACHED


@pytest.fixture
def gateway(database_url: str, cli: Cli) -> Iterator[GatewayHarness]:  # noqa: F811
    set_model_price(cli, "gpt-test", "1000", "2000", cached="500")
    set_model_price(cli, "claude-test", "1000", "2000", cached="500")
    set_model_price(cli, "embed-test", "1000", "0")
    set_request_price(cli, "http://127.0.0.1:*/search-api/*", "0.25")
    with GatewayHarness(database_url) as gw:
        yield gw


@pytest.fixture
def agent(gateway: GatewayHarness, cli: Cli) -> AgentKey:  # noqa: F811
    created = make_agent(cli, "sdk-agent", limit="100.00")
    gateway.refresh()
    return created


def openai_client(gateway: GatewayHarness, agent: AgentKey) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=agent.api_key, max_retries=0)


def anthropic_client(gateway: GatewayHarness, agent: AgentKey) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key=agent.api_key, max_retries=0)


def settled_rows(gateway: GatewayHarness, agent: AgentKey) -> list[dict[str, object]]:
    gateway.settled()
    return gateway.ledger(agent.agent_id)


def only_settlement(rows: list[dict[str, object]]) -> dict[str, object]:
    kinds = [r["event_type"] for r in rows]
    assert kinds == ["reservation", "settlement"], kinds
    assert rows[0]["request_id"] == rows[1]["request_id"]
    assert rows[0]["cost"] == 0
    return rows[1]


# -- OpenAI --------------------------------------------------------------------------------------------------


def test_openai_chat_completion_is_metered_exactly(gateway: GatewayHarness, agent: AgentKey) -> None:
    client = openai_client(gateway, agent)
    reply = client.chat.completions.with_raw_response.create(
        model="gpt-test",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there world"},
        ],
        max_tokens=50,
    )
    completion = reply.parse()
    assert completion.choices[0].message.content == TOKEN_TEXT * 5
    assert completion.usage is not None and completion.usage.prompt_tokens == 5
    request_id = reply.headers["x-caracal-request-id"]

    sent = gateway.fake.last
    assert sent.headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    assert agent.api_key not in str(sent.headers)
    assert sent.json()["max_tokens"] == 50

    settlement = only_settlement(settled_rows(gateway, agent))
    assert str(settlement["request_id"]) == request_id
    assert settlement["cost"] == cost(5, 5)
    assert (settlement["input_tokens"], settlement["output_tokens"]) == (5, 5)
    assert settlement["model"] == "gpt-test"
    assert settlement["resource"] == f"http://127.0.0.1:{gateway.upstream_port}/v1/chat/completions"


def test_openai_cached_tokens_are_charged_at_the_cached_price(
    gateway: GatewayHarness, agent: AgentKey
) -> None:
    client = openai_client(gateway, agent)
    client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "one two three four five six"}],
        extra_headers={"X-Fake-Cached-Tokens": "4", "X-Fake-Output-Tokens": "3"},
    )
    settlement = only_settlement(settled_rows(gateway, agent))
    assert settlement["cost"] == cost(6, 3, cached=4)
    assert settlement["cached_input_tokens"] == 4


def test_openai_sets_the_output_limit_when_absent(gateway: GatewayHarness, agent: AgentKey) -> None:
    openai_client(gateway, agent).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}]
    )
    assert gateway.fake.last.json()["max_completion_tokens"] == gateway.config.default_max_output_tokens


def test_openai_stream_passes_through_and_settles_on_the_usage_chunk(
    gateway: GatewayHarness, agent: AgentKey
) -> None:
    client = openai_client(gateway, agent)
    stream = client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "stream me four words"}],
        stream=True,
        extra_headers={"X-Fake-Output-Tokens": "7"},
    )
    chunks = list(stream)
    # The client did not ask for usage: the usage-only chunk the gateway forced is not passed on.
    assert all(chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == TOKEN_TEXT * 7
    assert gateway.fake.last.json()["stream_options"] == {"include_usage": True}

    settlement = only_settlement(settled_rows(gateway, agent))
    assert settlement["cost"] == cost(4, 7)
    assert settlement["metadata"]["usage_source"] == "reported"


def test_openai_stream_with_usage_requested_keeps_the_usage_chunk(
    gateway: GatewayHarness, agent: AgentKey
) -> None:
    client = openai_client(gateway, agent)
    chunks = list(
        client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "a b"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert only_settlement(settled_rows(gateway, agent))["cost"] == cost(2, 5)


def test_openai_gzip_and_brotli_answers_are_decoded(gateway: GatewayHarness, agent: AgentKey) -> None:
    client = openai_client(gateway, agent)
    for encoding in ("gzip", "br"):
        reply = client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"X-Fake-Encoding": encoding},
        )
        assert reply.choices[0].message.content == TOKEN_TEXT * 5
    chunks = list(
        client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            extra_headers={"X-Fake-Encoding": "gzip"},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == TOKEN_TEXT * 5
    gateway.settled()
    assert gateway.spent(agent.agent_id) == 3 * cost(1, 5)


def test_openai_responses_plain_and_streamed(gateway: GatewayHarness, agent: AgentKey) -> None:
    client = openai_client(gateway, agent)
    response = client.responses.create(model="gpt-test", input="four words of input", max_output_tokens=40)
    assert response.output_text == TOKEN_TEXT * 5
    assert gateway.fake.last.json()["max_output_tokens"] == 40
    texts = [
        event.delta
        for event in client.responses.create(
            model="gpt-test",
            input="two words",
            instructions="be kind",
            stream=True,
            extra_headers={"X-Fake-Output-Tokens": "6", "X-Fake-Cached-Tokens": "1"},
        )
        if event.type == "response.output_text.delta"
    ]
    assert "".join(texts) == TOKEN_TEXT * 6
    gateway.settled()
    settlements = gateway.ledger(agent.agent_id, "settlement")
    assert [r["cost"] for r in settlements] == [cost(4, 5), cost(4, 6, cached=1)]
    assert settlements[1]["metadata"]["usage_source"] == "reported"


def test_openai_embeddings(gateway: GatewayHarness, agent: AgentKey) -> None:
    result = openai_client(gateway, agent).embeddings.create(
        model="embed-test", input=["alpha beta", "gamma"]
    )
    assert len(result.data) == 2
    settlement = only_settlement(settled_rows(gateway, agent))
    assert settlement["cost"] == 3 * INPUT
    assert (settlement["input_tokens"], settlement["output_tokens"]) == (3, 0)


def test_openai_error_status_costs_nothing(gateway: GatewayHarness, agent: AgentKey) -> None:
    with pytest.raises(openai.BadRequestError):
        openai_client(gateway, agent).chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"X-Fake-Status": "400"},
        )
    settlement = only_settlement(settled_rows(gateway, agent))
    assert settlement["cost"] == 0
    assert settlement["metadata"]["usage_source"] == "rejected"


def test_missing_usage_settles_at_the_hold(gateway: GatewayHarness, agent: AgentKey) -> None:
    openai_client(gateway, agent).chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=10,
        extra_headers={"X-Fake-No-Usage": "1"},
    )
    rows = settled_rows(gateway, agent)
    settlement = only_settlement(rows)
    hold = Decimal(rows[0]["metadata"]["hold"])
    assert settlement["cost"] == hold
    assert hold == cost(rows[0]["metadata"]["input_token_bound"], 10)
    assert settlement["metadata"]["usage_source"] == "hold"


# -- Anthropic -----------------------------------------------------------------------------------------------


def test_anthropic_message_is_metered_exactly(gateway: GatewayHarness, agent: AgentKey) -> None:
    client = anthropic_client(gateway, agent)
    message = client.messages.create(
        model="claude-test",
        max_tokens=64,
        system="terse",
        messages=[{"role": "user", "content": "hello from anthropic"}],
        extra_headers={"X-Fake-Cached-Tokens": "2"},
    )
    assert message.content[0].text == TOKEN_TEXT * 5  # type: ignore[union-attr]
    sent = gateway.fake.last
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY
    assert "Authorization" not in sent.headers
    settlement = only_settlement(settled_rows(gateway, agent))
    assert settlement["cost"] == cost(4, 5, cached=2)
    assert (settlement["input_tokens"], settlement["cached_input_tokens"]) == (4, 2)


def test_anthropic_stream(gateway: GatewayHarness, agent: AgentKey) -> None:
    client = anthropic_client(gateway, agent)
    with client.messages.stream(
        model="claude-test",
        max_tokens=100,
        messages=[{"role": "user", "content": "stream please"}],
        extra_headers={"X-Fake-Output-Tokens": "9"},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == TOKEN_TEXT * 9
    assert final.usage.output_tokens == 9
    settlement = only_settlement(settled_rows(gateway, agent))
    assert settlement["cost"] == cost(2, 9)


def test_anthropic_max_tokens_is_clamped_to_the_budget(gateway: GatewayHarness, cli: Cli) -> None:  # noqa: F811
    poor = make_agent(cli, "poor-agent", limit="1.00")
    gateway.refresh()
    client = anthropic_client(gateway, poor)
    client.messages.create(
        model="claude-test", max_tokens=20_000, messages=[{"role": "user", "content": "hi"}]
    )
    sent_max = gateway.fake.last.json()["max_tokens"]
    rows = settled_rows(gateway, poor)
    bound = rows[0]["metadata"]["input_token_bound"]
    # The most output $1.00 affords after the input bound, at $0.002 a token.
    assert sent_max == int((Decimal("1.00") - bound * INPUT) / OUTPUT)
    assert Decimal(rows[0]["metadata"]["hold"]) <= Decimal("1.00")
    assert only_settlement(rows)["cost"] == cost(1, 5)


# -- other APIs ----------------------------------------------------------------------------------------------


def test_generic_upstream_is_priced_per_request(gateway: GatewayHarness, agent: AgentKey) -> None:
    reply = httpx.get(
        f"{gateway.url}/u/search/find?q=caracal", headers={"Authorization": f"Bearer {agent.api_key}"}
    )
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"path": "/search-api/find", "query": "q=caracal", "method": "GET"}
    settlement = only_settlement(settled_rows(gateway, agent))
    assert settlement["cost"] == Decimal("0.25")
    assert settlement["resource"] == f"http://127.0.0.1:{gateway.upstream_port}/search-api/find"


def test_generic_route_with_target_header(gateway: GatewayHarness, agent: AgentKey) -> None:
    target = f"http://127.0.0.1:{gateway.upstream_port}/search-api/lookup?id=7"
    reply = httpx.post(
        f"{gateway.url}/proxy",
        headers={"x-api-key": agent.api_key, "X-Caracal-Target-URL": target},
        content=b"payload",
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["path"] == "/search-api/lookup"
    assert gateway.fake.last.body == b"payload"
    assert "X-Caracal-Target-URL" not in gateway.fake.last.headers
    assert only_settlement(settled_rows(gateway, agent))["cost"] == Decimal("0.25")
