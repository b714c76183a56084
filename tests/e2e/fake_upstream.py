"""A fake provider speaking OpenAI's and Anthropic's wire formats, plain and streaming.

Usage is derived from the request so tests can predict every cost:

* input tokens = the number of whitespace-separated words in all text the request carries (message
  contents, text parts, system prompts; an embeddings ``input``);
* output tokens = ``X-Fake-Output-Tokens`` (default 5), capped by the request's output limit unless
  ``X-Fake-Ignore-Max: 1`` (a provider that does not honour it); each output token is the text ``"tok "``;
* cached input tokens = ``X-Fake-Cached-Tokens`` (default 0; for Anthropic, cache reads).

Other knobs (request headers): ``X-Fake-Status`` answers with that error status; ``X-Fake-No-Usage: 1``
leaves usage out; ``X-Fake-Delay`` sleeps that many seconds between streamed events; ``X-Fake-Encoding``
(``gzip`` or ``br``) compresses the answer. Every request is recorded in ``FakeUpstream.requests``.
The provider keys it accepts are ``OPENAI_KEY`` (Bearer) and ``ANTHROPIC_KEY`` (x-api-key).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import brotli
from aiohttp import web

OPENAI_KEY = "sk-fake-openai-provider-key"
ANTHROPIC_KEY = "sk-ant-fake-provider-key"
TOKEN_TEXT = "tok "


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def words(node: object) -> int:
    """Whitespace-separated words in every text of a request (message contents, parts, system)."""
    if isinstance(node, str):
        return len(node.split())
    if isinstance(node, list):
        return sum(words(item) for item in node)
    if isinstance(node, dict):
        if node.get("type") in ("text", "input_text"):
            return words(node.get("text"))
        if "content" in node:
            return words(node["content"])
    return 0


def input_tokens(kind: str, body: dict[str, Any]) -> int:
    if kind == "embeddings":
        return words(body.get("input"))
    if kind == "messages":
        return words(body.get("messages")) + words(body.get("system"))
    if kind == "responses":
        return words(body.get("input")) + words(body.get("instructions"))
    return words(body.get("messages"))


@dataclass
class Plan:
    output: int
    cached: int
    no_usage: bool
    delay: float
    encoding: str | None


def plan(request: web.Request, body: dict[str, Any], limit_fields: tuple[str, ...]) -> Plan:
    wanted = int(request.headers.get("X-Fake-Output-Tokens", "5"))
    if request.headers.get("X-Fake-Ignore-Max") != "1":
        for name in limit_fields:
            if isinstance(body.get(name), int):
                wanted = min(wanted, body[name])
    return Plan(
        output=wanted,
        cached=int(request.headers.get("X-Fake-Cached-Tokens", "0")),
        no_usage=request.headers.get("X-Fake-No-Usage") == "1",
        delay=float(request.headers.get("X-Fake-Delay", "0")),
        encoding=request.headers.get("X-Fake-Encoding"),
    )


@dataclass
class FakeUpstream:
    requests: list[Recorded] = field(default_factory=list)
    #: Streams that ended because the gateway (the client here) went away.
    aborted_streams: int = 0
    runner: web.AppRunner | None = None
    port: int = 0

    # -- server ---------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_route("*", "/{tail:.*}", self.anything)
        return app

    async def start(self, host: str, port: int) -> None:
        self.runner = web.AppRunner(self.app())
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port).start()
        self.port = port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def last(self) -> Recorded:
        return self.requests[-1]

    async def _record(self, request: web.Request) -> Recorded:
        recorded = Recorded(
            request.method, request.path, request.query_string, dict(request.headers), await request.read()
        )
        self.requests.append(recorded)
        return recorded

    # -- helpers --------------------------------------------------------------------------------------

    @staticmethod
    def _encode(payload: bytes, encoding: str | None) -> tuple[bytes, dict[str, str]]:
        if encoding == "gzip":
            return gzip.compress(payload), {"Content-Encoding": "gzip"}
        if encoding == "br":
            return brotli.compress(payload), {"Content-Encoding": "br"}
        return payload, {}

    def _json(self, payload: Any, status: int = 200, encoding: str | None = None) -> web.Response:
        body, headers = self._encode(json.dumps(payload).encode(), encoding)
        return web.Response(body=body, status=status, content_type="application/json", headers=headers)

    def _check_key(self, request: web.Request, flavor: str) -> web.Response | None:
        if flavor == "openai":
            if request.headers.get("Authorization") != f"Bearer {OPENAI_KEY}":
                return self._json({"error": {"message": "bad key", "type": "invalid_request_error"}}, 401)
        elif request.headers.get("x-api-key") != ANTHROPIC_KEY:
            return self._json(
                {"type": "error", "error": {"type": "authentication_error", "message": "bad"}}, 401
            )
        status = request.headers.get("X-Fake-Status")
        if status:
            if flavor == "openai":
                return self._json({"error": {"message": "fake failure", "type": "server_error"}}, int(status))
            return self._json(
                {"type": "error", "error": {"type": "api_error", "message": "fake"}}, int(status)
            )
        return None

    async def _stream(self, request: web.Request, events: list[bytes], p: Plan) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        compressor = None
        if p.encoding == "gzip":
            response.headers["Content-Encoding"] = "gzip"
            compressor = zlib.compressobj(wbits=31)
        await response.prepare(request)
        try:
            for event in events:
                data = event
                if compressor is not None:
                    data = compressor.compress(event) + compressor.flush(zlib.Z_SYNC_FLUSH)
                await response.write(data)
                if p.delay:
                    await asyncio.sleep(p.delay)
            if compressor is not None:
                await response.write(compressor.flush())
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.aborted_streams += 1
            raise
        return response

    # -- OpenAI ---------------------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        refused = self._check_key(request, "openai")
        if refused is not None:
            return refused
        body = await request.json()
        p = plan(request, body, ("max_completion_tokens", "max_tokens"))
        n = int(body.get("n") or 1)
        prompt = input_tokens("chat", body)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": p.output * n,
            "total_tokens": prompt + p.output * n,
            "prompt_tokens_details": {"cached_tokens": min(p.cached, prompt)},
        }
        base = {"id": "chatcmpl-fake", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            payload = {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": TOKEN_TEXT * p.output},
                        "finish_reason": "stop",
                    }
                    for i in range(n)
                ],
            }
            if not p.no_usage:
                payload["usage"] = usage
            return self._json(payload, encoding=p.encoding)
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        chunk = {**base, "object": "chat.completion.chunk"}
        extra = {"usage": None} if include_usage else {}

        def sse(payload: dict[str, Any]) -> bytes:
            return f"data: {json.dumps(payload)}\n\n".encode()

        events = [
            sse({**chunk, **extra, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        ]
        for _ in range(p.output):
            events.append(
                sse({**chunk, **extra, "choices": [{"index": 0, "delta": {"content": TOKEN_TEXT}}]})
            )
        events.append(
            sse({**chunk, **extra, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        )
        if include_usage and not p.no_usage:
            events.append(sse({**chunk, "choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        return await self._stream(request, events, p)

    async def embeddings(self, request: web.Request) -> web.Response:
        await self._record(request)
        refused = self._check_key(request, "openai")
        if refused is not None:
            return refused
        body = await request.json()
        p = plan(request, body, ())
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        prompt = input_tokens("embeddings", body)
        payload: dict[str, Any] = {
            "object": "list",
            "model": body["model"],
            "data": [
                {"object": "embedding", "index": i, "embedding": [0.25, -0.5, 0.125]}
                for i in range(len(inputs))
            ],
        }
        if not p.no_usage:
            payload["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
        return self._json(payload, encoding=p.encoding)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        refused = self._check_key(request, "openai")
        if refused is not None:
            return refused
        body = await request.json()
        p = plan(request, body, ("max_output_tokens",))
        prompt = input_tokens("responses", body)
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": min(p.cached, prompt)},
            "output_tokens": p.output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + p.output,
        }
        text = {"type": "output_text", "text": TOKEN_TEXT * p.output, "annotations": []}
        item = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [text],
        }
        response: dict[str, Any] = {
            "id": "resp_fake",
            "object": "response",
            "created_at": int(time.time()),
            "model": body["model"],
            "status": "completed",
            "output": [item],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
        }
        if not p.no_usage:
            response["usage"] = usage
        if not body.get("stream"):
            return self._json(response, encoding=p.encoding)

        def sse(name: str, payload: dict[str, Any], sequence: int) -> bytes:
            data = {"type": name, "sequence_number": sequence, **payload}
            return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

        started = {**response, "status": "in_progress", "output": []}
        events = [sse("response.created", {"response": started}, 0)]
        for i in range(p.output):
            delta = {"item_id": "msg_fake", "output_index": 0, "content_index": 0, "delta": TOKEN_TEXT}
            events.append(sse("response.output_text.delta", delta, i + 1))
        events.append(sse("response.completed", {"response": response}, p.output + 1))
        return await self._stream(request, events, p)

    # -- Anthropic ------------------------------------------------------------------------------------

    async def messages(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        refused = self._check_key(request, "anthropic")
        if refused is not None:
            return refused
        body = await request.json()
        p = plan(request, body, ("max_tokens",))
        total = input_tokens("messages", body)
        reads = min(p.cached, total)
        usage = {
            "input_tokens": total - reads,
            "output_tokens": p.output,
            "cache_read_input_tokens": reads,
            "cache_creation_input_tokens": 0,
        }
        message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": body["model"]}
        if not body.get("stream"):
            payload = {
                **message,
                "content": [{"type": "text", "text": TOKEN_TEXT * p.output}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": usage,
            }
            if p.no_usage:
                del payload["usage"]
            return self._json(payload, encoding=p.encoding)

        def sse(name: str, payload: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps({'type': name, **payload})}\n\n".encode()

        start_usage = {**usage, "output_tokens": 1}
        events = [
            sse(
                "message_start",
                {"message": {**message, "content": [], "stop_reason": None, "usage": start_usage}},
            ),
            sse("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            sse("ping", {}),
        ]
        for _ in range(p.output):
            events.append(
                sse("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": TOKEN_TEXT}})
            )
        events.append(sse("content_block_stop", {"index": 0}))
        delta: dict[str, Any] = {"delta": {"stop_reason": "end_turn", "stop_sequence": None}}
        if not p.no_usage:
            delta["usage"] = {"output_tokens": p.output}
        events.append(sse("message_delta", delta))
        events.append(sse("message_stop", {}))
        return await self._stream(request, events, p)

    # -- anything else --------------------------------------------------------------------------------

    async def anything(self, request: web.Request) -> web.Response:
        recorded = await self._record(request)
        status = int(request.headers.get("X-Fake-Status", "200"))
        payload = {"path": recorded.path, "query": recorded.query, "method": recorded.method}
        return self._json(payload, status=status, encoding=request.headers.get("X-Fake-Encoding"))
