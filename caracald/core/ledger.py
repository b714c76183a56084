"""Ledger events: the record of every effect on spending."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from caracald.core.money import Money


class LedgerEventType(StrEnum):
    RESERVATION = "reservation"  # a hold was admitted; no spend yet
    SETTLEMENT = "settlement"  # the actual cost of a call
    EXPIRY = "expiry"  # a hold was never settled and is charged at its reserved amount
    ADJUSTMENT = "adjustment"  # a late settlement corrects an expiry (positive or negative)
    DENIAL = "denial"  # refused; no spend


#: Event types that count as one spending event in reports (an adjustment corrects one, it is not one).
SPENDING_EVENT_TYPES = (LedgerEventType.SETTLEMENT, LedgerEventType.EXPIRY)
#: Event types whose cost counts towards spend.
CHARGED_EVENT_TYPES = (LedgerEventType.SETTLEMENT, LedgerEventType.EXPIRY, LedgerEventType.ADJUSTMENT)


@dataclass(frozen=True, slots=True)
class LedgerEvent:
    idempotency_key: uuid.UUID
    event_type: LedgerEventType
    agent_id: uuid.UUID
    occurred_at: datetime
    cost: Money
    resource: str = ""
    request_id: uuid.UUID | None = None
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SpendingSummary:
    agent_id: uuid.UUID
    start: datetime
    end: datetime
    currency: str
    total: Decimal
    event_count: int

    @property
    def total_money(self) -> Money:
        return Money(self.total, self.currency)
