"""The pricebook: set, list and import prices. Entries are effective-dated and never edited."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime

import psycopg

from caracald.admin.common import audit, now
from caracald.core.audit import AuditEventType
from caracald.core.errors import ConflictError
from caracald.core.pricebook import ResourcePrice, TokenPrice, prices_from_records
from caracald.store import pricebook as price_store
from caracald.store.database import Connection, Database


def _token_details(price: TokenPrice) -> dict[str, str | None]:
    return {
        "model": price.model,
        "currency": price.currency,
        "input_per_mtok": str(price.input_per_mtok),
        "output_per_mtok": str(price.output_per_mtok),
        "cached_input_per_mtok": None
        if price.cached_input_per_mtok is None
        else str(price.cached_input_per_mtok),
        "effective_from": price.effective_from.isoformat(),
    }


def _resource_details(price: ResourcePrice) -> dict[str, str | None]:
    return {
        "pattern": price.pattern,
        "pattern_type": str(price.pattern_type),
        "currency": price.currency,
        "per_request": str(price.per_request),
        "per_unit": str(price.per_unit),
        "unit": price.unit,
        "effective_from": price.effective_from.isoformat(),
    }


def _write(
    conn: Connection, prices: Iterable[TokenPrice | ResourcePrice], actor: str, at: datetime
) -> list[uuid.UUID]:
    ids = []
    for price in prices:
        if isinstance(price, TokenPrice):
            price_id = price_store.insert_token_price(conn, price, actor, at)
            details, action = _token_details(price), "pricebook.set_model"
        else:
            price_id = price_store.insert_resource_price(conn, price, actor, at)
            details, action = _resource_details(price), "pricebook.set_resource"
        audit(
            conn,
            actor=actor,
            event_type=AuditEventType.PRICEBOOK_CHANGE,
            action=action,
            at=at,
            subject_id=price_id,
            details=details,
        )
        ids.append(price_id)
    return ids


def set_prices(db: Database, prices: Iterable[TokenPrice | ResourcePrice], *, actor: str) -> list[uuid.UUID]:
    """Record new price versions, all or nothing."""
    at = now()
    try:
        with db.transaction() as conn:
            return _write(conn, prices, actor, at)
    except psycopg.errors.UniqueViolation:
        raise ConflictError(
            "a price for that model or pattern already takes effect at that exact time; "
            "give a different --effective-from"
        ) from None


def import_records(db: Database, records: Iterable[Mapping[str, object]], *, actor: str) -> list[uuid.UUID]:
    tokens, resources = prices_from_records(list(records), default_effective_from=now())
    return set_prices(db, [*tokens, *resources], actor=actor)


def list_prices(db: Database) -> tuple[list[TokenPrice], list[ResourcePrice]]:
    with db.read() as conn:
        return price_store.load(conn)
