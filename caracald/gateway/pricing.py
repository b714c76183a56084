"""The price of a request *before* it is sent: an upper bound, never an estimate that can fall short.

LLM calls (OpenAI chat completions, responses and embeddings; Anthropic messages) are priced in tokens:

* **Input**: byte-level BPE tokenizers never produce more tokens than the UTF-8 bytes they encode, so the
  byte count of every key and value in the prompt-bearing JSON bounds the text tokens. On top come the tokens
  a provider's chat template adds and the request does not show, bounded by published figures:
  ``REQUEST_OVERHEAD_TOKENS`` per request, ``MESSAGE_OVERHEAD_TOKENS`` per message or system block (OpenAI
  documents 3-4, Anthropic's templates are of the same order), ``TOOL_OVERHEAD_TOKENS`` per tool plus
  ``TOOLS_PREAMBLE_TOKENS`` once when tools are present (Anthropic's tool-use system prompt is 346 tokens),
  ``BUILTIN_TOOL_TOKENS`` per Anthropic client tool whose definition is hidden (bash, text editor, computer
  use: at most about 1,200 tokens published). Images are not counted by their bytes but as
  ``IMAGE_TOKENS`` each, above the largest published per-image count (48,169 tokens: gpt-4o-mini, high
  detail, 8 tiles); providers resize images, so an image by URL is bounded too. Token arrays given to the
  embeddings endpoint count one token each, exactly.
* **Content that cannot be bounded from the request is refused (422)**: audio, files and documents other than
  plain text, server-side tools that pull content in (web search, file search, code execution, MCP), and
  requests that continue a conversation stored at the provider (``previous_response_id``, ``conversation``,
  stored prompts).
* **Output**: ``max_tokens`` / ``max_completion_tokens`` (chat, times ``n`` choices), ``max_output_tokens``
  (responses), ``max_tokens`` (messages). It is clamped to what the remaining budget can afford with the
  input bound, and set when absent (to ``default_max_output_tokens`` or less).

The hold is the token cost of (input bound, output limit). Other requests are priced per request from the
pricebook's URL patterns (``per_request`` plus one ``per_unit``); a model or URL without a price is refused
(422), never let through at $0.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from caracald.core.errors import ValidationError
from caracald.core.money import Money
from caracald.core.pricebook import (
    Pricebook,
    ResourcePrice,
    TokenPrice,
    TokenUsage,
    max_output_tokens_affordable,
    request_cost,
    token_cost,
)
from caracald.gateway.errors import Denied
from caracald.gateway.routing import Target

REQUEST_OVERHEAD_TOKENS: Final = 64
MESSAGE_OVERHEAD_TOKENS: Final = 16
TOOLS_PREAMBLE_TOKENS: Final = 512
TOOL_OVERHEAD_TOKENS: Final = 64
BUILTIN_TOOL_TOKENS: Final = 2048
IMAGE_TOKENS: Final = 50_000
MAX_CHOICES: Final = 128

_IMAGE_TYPES: Final = frozenset({"image_url", "input_image", "image"})
_UNBOUNDED_TYPES: Final = frozenset({"input_audio", "audio", "file", "input_file", "container_upload"})
_ANTHROPIC_CLIENT_TOOLS: Final = ("bash_", "text_editor_", "computer_", "memory_")
_PROMPT_FIELDS: Final = frozenset({"messages", "input", "system", "instructions"})
_STORED_CONTEXT: Final = ("previous_response_id", "conversation", "prompt", "mcp_servers", "container")


class EndpointKind(StrEnum):
    CHAT = "chat.completions"
    RESPONSES = "responses"
    EMBEDDINGS = "embeddings"
    MESSAGES = "messages"
    REQUEST = "request"

    @property
    def token_priced(self) -> bool:
        return self is not EndpointKind.REQUEST


def endpoint_kind(target: Target, method: str) -> EndpointKind:
    if method != "POST":
        return EndpointKind.REQUEST
    segments = [s for s in target.path.split("?", 1)[0].split("/") if s]
    if target.flavor == "openai":
        if segments[-2:] == ["chat", "completions"]:
            return EndpointKind.CHAT
        if segments[-1:] == ["responses"]:
            return EndpointKind.RESPONSES
        if segments[-1:] == ["embeddings"]:
            return EndpointKind.EMBEDDINGS
    if target.flavor == "anthropic" and segments[-1:] == ["messages"]:
        return EndpointKind.MESSAGES
    return EndpointKind.REQUEST


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: One decoder for every body (``json.loads`` with an option builds a new one per call).
_DECODER: Final = json.JSONDecoder(parse_constant=_refuse_constant)


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        # What json.loads does with bytes: UTF-8, -16 or -32, detected.
        payload = _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except (ValueError, RecursionError):
        raise Denied(400, "invalid_json", "the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise Denied(400, "invalid_json", "the request body must be a JSON object")
    return payload


# -- input ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Tally:
    text_bytes: int = 0
    images: int = 0


def _scalar_bytes(value: object) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if value is None or isinstance(value, bool):
        return 5
    return len(repr(value))


def _check_part(node: dict[str, Any]) -> bool:
    """True when ``node`` is an image part (counted whole); raise for content that cannot be bounded."""
    kind = node.get("type")
    if not isinstance(kind, str):
        return False
    if kind in _IMAGE_TYPES:
        return True
    if kind in _UNBOUNDED_TYPES:
        raise Denied(422, "unpriceable_content", f"{kind!r} content cannot be priced before the call")
    if kind == "document":
        source = node.get("source")
        if not (isinstance(source, dict) and source.get("type") in ("text", "content")):
            raise Denied(
                422, "unpriceable_content", "only plain-text documents can be priced before the call"
            )
    return False


def _count(root: object, tally: _Tally, *, content: bool) -> None:
    """Add the bytes of every key and scalar below ``root``; in prompt content, images count whole."""
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if content and _check_part(node):
                tally.images += 1
                continue
            for key, value in node.items():
                tally.text_bytes += _scalar_bytes(key)
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
        else:
            tally.text_bytes += _scalar_bytes(node)


def _tools_overhead(payload: dict[str, Any], kind: EndpointKind) -> int:
    tools = payload.get("tools")
    if tools is None:
        return 0
    if not isinstance(tools, list):
        raise Denied(400, "invalid_request", "tools must be a list")
    tokens = TOOLS_PREAMBLE_TOKENS if tools else 0
    for tool in tools:
        tokens += TOOL_OVERHEAD_TOKENS
        tool_type = tool.get("type") if isinstance(tool, dict) else None
        if kind is EndpointKind.MESSAGES:
            if tool_type in (None, "custom"):
                continue
            if isinstance(tool_type, str) and tool_type.startswith(_ANTHROPIC_CLIENT_TOOLS):
                tokens += BUILTIN_TOOL_TOKENS
                continue
        elif tool_type in ("function", "custom"):
            continue
        raise Denied(
            422,
            "unpriceable_tool",
            f"tool type {tool_type!r} brings in content that cannot be priced before the call",
        )
    return tokens


def _messages(payload: dict[str, Any]) -> int:
    count = 0
    for key in ("messages", "input", "system"):
        value = payload.get(key)
        if isinstance(value, list):
            count += len(value)
        elif value is not None:
            count += 1
    return count + (1 if payload.get("instructions") else 0)


def _embedding_tokens(value: object) -> int | None:
    """Exact token count of an embeddings input given as token ids, or None for text."""
    if (
        isinstance(value, list)
        and value
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    ):
        return len(value)
    if isinstance(value, list) and value and all(isinstance(item, list) for item in value):
        counts = [_embedding_tokens(item) for item in value]
        if all(c is not None for c in counts):
            return sum(c for c in counts if c is not None)
    return None


def input_token_bound(kind: EndpointKind, payload: dict[str, Any]) -> int:
    """An upper bound of the input tokens the provider will bill for this request."""
    if kind is EndpointKind.EMBEDDINGS:
        value = payload.get("input")
        exact = _embedding_tokens(value)
        if exact is not None:
            return exact
        tally = _Tally()
        _count(value, tally, content=False)
        return tally.text_bytes
    for name in _STORED_CONTEXT:
        if payload.get(name) not in (None, "", [], {}):
            raise Denied(
                422,
                "unpriceable_content",
                f"{name!r} brings in context that cannot be priced before the call",
            )
    if kind is EndpointKind.CHAT and "audio" in (payload.get("modalities") or ()):
        raise Denied(422, "unpriceable_content", "audio output cannot be priced with token prices")
    tally = _Tally()
    for key, value in payload.items():
        tally.text_bytes += _scalar_bytes(key)
        _count(value, tally, content=key in _PROMPT_FIELDS)
    return (
        tally.text_bytes
        + tally.images * IMAGE_TOKENS
        + REQUEST_OVERHEAD_TOKENS
        + MESSAGE_OVERHEAD_TOKENS * _messages(payload)
        + _tools_overhead(payload, kind)
    )


# -- output ---------------------------------------------------------------------------------------------

_OUTPUT_FIELDS: Final[dict[EndpointKind, tuple[str, ...]]] = {
    EndpointKind.CHAT: ("max_completion_tokens", "max_tokens"),
    EndpointKind.RESPONSES: ("max_output_tokens",),
    EndpointKind.MESSAGES: ("max_tokens",),
    EndpointKind.EMBEDDINGS: (),
}


def _whole(payload: dict[str, Any], name: str, low: int) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise Denied(400, "invalid_request", f"{name} must be a whole number of at least {low}")
    return value


@dataclass(frozen=True, slots=True)
class Priced:
    """A request with its hold: the body to forward and how to meter the answer."""

    kind: EndpointKind
    hold: Money
    body: bytes
    model: str | None = None
    token_price: TokenPrice | None = None
    resource_price: ResourcePrice | None = None
    stream: bool = False
    input_bound: int = 0
    #: Output tokens per choice as sent upstream (after clamping), and how many choices.
    max_output_tokens: int | None = None
    choices: int = 1
    #: For OpenAI chat streams: whether the client itself asked for the usage chunk.
    client_wants_usage: bool = True

    @property
    def output_bound(self) -> int:
        return (self.max_output_tokens or 0) * self.choices


@dataclass(frozen=True, slots=True)
class TokenPlan:
    """A token-priced request before the budget is consulted."""

    kind: EndpointKind
    payload: dict[str, Any]
    model: str
    price: TokenPrice
    input_bound: int
    requested_output: int | None
    choices: int


def bounding_price(price: TokenPrice) -> TokenPrice:
    """``price`` with input at the dearer of its cached and uncached rates, so a hold bounds either."""
    cached = price.cached_input_per_mtok
    if cached is None or cached <= price.input_per_mtok:
        return price
    return dataclasses.replace(price, input_per_mtok=cached, cached_input_per_mtok=None)


def plan_tokens(kind: EndpointKind, body: bytes, pricebook: Pricebook, at: datetime) -> TokenPlan | None:
    """Parse and bound a token-priced request; None when the model has no token price (try the URL)."""
    payload = parse_json_object(body)
    model = payload.get("model")
    if not isinstance(model, str) or not model.strip():
        raise Denied(400, "invalid_request", "the request names no model")
    price = pricebook.token_price(model, at)
    if price is None:
        return None
    requested: int | None = None
    for name in _OUTPUT_FIELDS[kind]:
        value = _whole(payload, name, 0)
        if value is not None:
            requested = value if requested is None else min(requested, value)
    choices = (_whole(payload, "n", 1) or 1) if kind is EndpointKind.CHAT else 1
    if choices > MAX_CHOICES:
        raise Denied(400, "invalid_request", f"n must be at most {MAX_CHOICES}")
    bound = input_token_bound(kind, payload)
    return TokenPlan(kind, payload, model, price, bound, requested, choices)


def finish_tokens(plan: TokenPlan, remaining: Money | None, default_max_output_tokens: int) -> Priced:
    """Clamp (or set) the output limit to what ``remaining`` affords, and size the hold."""
    price = bounding_price(plan.price)
    limit: int | None = None
    if plan.kind is not EndpointKind.EMBEDDINGS:
        if remaining is None:
            raise Denied(403, "no_policy", "the agent has no active budget policy")
        if remaining.currency != price.currency:
            raise Denied(
                422,
                "currency_mismatch",
                f"the budget is in {remaining.currency} but {plan.model} is priced in {price.currency}",
            )
        per_choice = max_output_tokens_affordable(price, remaining, plan.input_bound) // plan.choices
        if per_choice < 1:
            raise Denied(402, "budget_exhausted", "the remaining budget cannot pay for this request")
        limit = min(_wanted_output(plan, default_max_output_tokens), per_choice)
    return _priced(plan, price, limit)


def unclamped_tokens(plan: TokenPlan, default_max_output_tokens: int) -> Priced:
    """The request as asked: the output limit set when absent, but not clamped to any budget.

    What the gateway tries to admit first: when the budget takes this hold, the clamp of
    :func:`finish_tokens` would have changed nothing (the budget affords the whole output limit), so the
    remaining budget need not be read. Only a refused hold calls for the clamp.
    """
    limit = None if plan.kind is EndpointKind.EMBEDDINGS else _wanted_output(plan, default_max_output_tokens)
    return _priced(plan, bounding_price(plan.price), limit)


def _wanted_output(plan: TokenPlan, default_max_output_tokens: int) -> int:
    return default_max_output_tokens if plan.requested_output is None else plan.requested_output


def _priced(plan: TokenPlan, price: TokenPrice, limit: int | None) -> Priced:
    # The body is always serialised again from the parsed payload, never forwarded as sent: the provider must
    # read exactly what was priced (duplicate keys, UTF-16 bodies and the like read differently elsewhere).
    payload = dict(plan.payload)
    if limit is not None:
        fields = _OUTPUT_FIELDS[plan.kind]
        present = [name for name in fields if payload.get(name) is not None]
        for name in present or fields[:1]:
            payload[name] = limit
    stream = payload.get("stream") is True
    wants_usage = True
    if stream and plan.kind is EndpointKind.CHAT:
        options = payload.get("stream_options")
        options = dict(options) if isinstance(options, dict) else {}
        wants_usage = options.get("include_usage") is True
        payload["stream_options"] = {**options, "include_usage": True}
    try:
        hold = token_cost(price, TokenUsage(plan.input_bound, (limit or 0) * plan.choices))
    except ValidationError:  # more than any amount can be
        raise Denied(400, "invalid_request", "the output limit is too large to price") from None
    try:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate (a JSON escape, or CESU-8 bytes): not text a provider reads
        raise Denied(400, "invalid_json", "the request body holds text that is not valid Unicode") from None
    return Priced(
        kind=plan.kind,
        hold=hold,
        body=body,
        model=plan.model,
        token_price=plan.price,
        stream=stream,
        input_bound=plan.input_bound,
        max_output_tokens=limit,
        choices=plan.choices,
        client_wants_usage=wants_usage,
    )


def price_request(
    kind: EndpointKind, target: Target, body: bytes, pricebook: Pricebook, at: datetime
) -> Priced:
    """A per-request price for ``target``; 422 when its URL has none."""
    price = pricebook.resource_price(target.url, at)
    if price is None:
        raise Denied(422, "unpriced", f"no price covers {target.resource}: add one to the pricebook")
    units = 1 if price.unit else 0
    return Priced(kind=kind, hold=request_cost(price, units), body=body, resource_price=price)
