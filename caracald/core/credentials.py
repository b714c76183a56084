"""Agent API keys: issued once, stored only as a digest, checked in constant time.

A key reads ``ck_<key id>_<secret>``. The key id is public and finds the credential row; the secret is 32
random bytes. Since the secret has full entropy, one SHA-256 is enough: a slow password hash would add latency
to every gateway request without adding safety.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from caracald.core.errors import ValidationError

PREFIX = "ck"
_KEY_ID_BYTES = 9
_SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key_id: str
    api_key: str
    secret_hash: bytes

    def __repr__(self) -> str:  # never let the secret reach a log through repr()
        return f"IssuedKey(key_id={self.key_id!r}, api_key='***')"


def issue_key() -> IssuedKey:
    key_id = secrets.token_hex(_KEY_ID_BYTES)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    return IssuedKey(key_id=key_id, api_key=f"{PREFIX}_{key_id}_{secret}", secret_hash=hash_secret(secret))


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def split_key(api_key: str) -> tuple[str, str]:
    """Return (key id, secret); raise ValidationError for anything that is not a Caracal key."""
    parts = api_key.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or len(parts[1]) != 2 * _KEY_ID_BYTES or not parts[2]:
        raise ValidationError("not a Caracal API key")
    return parts[1], parts[2]


def secret_matches(secret: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)
