"""The gateway: Starlette on uvicorn, between agents and the APIs they pay for (see ``app`` and ``proxy``)."""

from caracald.gateway.app import GatewayDeps, create_app

__all__ = ["GatewayDeps", "create_app"]
