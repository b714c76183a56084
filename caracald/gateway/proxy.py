"""The request path: authenticate -> allowlist -> price -> reserve -> forward -> meter -> settle.

Every step that cannot decide denies (fail closed): a missing snapshot, an unreachable budget, an unpriced
model, an undeliverable reservation event. Each answer carries ``X-Caracal-Request-Id``; each refusal also
``X-Caracal-Deny-Reason`` and a body in the calling provider's error shape.

What a call is charged:

* the provider's reported usage, priced at the price in force when the call was admitted;
* the hold, when a successful answer reports no usage, or when the provider did not answer in time (it may
  have done the work);
* zero when the provider refused the call (an error status without usage) or could not be reached: a
  request the provider rejected costs nothing;
* for a stream that ended early (cut at its hold, the client went away, the provider broke off), the usage
  so far, bounded by the streamed bytes and never above the hold.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as AsgiScope

from caracald.budget.base import Scope
from caracald.core.errors import CurrencyMismatchError, ValidationError
from caracald.core.money import Money
from caracald.core.pricebook import TokenUsage, token_cost
from caracald.gateway import upstream
from caracald.gateway.auth import extract_key, identify, require_active
from caracald.gateway.billing import Billing, Hold
from caracald.gateway.cache import PolicyCache
from caracald.gateway.errors import DENY_REASON_HEADER, REQUEST_ID_HEADER, Denied, Flavor, error_body
from caracald.gateway.http_client import UpstreamClient, UpstreamError, UpstreamResponse
from caracald.gateway.metrics import GatewayMetrics
from caracald.gateway.pricing import (
    EndpointKind,
    Priced,
    TokenPlan,
    endpoint_kind,
    finish_tokens,
    parse_json_object,
    plan_tokens,
    price_request,
    unclamped_tokens,
)
from caracald.gateway.relay import Relay, RelayOutcome
from caracald.gateway.request_ids import new_request_id
from caracald.gateway.routing import TARGET_HEADER, Target, resolve_generic, resolve_named, route_flavor
from caracald.gateway.streaming import StreamMeter
from caracald.gateway.switches import DenyAllSwitch
from caracald.gateway.usage import usage_from_body
from caracald.runtime.config import GatewayConfig

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Call:
    request_id: uuid.UUID
    route: str
    flavor: Flavor
    started: float
    agent: Any = None
    target: Target | None = None
    hold: Hold | None = None
    forwarded: bool = False
    currency: str = "USD"


class _Endpoint:
    """A raw ASGI endpoint (an instance, so Starlette does not wrap it as a request handler)."""

    def __init__(self, gateway: Gateway, route: str) -> None:
        self.gateway = gateway
        self.route = route

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        response = await self.gateway.handle(Request(scope, receive), self.route)
        await response(scope, receive, send)


def _raw_path(scope: AsgiScope) -> str:
    """The path as the client encoded it (ASGI ``raw_path``; the decoded path when a server gives none)."""
    raw: bytes | None = scope.get("raw_path")
    return (raw if raw is not None else scope["path"].encode()).decode("latin-1")


_REQUEST_ID: Final = REQUEST_ID_HEADER.lower().encode()


class _Answer:
    """A complete answer, sent as it is (a raw ASGI response: no header processing on the way out)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


async def read_body(request: Request, limit: int) -> bytes:
    for name, value in request.scope["headers"]:
        if name == b"content-length" or name.lower() == b"content-length":
            if value.isdigit() and int(value) > limit:
                raise Denied(413, "body_too_large", f"the request body exceeds {limit} bytes")
            break
    # Straight from the server's messages (Starlette's stream adds a generator and checks per chunk).
    receive = request.receive
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise Denied(400, "client_disconnected", "the client went away while sending the request")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise Denied(413, "body_too_large", f"the request body exceeds {limit} bytes")
            parts.append(chunk)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        cache: PolicyCache,
        switch: DenyAllSwitch,
        billing: Billing,
        metrics: GatewayMetrics,
        clock: Callable[[], datetime],
        client: Callable[[], UpstreamClient],
    ) -> None:
        self.config = config
        self.cache = cache
        self.switch = switch
        self.billing = billing
        self.metrics = metrics
        self.clock = clock
        self.client = client
        #: (route label, status) -> its request counter and duration histogram.
        self._series: dict[tuple[str, int], tuple[Any, Any]] = {}

    def endpoint(self, route: str) -> ASGIApp:
        return _Endpoint(self, route)

    # -- the request path -----------------------------------------------------------------------------

    async def handle(self, request: Request, route: str) -> ASGIApp:
        call = _Call(
            new_request_id(), route, route_flavor(self.config, _raw_path(request.scope)), time.perf_counter()
        )
        try:
            return await self._handle(request, call)
        except Denied as denied:
            return self._deny(call, denied)
        except Exception:
            log.exception("request %s failed", call.request_id)
            if call.hold is not None:
                self._settle_abandoned(call)
            return self._deny(call, Denied(503, "internal_error", "the gateway failed to handle the request"))

    def _target(self, request: Request, call: _Call) -> Target:
        if call.route == "unknown":
            raise Denied(
                404,
                "unknown_route",
                f"no route {request.url.path}: use /openai, /anthropic, /u/<name>, /proxy",
            )
        if call.route == "proxy":
            values = [v.decode("latin-1") for k, v in request.scope["headers"] if k.lower() == TARGET_HEADER]
            return resolve_generic(self.config, values)
        raw = _raw_path(request.scope)
        query = request.scope.get("query_string", b"").decode("latin-1")
        if call.route == "named":
            _, _, name, *below = raw.split("/", 3)
            return resolve_named(self.config, name, below[0] if below else "", query)
        rest = raw.split("/", 2)[2] if raw.count("/") >= 2 else ""
        return resolve_named(self.config, call.route, rest, query)

    async def _handle(self, request: Request, call: _Call) -> ASGIApp:
        target = call.target = self._target(request, call)
        if target.flavor != "generic":
            call.flavor = target.flavor
        if self.switch.on:
            raise Denied(403, "deny_all", "an operator has switched the gateway to deny every request")
        snapshot = self.cache.current()
        agent = call.agent = identify(snapshot, extract_key(request.scope["headers"]))
        require_active(snapshot, agent)
        try:
            allowed = snapshot.allows(agent.agent_id, target.url)
        except ValidationError as exc:
            raise Denied(400, "invalid_target", exc.message) from None
        if not allowed:
            raise Denied(
                403, "not_allowlisted", f"{target.resource} is not on agent {agent.name}'s allowlist"
            )
        scopes = snapshot.scopes(agent.agent_id)
        if not scopes:
            raise Denied(403, "no_policy", f"agent {agent.name} has no active budget policy")
        call.currency = scopes[0].limit.currency
        body = await read_body(request, self.config.max_body_bytes)
        plan, priced = self._price(request.method, target, body, snapshot.pricebook, scopes)
        clampable = plan is not None and plan.kind is not EndpointKind.EMBEDDINGS
        try:
            hold = await self.billing.admit(
                call.request_id, agent, scopes, priced, target.resource, final=not clampable
            )
        except Denied as denied:
            if not clampable or denied.reason != "budget_exhausted":
                raise
            # Near the limit: clamp the output limit to what is left and try once more, under a new request
            # id (the counters remember the first id's refusal).
            assert plan is not None
            call.request_id = new_request_id()
            priced = await self._clamped(plan, scopes)
            hold = await self.billing.admit(call.request_id, agent, scopes, priced, target.resource)
        call.hold = hold
        hold.extra.update(route=call.route, method=request.method)
        return await self._forward(request, call, hold)

    def _price(
        self, method: str, target: Target, body: bytes, pricebook: Any, scopes: tuple[Scope, ...]
    ) -> tuple[TokenPlan | None, Priced]:
        """The price to try first: token-priced calls with the output limit as asked (or the default), not
        clamped to the budget (see :func:`~caracald.gateway.pricing.unclamped_tokens`)."""
        kind = endpoint_kind(target, method)
        now = self.clock()
        if kind.token_priced:
            plan = plan_tokens(kind, body, pricebook, now)
            if plan is not None:
                if kind is not EndpointKind.EMBEDDINGS:
                    currency = plan.price.currency
                    for scope in scopes:
                        if scope.limit.currency != currency:
                            raise Denied(
                                422,
                                "currency_mismatch",
                                f"the budget is in {scope.limit.currency} but {plan.model} is priced in "
                                f"{currency}",
                            )
                return plan, unclamped_tokens(plan, self.config.default_max_output_tokens)
        return None, price_request(EndpointKind.REQUEST, target, body, pricebook, now)

    async def _clamped(self, plan: TokenPlan, scopes: tuple[Scope, ...]) -> Priced:
        """The output limit clamped to what the remaining budget affords (402 when nothing is)."""
        try:
            remaining = await self.billing.budget.remaining(scopes, self.clock())
        except CurrencyMismatchError as exc:
            raise Denied(422, "currency_mismatch", exc.message) from None
        except Exception as exc:
            log.error("budget unavailable: %s", exc)
            raise Denied(503, "budget_unavailable", "the budget service is unavailable") from None
        return finish_tokens(plan, remaining, self.config.default_max_output_tokens)

    async def _forward(self, request: Request, call: _Call, hold: Hold) -> ASGIApp:
        target = call.target
        assert target is not None
        priced = hold.priced
        headers = upstream.upstream_headers(request.scope["headers"], target.upstream)
        overlap = self.billing.sink_healthy
        recorded = self.billing.record_reservation(hold)
        if (recorded.done() or not overlap) and not await recorded:
            # Not journalled, or the sink failed lately: no call goes out before its reservation is durable.
            raise await self.billing.refuse_unrecorded(hold, forwarded=False)
        call.forwarded = True
        try:
            response = await self.client().request(request.method, target.url, headers, priced.body)
        except TimeoutError as exc:
            self.billing.spawn(self.billing.settle(hold, priced.hold, None, {"upstream_error": str(exc)}))
            raise Denied(504, "upstream_timeout", "the provider did not answer in time") from None
        except UpstreamError as exc:
            # Unreachable, or the answer broke off before its headers: the provider did not answer.
            zero = Money.zero(priced.hold.currency)
            self.billing.spawn(self.billing.settle(hold, zero, None, {"upstream_error": str(exc)}))
            raise Denied(502, "upstream_unavailable", f"the provider could not be reached: {exc}") from None
        if not await recorded:
            # The event was in flight while the call went out; nothing of the answer goes back unrecorded.
            response.close()
            raise await self.billing.refuse_unrecorded(hold, forwarded=True)
        out_headers = [*upstream.client_headers(response), (_REQUEST_ID, str(call.request_id).encode())]
        content_type = response.header(b"content-type") or b""
        is_stream = content_type.lower().startswith(b"text/event-stream")
        if priced.token_price is not None and not is_stream:
            return await self._buffered(call, hold, response, out_headers)
        self.billing.send_reservation(hold)
        meter = StreamMeter(priced) if priced.token_price is not None else None

        async def on_end(outcome: RelayOutcome) -> None:
            await self._end_relay(call, hold, meter, outcome)

        return Relay(
            response, out_headers, meter=meter, flavor=call.flavor, on_end=on_end, spawn=self.billing.spawn
        )

    async def _buffered(
        self, call: _Call, hold: Hold, response: UpstreamResponse, headers: list[tuple[bytes, bytes]]
    ) -> ASGIApp:
        priced = hold.priced
        try:
            body = await response.read()
        except UpstreamError as exc:
            response.close()
            self.billing.spawn(self.billing.settle(hold, priced.hold, None, {"upstream_error": str(exc)}))
            raise Denied(502, "upstream_failed", "the provider's answer broke off") from None
        response.release()
        usage: TokenUsage | None = None
        try:
            usage = usage_from_body(priced.kind, parse_json_object(body))
        except Denied:
            usage = None
        assert priced.token_price is not None
        if usage is not None:
            cost, source = token_cost(priced.token_price, usage), "reported"
        elif response.status < 400:
            cost, source = priced.hold, "hold"
        else:
            cost, source = Money.zero(priced.hold.currency), "rejected"
        extra = {"status": response.status, "usage_source": source}
        self.billing.spawn(self.billing.settle(hold, cost, usage, extra))
        self._observe(call, response.status)
        headers.append((b"content-length", b"%d" % len(body)))
        return _Answer(response.status, headers, body)

    async def _end_relay(
        self, call: _Call, hold: Hold, meter: StreamMeter | None, outcome: RelayOutcome
    ) -> None:
        if outcome.cut and not outcome.upstream_error:
            self.metrics.streams_cut.inc()
        if outcome.client_disconnected:
            self.metrics.client_disconnects.inc()
        extra: dict[str, Any] = {
            "status": outcome.status,
            "stream_cut": outcome.cut,
            "client_disconnected": outcome.client_disconnected,
        }
        if outcome.upstream_error:
            extra["upstream_error"] = outcome.upstream_error
        usage: TokenUsage | None = None
        if meter is not None:
            complete = outcome.completed and not outcome.cut
            cost, usage, source = meter.settlement(complete=complete)
            if source == "hold" and outcome.status >= 400:
                cost, source = Money.zero(cost.currency), "rejected"
            extra.update(usage_source=source, stream_events=meter.events)
        elif outcome.status < 400:
            cost = hold.priced.hold
        else:
            cost = Money.zero(hold.priced.hold.currency)
        await self.billing.settle(hold, cost, usage, extra)
        self._observe(call, outcome.status)

    def _settle_abandoned(self, call: _Call) -> None:
        hold = call.hold
        assert hold is not None
        cost = hold.priced.hold if call.forwarded else Money.zero(hold.priced.hold.currency)
        self.billing.spawn(self.billing.settle(hold, cost, None, {"abandoned": True}))

    # -- answers --------------------------------------------------------------------------------------

    def _observe(self, call: _Call, status: int) -> None:
        label = call.route
        if call.target is not None:
            label = call.target.upstream_name or "generic"
        series = self._series.get((label, status))
        if series is None:
            metrics = self.metrics
            series = self._series[label, status] = (
                metrics.requests.labels(label, str(status)),
                metrics.duration.labels(label),
            )
        series[0].inc()
        series[1].observe(time.perf_counter() - call.started)

    def _deny(self, call: _Call, denied: Denied) -> Response:
        self.metrics.denials.labels(denied.reason).inc()
        if denied.status == 401:
            self.metrics.auth_failures.labels(denied.reason).inc()
        if call.agent is not None and call.hold is None:
            currency = call.currency
            resource = call.target.resource if call.target else ""
            self.billing.deny(call.request_id, call.agent, denied.reason, currency, resource)
        self._observe(call, denied.status)
        response = Response(
            error_body(call.flavor, denied.status, denied.reason, denied.message),
            status_code=denied.status,
            media_type="application/json",
        )
        response.headers[REQUEST_ID_HEADER] = str(call.request_id)
        response.headers[DENY_REASON_HEADER] = denied.reason
        return response
