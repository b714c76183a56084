"""What a call really used, read from the provider's ``usage`` object.

* OpenAI chat completions: ``prompt_tokens`` (cached ones included, ``prompt_tokens_details.cached_tokens``)
  and ``completion_tokens`` (reasoning included). Embeddings: ``prompt_tokens``.
* OpenAI responses: ``input_tokens`` (``input_tokens_details.cached_tokens``) and ``output_tokens``.
* Anthropic messages: ``input_tokens`` excludes the cache, so input is ``input_tokens +
  cache_read_input_tokens + cache_creation_input_tokens``, of which the cache reads are the cached part.
  The pricebook has no cache-write rate, so cache writes are charged at the input price.

A usage object that is absent or malformed gives None: the caller then settles at the hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from caracald.core.pricebook import TokenUsage
from caracald.gateway.pricing import EndpointKind


def _count(node: object, *path: str) -> int | None:
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    if isinstance(node, bool) or not isinstance(node, int) or node < 0:
        return None
    return node


def _usage(inputs: int | None, outputs: int | None, cached: int | None) -> TokenUsage | None:
    if inputs is None or outputs is None:
        return None
    return TokenUsage(inputs, outputs, min(cached or 0, inputs))


def openai_usage(kind: EndpointKind, usage: object) -> TokenUsage | None:
    if not isinstance(usage, Mapping):
        return None
    if kind is EndpointKind.RESPONSES:
        return _usage(
            _count(usage, "input_tokens"),
            _count(usage, "output_tokens"),
            _count(usage, "input_tokens_details", "cached_tokens"),
        )
    outputs = 0 if kind is EndpointKind.EMBEDDINGS else _count(usage, "completion_tokens")
    return _usage(
        _count(usage, "prompt_tokens"), outputs, _count(usage, "prompt_tokens_details", "cached_tokens")
    )


def anthropic_usage(usage: object) -> TokenUsage | None:
    if not isinstance(usage, Mapping):
        return None
    base = _count(usage, "input_tokens")
    reads = _count(usage, "cache_read_input_tokens") or 0
    writes = _count(usage, "cache_creation_input_tokens") or 0
    return _usage(None if base is None else base + reads + writes, _count(usage, "output_tokens"), reads)


def usage_from_body(kind: EndpointKind, payload: Mapping[str, Any]) -> TokenUsage | None:
    """Usage of a complete (non-streamed) JSON answer."""
    if kind is EndpointKind.MESSAGES:
        return anthropic_usage(payload.get("usage"))
    if kind.token_priced:
        return openai_usage(kind, payload.get("usage"))
    return None
