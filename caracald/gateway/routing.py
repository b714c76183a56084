"""Where a request goes: the upstream URL, resolved from the route and checked before anything else.

``/openai/<path>`` and ``/anthropic/<path>`` forward to the upstreams of those names, ``/u/<name>/<path>`` to
any other configured upstream, and ``/proxy`` (when ``gateway.generic_route`` is on) to the absolute URL in
``X-Caracal-Target-URL``. A generic target under a configured upstream's base URL is treated as that
upstream (its key, its metering), so the generic route is never a way around token pricing.

The path is forwarded exactly as the client encoded it, and the allowlist checks exactly that URL. Paths
that a server could resolve differently than the allowlist reads them are refused: ``.`` and ``..``
segments (also percent-encoded), encoded slashes and backslashes, control characters, fragments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urlsplit

from caracald.core.allowlist import normalise_resource
from caracald.core.errors import ValidationError
from caracald.gateway.errors import Denied, Flavor
from caracald.runtime.config import GatewayConfig, UpstreamConfig

TARGET_HEADER: Final = b"x-caracal-target-url"
_UNSAFE: Final = re.compile(r"[\x00-\x20\x7f\\#]")
_ENCODED_SEPARATOR: Final = re.compile(r"%(2f|5c|00)", re.IGNORECASE)
_MAX_URL_LENGTH: Final = 8192


@dataclass(frozen=True, slots=True)
class Target:
    #: The configured upstream, or None for a generic target outside every upstream.
    upstream_name: str | None
    upstream: UpstreamConfig | None
    flavor: Flavor
    #: The URL forwarded to, query included.
    url: str
    #: The path below the upstream's base URL (the URL's path for a generic target), for metering.
    path: str
    #: The URL without its query string (queries may carry secrets): what the ledger records.
    resource: str


def _check_path(raw: str) -> None:
    if _UNSAFE.search(raw) or _ENCODED_SEPARATOR.search(raw):
        raise Denied(400, "invalid_path", "the path holds characters Caracal does not forward")
    for segment in raw.split("/"):
        if unquote(segment) in (".", ".."):
            raise Denied(400, "invalid_path", "'.' and '..' path segments are not forwarded")


def _check_query(raw: str) -> None:
    if _UNSAFE.search(raw.replace("\\", "")):
        raise Denied(400, "invalid_path", "the query string holds characters Caracal does not forward")


def _join(base_url: str, rest: str, query: str) -> str:
    url = base_url.rstrip("/") + "/" + rest.lstrip("/")
    return f"{url}?{query}" if query else url


def route_flavor(config: GatewayConfig, raw_path: str) -> Flavor:
    """The error shape to answer in, from the route alone (before anything is resolved)."""
    parts = raw_path.split("/", 3)
    if len(parts) > 1 and parts[1] in ("openai", "anthropic"):
        upstream = config.upstreams.get(parts[1])
        return upstream.flavor if upstream else ("anthropic" if parts[1] == "anthropic" else "openai")
    if len(parts) > 2 and parts[1] == "u" and parts[2] in config.upstreams:
        return config.upstreams[parts[2]].flavor
    return "openai"


def resolve_named(config: GatewayConfig, name: str, rest: str, query: str) -> Target:
    upstream = config.upstreams.get(name)
    if upstream is None:
        raise Denied(404, "unknown_upstream", f"no upstream named {name!r} is configured")
    _check_path(rest)
    _check_query(query)
    url = _join(upstream.base_url, rest, query)
    if len(url) > _MAX_URL_LENGTH:
        raise Denied(400, "invalid_path", "the URL is too long")
    return Target(name, upstream, upstream.flavor, url, rest.lstrip("/"), _join(upstream.base_url, rest, ""))


def _under(base_url: str, url: str) -> str | None:
    """The part of ``url`` below ``base_url`` (scheme and host compared case-insensitively), or None."""
    try:
        base = normalise_resource(base_url.rstrip("/"))
    except ValidationError:
        return None
    target = normalise_resource(url)
    if target == base:
        return ""
    if target.startswith(base + "/"):
        return target[len(base) + 1 :]
    return None


def resolve_generic(config: GatewayConfig, values: list[str]) -> Target:
    if not config.generic_route:
        raise Denied(404, "unknown_route", "the generic route is disabled on this gateway")
    if len(values) != 1:
        raise Denied(400, "invalid_target", "send exactly one X-Caracal-Target-URL header")
    url = values[0].strip()
    if len(url) > _MAX_URL_LENGTH:
        raise Denied(400, "invalid_target", "the target URL is too long")
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise Denied(400, "invalid_target", "X-Caracal-Target-URL is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise Denied(400, "invalid_target", "X-Caracal-Target-URL must be an absolute http(s) URL")
    if "@" in parts.netloc or parts.fragment or "#" in url:
        raise Denied(400, "invalid_target", "the target URL may hold neither credentials nor a fragment")
    _check_path(parts.path)
    _check_query(parts.query)
    try:
        normalise_resource(url)
    except ValidationError as exc:
        raise Denied(400, "invalid_target", exc.message) from None
    resource = url.split("?", 1)[0]
    for name, upstream in config.upstreams.items():
        below = _under(upstream.base_url, resource)
        if below is not None:
            return Target(name, upstream, upstream.flavor, url, below, resource)
    return Target(None, None, "generic", url, parts.path.lstrip("/"), resource)
