"""Who is calling: the Caracal key from ``Authorization: Bearer`` or ``x-api-key``.

The key id finds the credential in the cache; the secret is compared with its stored digest in constant
time. Anything doubtful is refused with 401: no key, two different keys, a header sent twice, a key that
is malformed, unknown or revoked. A suspended agent, or one whose delegating ancestor is suspended, gets 403.
"""

from __future__ import annotations

from collections.abc import Sequence

from caracald.core.agents import Agent
from caracald.core.credentials import secret_matches, split_key
from caracald.core.errors import ValidationError
from caracald.gateway.cache import Snapshot
from caracald.gateway.errors import Denied

#: Longer header values are not keys; refuse before doing anything with them.
_MAX_KEY_LENGTH = 512


def _values(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in headers if key.lower() == name]


def extract_key(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The one Caracal key the request presents (raw ASGI headers, so repeats are visible)."""
    authorization = _values(headers, b"authorization")
    api_key = _values(headers, b"x-api-key")
    if len(authorization) > 1 or len(api_key) > 1:
        raise Denied(401, "ambiguous_credentials", "send the Caracal key in one header, once")
    candidates: set[str] = set()
    if authorization:
        scheme, _, token = authorization[0].strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Denied(401, "invalid_credentials", "Authorization must be 'Bearer <Caracal key>'")
        candidates.add(token.strip())
    if api_key:
        candidates.add(api_key[0].strip())
    if not candidates:
        raise Denied(
            401, "missing_credentials", "no Caracal key: send Authorization: Bearer <key> or x-api-key"
        )
    if len(candidates) > 1:
        raise Denied(401, "ambiguous_credentials", "Authorization and x-api-key carry different keys")
    key = candidates.pop()
    if len(key) > _MAX_KEY_LENGTH:
        raise Denied(401, "invalid_credentials", "invalid Caracal key")
    return key


def identify(snapshot: Snapshot, api_key: str) -> Agent:
    """The agent a live key belongs to (whatever its status)."""
    try:
        key_id, secret = split_key(api_key)
    except ValidationError:
        raise Denied(401, "invalid_credentials", "invalid Caracal key") from None
    credential = snapshot.credentials.get(key_id)
    if credential is None:
        raise Denied(401, "invalid_credentials", "invalid Caracal key")
    agent_id, stored_hash = credential
    if not secret_matches(secret, stored_hash):
        raise Denied(401, "invalid_credentials", "invalid Caracal key")
    agent = snapshot.agents.get(agent_id)
    if agent is None:
        raise Denied(401, "invalid_credentials", "invalid Caracal key")
    return agent


def require_active(snapshot: Snapshot, agent: Agent) -> None:
    """Refuse a suspended agent, or one whose delegating ancestor is suspended."""
    chain = snapshot.chain(agent.agent_id)
    if not agent.is_active:
        raise Denied(403, "agent_suspended", f"agent {agent.name} is suspended")
    for ancestor in chain[1:]:
        if not ancestor.is_active:
            raise Denied(403, "ancestor_suspended", f"agent {agent.name}'s delegating agent is suspended")


def authenticate(snapshot: Snapshot, api_key: str) -> Agent:
    """The agent the key belongs to, if the key is live and the whole delegation chain is active."""
    agent = identify(snapshot, api_key)
    require_active(snapshot, agent)
    return agent
