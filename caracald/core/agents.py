"""Agents and the delegation tree they form."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from caracald.core.errors import ValidationError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,199}$")


class AgentStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


@dataclass(frozen=True, slots=True)
class Agent:
    agent_id: uuid.UUID
    name: str
    description: str
    owner: str
    parent_id: uuid.UUID | None
    status: AgentStatus
    created_at: datetime
    updated_at: datetime

    @property
    def is_active(self) -> bool:
        return self.status is AgentStatus.ACTIVE


def check_agent_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValidationError(
            f"invalid agent name {name!r}: use 1-200 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return name


def check_owner(owner: str) -> str:
    owner = owner.strip()
    if not owner or len(owner) > 320:
        raise ValidationError("owner must be a non-empty name or email address of at most 320 characters")
    return owner


def parse_uuid(text: str, *, what: str = "id") -> uuid.UUID:
    """Parse an id given by a user, with an error that says which id was malformed."""
    try:
        return uuid.UUID(str(text).strip())
    except ValueError:
        raise ValidationError(
            f"malformed {what} {text!r}: expected a UUID such as 550e8400-e29b-41d4-a716-446655440000"
        ) from None
