"""Metering a server-sent-event stream while it flows (pure logic; :mod:`relay` does the I/O).

:class:`SseSplitter` cuts the byte stream into whole events, which are forwarded one by one, so a cut never
leaves half an event behind. :class:`StreamMeter` reads each event:

* the text it adds (content, refusals, reasoning and thinking text, tool-call names and arguments): its UTF-8
  byte count is an upper bound of the output tokens so far (byte-level BPE never makes more tokens than
  bytes), and the number of text-bearing deltas a lower bound (each delta carries at least one token);
* the usage the provider reports: Anthropic's ``message_start`` (input, cache) and ``message_delta``
  (cumulative output), OpenAI's final usage chunk (forced with ``stream_options.include_usage``) and the
  responses API's ``response.completed``.

The provider itself stops at ``max_tokens``, which the gateway clamped to what the hold pays for, so an honest
stream never outgrows its hold. The cut is the defence against one that ignores the limit: it fires once the
tokens *certainly* produced (the lower bound) exceed what the hold pays for. Cutting on the byte bound
instead would cut honest answers at about a quarter of their length, since text averages about four bytes
per token. A complete stream is settled at its reported usage; one that ended early (cut, or the client
went away) at the byte bound so far, never above the hold. Hidden reasoning tokens are not in the stream:
only the final usage reports them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from caracald.core.money import Money
from caracald.core.pricebook import TokenUsage, token_cost
from caracald.gateway.pricing import EndpointKind, Priced, bounding_price
from caracald.gateway.usage import anthropic_usage, openai_usage

_SEPARATORS: Final = (b"\r\n\r\n", b"\n\n", b"\r\r")
#: A single event larger than this is not an LLM stream event: the stream is cut.
MAX_EVENT_BYTES: Final = 4 * 1024 * 1024


class EventTooLargeError(Exception):
    pass


class SseSplitter:
    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        events: list[bytes] = []
        while True:
            cut = -1
            width = 0
            for separator in _SEPARATORS:
                at = self._buffer.find(separator)
                if at >= 0 and (cut < 0 or at < cut):
                    cut, width = at, len(separator)
            if cut < 0:
                break
            events.append(bytes(self._buffer[: cut + width]))
            del self._buffer[: cut + width]
        if len(self._buffer) > MAX_EVENT_BYTES:
            raise EventTooLargeError(f"an SSE event exceeds {MAX_EVENT_BYTES} bytes")
        return events

    def rest(self) -> bytes:
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


def parse_event(raw: bytes) -> tuple[str | None, Any]:
    """The ``event:`` name and the JSON of the ``data:`` lines (None when absent or not JSON)."""
    name: str | None = None
    data: list[str] = []
    for line in raw.decode("utf-8", "replace").splitlines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if not data:
        return name, None
    text = "\n".join(data)
    if text.strip() == "[DONE]":
        return name, None
    try:
        return name, json.loads(text)
    except ValueError:
        return name, None


def _text_bytes(*values: object) -> int:
    return sum(len(v.encode("utf-8", "surrogatepass")) for v in values if isinstance(v, str))


_ANTHROPIC_DELTA_TEXT: Final = {
    "text_delta": "text",
    "input_json_delta": "partial_json",
    "thinking_delta": "thinking",
}


@dataclass(slots=True)
class Observation:
    forward: bool = True
    #: The stream's cost bound now exceeds the hold: cut before forwarding this event.
    over_hold: bool = False


class StreamMeter:
    def __init__(self, priced: Priced) -> None:
        assert priced.token_price is not None
        self.priced = priced
        self.kind = priced.kind
        self._price = priced.token_price
        self._bound_price = bounding_price(priced.token_price)
        self.output_bytes = 0
        self.output_deltas = 0
        self.reported_output = 0
        self._anthropic: dict[str, Any] = {}
        self.final_usage: TokenUsage | None = None
        self.events = 0

    # -- observing ------------------------------------------------------------------------------------

    def observe(self, raw: bytes) -> Observation:
        self.events += 1
        _, data = parse_event(raw)
        seen = Observation()
        if isinstance(data, dict):
            if self.kind is EndpointKind.MESSAGES:
                self._anthropic_event(data)
            elif self.kind is EndpointKind.RESPONSES:
                self._responses_event(data)
            elif self.kind is EndpointKind.CHAT:
                seen.forward = self._chat_chunk(data)
        seen.over_hold = self.final_usage is None and self._certain_cost() > self.priced.hold
        return seen

    def _chat_chunk(self, data: dict[str, Any]) -> bool:
        choices = data.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            self._add_text(
                delta.get("content"),
                delta.get("refusal"),
                delta.get("reasoning_content"),
                delta.get("reasoning"),
            )
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    self._add_text(function.get("name"), function.get("arguments"))
        usage = data.get("usage")
        if isinstance(usage, dict):
            self.final_usage = openai_usage(EndpointKind.CHAT, usage)
            # The client did not ask for usage: drop the usage-only chunk Caracal made the provider send.
            if not self.priced.client_wants_usage and not choices:
                return False
        return True

    def _responses_event(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if not isinstance(kind, str):
            return
        if kind.endswith(".delta"):
            self._add_text(data.get("delta"))
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            response = data.get("response")
            if isinstance(response, dict):
                self.final_usage = openai_usage(EndpointKind.RESPONSES, response.get("usage"))

    def _anthropic_event(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "message_start":
            message = data.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._anthropic.update(usage)
                self.reported_output = max(self.reported_output, _int(usage.get("output_tokens")))
        elif kind == "content_block_start":
            block = data.get("content_block")
            if isinstance(block, dict):
                self._add_text(block.get("text"), block.get("thinking"))
        elif kind == "content_block_delta":
            delta = data.get("delta")
            if isinstance(delta, dict):
                field = _ANTHROPIC_DELTA_TEXT.get(str(delta.get("type")))
                if field:
                    self._add_text(delta.get(field))
        elif kind == "message_delta":
            usage = data.get("usage")
            if isinstance(usage, dict):
                self._anthropic.update({k: v for k, v in usage.items() if v is not None})
                self.reported_output = max(self.reported_output, _int(usage.get("output_tokens")))
                self.final_usage = anthropic_usage(self._anthropic)

    # -- costing --------------------------------------------------------------------------------------

    def usage_so_far(self) -> TokenUsage:
        """An upper bound of what the stream has used so far (before its final usage arrives)."""
        output = max(self.reported_output, self.output_bytes)
        if self.kind is EndpointKind.MESSAGES and "input_tokens" in self._anthropic:
            known = anthropic_usage({**self._anthropic, "output_tokens": output})
            if known is not None:
                return known
        return TokenUsage(self.priced.input_bound, output)

    def _add_text(self, *values: object) -> None:
        added = _text_bytes(*values)
        if added:
            self.output_bytes += added
            self.output_deltas += 1

    def _certain_cost(self) -> Money:
        """What the stream has cost at the least: its input bound and the output it surely produced."""
        output = max(self.reported_output, self.output_deltas)
        return token_cost(self._bound_price, TokenUsage(self.priced.input_bound, output))

    def cost_so_far(self, *, bound: bool = False) -> Money:
        return token_cost(self._bound_price if bound else self._price, self.usage_so_far())

    def settlement(self, *, complete: bool) -> tuple[Money, TokenUsage | None, str]:
        """(cost, usage, how it was known) for a stream that ended, completely or not."""
        if self.final_usage is not None:
            return token_cost(self._price, self.final_usage), self.final_usage, "reported"
        if complete:
            return self.priced.hold, None, "hold"
        usage = self.usage_so_far()
        cost = token_cost(self._price, usage)
        return (cost if cost < self.priced.hold else self.priced.hold), usage, "partial"


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
