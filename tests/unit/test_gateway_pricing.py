"""The gateway's pure parts: request bounds, output clamping, routing checks, SSE metering, usage, errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from caracald.core.money import Money
from caracald.core.pricebook import Pricebook, TokenPrice, TokenUsage, token_cost
from caracald.gateway.errors import Denied, error_payload, stream_error_event
from caracald.gateway.pricing import (
    IMAGE_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    REQUEST_OVERHEAD_TOKENS,
    EndpointKind,
    endpoint_kind,
    finish_tokens,
    input_token_bound,
    plan_tokens,
)
from caracald.gateway.routing import resolve_generic, resolve_named
from caracald.gateway.streaming import SseSplitter, StreamMeter
from caracald.gateway.usage import anthropic_usage, openai_usage, usage_from_body
from caracald.runtime.config import GatewayConfig, UpstreamConfig

NOW = datetime(2025, 6, 1, tzinfo=UTC)
PRICE = TokenPrice(
    "gpt-test", "USD", Decimal(1000), Decimal(2000), Decimal(500), datetime(2020, 1, 1, tzinfo=UTC)
)
BOOK = Pricebook([PRICE])
CONFIG = GatewayConfig(
    upstreams={
        "openai": UpstreamConfig(base_url="https://api.openai.com", flavor="openai"),
        "anthropic": UpstreamConfig(
            base_url="https://api.anthropic.com", flavor="anthropic", auth="x-api-key"
        ),
        "search": UpstreamConfig(base_url="https://search.example/api"),
    }
)


def chat(**extra: object) -> bytes:
    return json.dumps(
        {"model": "gpt-test", "messages": [{"role": "user", "content": "héllo"}], **extra}
    ).encode()


# -- input bound -----------------------------------------------------------------------------------------------


@given(st.text(max_size=300))
def test_the_input_bound_covers_every_utf8_byte_of_the_prompt(text: str) -> None:
    payload = {"model": "m", "messages": [{"role": "user", "content": text}]}
    bound = input_token_bound(EndpointKind.CHAT, payload)
    assert (
        bound
        >= len(text.encode("utf-8", "surrogatepass")) + REQUEST_OVERHEAD_TOKENS + MESSAGE_OVERHEAD_TOKENS
    )


def test_images_count_whole_not_by_their_bytes() -> None:
    data = "data:image/png;base64," + "A" * 100_000
    payload = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data}}]}],
    }
    assert IMAGE_TOKENS <= input_token_bound(EndpointKind.CHAT, payload) < IMAGE_TOKENS + 1000


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            "unpriceable_content",
        ),
        ({"messages": [], "tools": [{"type": "web_search_preview"}]}, "unpriceable_tool"),
        ({"input": "hi", "previous_response_id": "resp_1"}, "unpriceable_content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "url"}}]}]},
            "unpriceable_content",
        ),
    ],
)
def test_content_that_cannot_be_bounded_is_refused(payload: dict[str, object], reason: str) -> None:
    with pytest.raises(Denied) as caught:
        input_token_bound(EndpointKind.CHAT, {"model": "m", **payload})
    assert (caught.value.status, caught.value.reason) == (422, reason)


def test_embedding_token_arrays_count_exactly() -> None:
    assert input_token_bound(EndpointKind.EMBEDDINGS, {"model": "e", "input": [[1, 2, 3], [4, 5]]}) == 5
    assert input_token_bound(EndpointKind.EMBEDDINGS, {"model": "e", "input": "ab cd"}) == 5


# -- output clamping -------------------------------------------------------------------------------------------


def test_output_is_clamped_to_the_budget_and_set_when_absent() -> None:
    plan = plan_tokens(EndpointKind.CHAT, chat(max_tokens=1_000_000), BOOK, NOW)
    assert plan is not None
    priced = finish_tokens(plan, Money(Decimal("1.00"), "USD"), 4096)
    affordable = int((Decimal("1.00") - plan.input_bound * Decimal("0.001")) / Decimal("0.002"))
    assert priced.max_output_tokens == affordable
    assert json.loads(priced.body)["max_tokens"] == affordable
    assert priced.hold <= Money(Decimal("1.00"), "USD")
    assert priced.hold == token_cost(PRICE, TokenUsage(plan.input_bound, affordable))

    unset = plan_tokens(EndpointKind.CHAT, chat(), BOOK, NOW)
    assert unset is not None
    body = json.loads(finish_tokens(unset, Money(Decimal(100), "USD"), 4096).body)
    assert body["max_completion_tokens"] == 4096 and "max_tokens" not in body


def test_n_choices_multiply_the_output_bound() -> None:
    plan = plan_tokens(EndpointKind.CHAT, chat(max_tokens=10, n=3), BOOK, NOW)
    assert plan is not None
    priced = finish_tokens(plan, Money(Decimal(100), "USD"), 4096)
    assert priced.output_bound == 30


def test_nothing_affordable_is_402_and_unpriced_model_falls_through() -> None:
    plan = plan_tokens(EndpointKind.CHAT, chat(), BOOK, NOW)
    assert plan is not None
    with pytest.raises(Denied) as caught:
        finish_tokens(plan, Money(Decimal("0.01"), "USD"), 4096)
    assert caught.value.status == 402
    assert plan_tokens(EndpointKind.CHAT, json.dumps({"model": "other"}).encode(), BOOK, NOW) is None


def test_streams_force_usage_and_remember_whether_the_client_asked() -> None:
    plan = plan_tokens(EndpointKind.CHAT, chat(stream=True), BOOK, NOW)
    assert plan is not None
    priced = finish_tokens(plan, Money(Decimal(100), "USD"), 4096)
    assert json.loads(priced.body)["stream_options"] == {"include_usage": True}
    assert priced.stream and not priced.client_wants_usage


# -- routing ---------------------------------------------------------------------------------------------------


def test_endpoint_kinds() -> None:
    openai_target = resolve_named(CONFIG, "openai", "v1/chat/completions", "")
    assert endpoint_kind(openai_target, "POST") is EndpointKind.CHAT
    assert endpoint_kind(openai_target, "GET") is EndpointKind.REQUEST
    anthropic_target = resolve_named(CONFIG, "anthropic", "v1/messages", "beta=1")
    assert anthropic_target.url == "https://api.anthropic.com/v1/messages?beta=1"
    assert anthropic_target.resource == "https://api.anthropic.com/v1/messages"
    assert endpoint_kind(anthropic_target, "POST") is EndpointKind.MESSAGES


@pytest.mark.parametrize("path", ["v1/%2e%2E/x", "v1/../x", "v1/a%2Fb", "v1/a\\b", "v1/./x", "v1/a%00"])
def test_paths_a_server_could_read_differently_are_refused(path: str) -> None:
    with pytest.raises(Denied) as caught:
        resolve_named(CONFIG, "openai", path, "")
    assert caught.value.reason == "invalid_path"


def test_generic_targets_under_an_upstream_take_its_metering() -> None:
    target = resolve_generic(CONFIG, ["HTTPS://API.OPENAI.COM/v1/chat/completions"])
    assert (target.upstream_name, target.flavor, target.path) == ("openai", "openai", "v1/chat/completions")
    other = resolve_generic(CONFIG, ["https://elsewhere.example/x?y=1"])
    assert (other.upstream_name, other.flavor, other.resource) == (
        None,
        "generic",
        "https://elsewhere.example/x",
    )
    with pytest.raises(Denied):
        resolve_generic(CONFIG, ["https://a.example/x", "https://b.example/y"])


# -- SSE metering ----------------------------------------------------------------------------------------------


def test_the_splitter_keeps_events_whole_across_chunks() -> None:
    stream = b"data: 1\n\nevent: x\r\ndata: 2\r\n\r\ndata: 3\n\n"
    splitter = SseSplitter()
    events = [event for i in range(len(stream)) for event in splitter.feed(stream[i : i + 1])]
    assert events == [b"data: 1\n\n", b"event: x\r\ndata: 2\r\n\r\n", b"data: 3\n\n"]
    assert splitter.rest() == b""


def _sse(payload: dict[str, object], name: str | None = None) -> bytes:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(payload)}\n\n".encode()


def test_chat_meter_cuts_only_past_the_tokens_surely_produced_and_drops_the_forced_usage_chunk() -> None:
    plan = plan_tokens(EndpointKind.CHAT, chat(stream=True, max_tokens=10), BOOK, NOW)
    assert plan is not None
    meter = StreamMeter(finish_tokens(plan, Money(Decimal(100), "USD"), 4096))
    # an honest answer: ten deltas of four bytes, 40 bytes in all, is within a 10-token hold
    for _ in range(10):
        assert meter.observe(_sse({"choices": [{"delta": {"content": " abc"}}]})).over_hold is False
    assert (meter.output_bytes, meter.output_deltas) == (40, 10)
    assert meter.observe(_sse({"choices": [{"delta": {"content": ""}}]})).over_hold is False  # no token
    # an eleventh token is more than the provider may produce under max_tokens=10: cut
    assert meter.observe(_sse({"choices": [{"delta": {"content": "x"}}]})).over_hold is True
    usage_chunk = _sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    assert meter.observe(usage_chunk).forward is False
    _, usage, source = meter.settlement(complete=True)
    assert (usage, source) == (TokenUsage(3, 2), "reported")


def test_an_incomplete_stream_settles_at_the_usage_so_far_never_above_the_hold() -> None:
    plan = plan_tokens(EndpointKind.CHAT, chat(stream=True, max_tokens=100), BOOK, NOW)
    assert plan is not None
    priced = finish_tokens(plan, Money(Decimal(100), "USD"), 4096)
    meter = StreamMeter(priced)
    meter.observe(_sse({"choices": [{"delta": {"content": "abcd"}}]}))
    cost, usage, source = meter.settlement(complete=False)
    assert source == "partial" and usage == TokenUsage(priced.input_bound, 4)
    assert cost == token_cost(PRICE, TokenUsage(priced.input_bound, 4))
    meter.output_bytes = 10_000
    assert meter.settlement(complete=False)[0] == priced.hold


def test_anthropic_meter_merges_start_and_delta_usage() -> None:
    book = Pricebook(
        [TokenPrice("claude-x", "USD", Decimal(3), Decimal(15), Decimal("0.3"), PRICE.effective_from)]
    )
    body = json.dumps({"model": "claude-x", "max_tokens": 50, "messages": [], "stream": True}).encode()
    plan = plan_tokens(EndpointKind.MESSAGES, body, book, NOW)
    assert plan is not None
    meter = StreamMeter(finish_tokens(plan, Money(Decimal(10), "USD"), 4096))
    start = {"message": {"usage": {"input_tokens": 7, "cache_read_input_tokens": 3, "output_tokens": 1}}}
    meter.observe(_sse({"type": "message_start", **start}, "message_start"))
    meter.observe(_sse({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hey"}}))
    meter.observe(_sse({"type": "message_delta", "usage": {"output_tokens": 2}}, "message_delta"))
    assert meter.final_usage == TokenUsage(10, 2, 3)


# -- usage and errors ------------------------------------------------------------------------------------------


def test_usage_parsing() -> None:
    assert openai_usage(EndpointKind.CHAT, {"prompt_tokens": 5, "completion_tokens": 2}) == TokenUsage(5, 2)
    details = {"input_tokens": 9, "output_tokens": 4, "input_tokens_details": {"cached_tokens": 20}}
    assert openai_usage(EndpointKind.RESPONSES, details) == TokenUsage(9, 4, 9)
    assert openai_usage(EndpointKind.EMBEDDINGS, {"prompt_tokens": 4}) == TokenUsage(4, 0)
    assert openai_usage(EndpointKind.CHAT, {"prompt_tokens": -1, "completion_tokens": 2}) is None
    full = {
        "input_tokens": 1,
        "output_tokens": 2,
        "cache_read_input_tokens": 3,
        "cache_creation_input_tokens": 4,
    }
    assert anthropic_usage(full) == TokenUsage(8, 2, 3)
    assert usage_from_body(EndpointKind.MESSAGES, {"content": []}) is None


def test_error_shapes() -> None:
    assert error_payload("openai", 402, "budget_exhausted", "no")["error"]["code"] == "budget_exhausted"
    assert error_payload("anthropic", 413, "body_too_large", "no")["error"]["type"] == "request_too_large"
    assert stream_error_event("anthropic", 402, "hold_exhausted", "cut").startswith(b"event: error\ndata: ")
