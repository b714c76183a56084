"""Deny answers, in the error shape the calling SDK understands.

Every refusal is a :class:`Denied` carrying an HTTP status and a stable *reason* (also sent as the
``X-Caracal-Deny-Reason`` header) that an operator can look up. :func:`error_body` renders it as
OpenAI's ``{"error": {"message", "type", "code"}}`` or Anthropic's ``{"type": "error", "error":
{"type", "message"}}``; the generic route answers in OpenAI's shape.
"""

from __future__ import annotations

import json
from typing import Any, Final, Literal

Flavor = Literal["openai", "anthropic", "generic"]

REQUEST_ID_HEADER: Final = "X-Caracal-Request-Id"
DENY_REASON_HEADER: Final = "X-Caracal-Deny-Reason"

#: OpenAI error ``type`` by status.
_OPENAI_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}

#: Anthropic error ``type`` by status.
_ANTHROPIC_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    502: "api_error",
    503: "api_error",
    504: "api_error",
}


class Denied(Exception):
    """The gateway refuses the request: ``status`` and a stable ``reason``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def error_type(flavor: Flavor, status: int) -> str:
    table = _ANTHROPIC_TYPES if flavor == "anthropic" else _OPENAI_TYPES
    return table.get(status, "api_error" if flavor == "anthropic" else "server_error")


def error_payload(flavor: Flavor, status: int, reason: str, message: str) -> dict[str, Any]:
    text = f"Caracal: {message} (reason: {reason})"
    if flavor == "anthropic":
        return {"type": "error", "error": {"type": error_type(flavor, status), "message": text}}
    return {"error": {"message": text, "type": error_type(flavor, status), "code": reason}}


def error_body(flavor: Flavor, status: int, reason: str, message: str) -> bytes:
    return json.dumps(error_payload(flavor, status, reason, message), separators=(",", ":")).encode()


def stream_error_event(flavor: Flavor, status: int, reason: str, message: str) -> bytes:
    """The last SSE event of a stream Caracal cuts, which the provider's SDK raises as an error."""
    data = json.dumps(error_payload(flavor, status, reason, message), separators=(",", ":"))
    if flavor == "anthropic":
        return f"event: error\ndata: {data}\n\n".encode()
    return f"data: {data}\n\n".encode()
