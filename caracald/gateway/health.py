"""``/health`` and ``/stats``.

``/health`` answers 200 while the gateway can decide requests, with ``"status": "ok"``, or ``"degraded"``
when it serves from its cache because PostgreSQL is unreachable; 503 with ``"unavailable"`` when it cannot
serve (no fresh enough cache, or the budget counters are unreachable).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from caracald.budget.base import BudgetBackend
from caracald.gateway.billing import Billing
from caracald.gateway.cache import PolicyCache
from caracald.gateway.switches import DenyAllSwitch

_PROBE_SECONDS = 2.0


async def budget_state(budget: BudgetBackend) -> tuple[str, str | None]:
    probe = getattr(budget, "ping", None) or budget.holds_in_flight
    try:
        await asyncio.wait_for(probe(), _PROBE_SECONDS)
    except Exception as exc:
        return "unavailable", f"{type(exc).__name__}: {exc}".splitlines()[0]
    return "ok", None


class HealthEndpoints:
    def __init__(self, cache: PolicyCache, switch: DenyAllSwitch, billing: Billing, sink: Any) -> None:
        self.cache = cache
        self.switch = switch
        self.billing = billing
        self.sink = sink

    async def health(self, request: Request) -> JSONResponse:
        budget, budget_error = await budget_state(self.billing.budget)
        cache = self.cache.state
        if cache == "unavailable" or budget != "ok":
            status = "unavailable"
        elif cache == "degraded":
            status = "degraded"
        else:
            status = "ok"
        age = self.cache.age_seconds
        body = {
            "status": status,
            "deny_all": self.switch.on,
            "components": {
                "store": {
                    "status": "ok" if self.cache.store_reachable else "unreachable",
                    "error": self.cache.last_error,
                },
                "cache": {
                    "status": cache,
                    "age_seconds": None if age is None else round(age, 3),
                    "max_staleness_seconds": self.cache.max_staleness_seconds,
                },
                "budget": {
                    "status": budget,
                    "backend": type(self.billing.budget).__name__,
                    "error": budget_error,
                },
                "switches": {"deny_all": self.switch.on, "errors": dict(self.switch.errors)},
            },
        }
        return JSONResponse(body, status_code=503 if status == "unavailable" else 200)

    async def stats(self, request: Request) -> JSONResponse:
        snapshot = self.cache.snapshot
        try:
            budget_holds: int | None = await asyncio.wait_for(
                self.billing.budget.holds_in_flight(), _PROBE_SECONDS
            )
        except Exception:
            budget_holds = None
        spool = getattr(self.sink, "depth", None)
        spool_depth = spool() if callable(spool) else spool
        age = self.cache.age_seconds
        return JSONResponse(
            {
                "cache": snapshot.sizes() if snapshot else None,
                "cache_age_seconds": None if age is None else round(age, 3),
                "cache_loads": self.cache.loads,
                "cache_failures": self.cache.failures,
                "holds_in_flight": self.billing.holds_in_flight,
                "budget_holds_in_flight": budget_holds,
                "background_tasks": self.billing.background_tasks,
                "spool_depth": spool_depth if isinstance(spool_depth, int) else None,
                # events kept on local disk while the bus does not take them (None: this sink has no spool)
                "spooling": getattr(self.sink, "spooling", None),
                "spool_bytes": getattr(self.sink, "spooled_bytes", None),
            }
        )
