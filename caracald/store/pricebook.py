"""Price entries: token prices per model and request prices per URL pattern, effective-dated."""

from __future__ import annotations

import uuid
from datetime import datetime

from caracald.core.allowlist import PatternType
from caracald.core.pricebook import Pricebook, ResourcePrice, TokenPrice
from caracald.store.database import Connection


def insert_token_price(conn: Connection, price: TokenPrice, actor: str, now: datetime) -> uuid.UUID:
    price_id = uuid.uuid4()
    conn.execute(
        """
        INSERT INTO price_entries (price_id, kind, model, currency, input_per_mtok, output_per_mtok,
                                   cached_input_per_mtok, effective_from, created_by, created_at)
        VALUES (%s, 'tokens', %s, %s, %s, %s, %s, %s, %s, %s)
        """,
        (
            price_id,
            price.model,
            price.currency,
            price.input_per_mtok,
            price.output_per_mtok,
            price.cached_input_per_mtok,
            price.effective_from,
            actor,
            now,
        ),
    )
    return price_id


def insert_resource_price(conn: Connection, price: ResourcePrice, actor: str, now: datetime) -> uuid.UUID:
    price_id = uuid.uuid4()
    conn.execute(
        """
        INSERT INTO price_entries (price_id, kind, pattern, pattern_type, currency, per_request, per_unit,
                                   unit, effective_from, created_by, created_at)
        VALUES (%s, 'request', %s, %s, %s, %s, %s, %s, %s, %s, %s)
        """,
        (
            price_id,
            price.pattern,
            str(price.pattern_type),
            price.currency,
            price.per_request,
            price.per_unit,
            price.unit,
            price.effective_from,
            actor,
            now,
        ),
    )
    return price_id


def load(conn: Connection) -> tuple[list[TokenPrice], list[ResourcePrice]]:
    rows = conn.execute("SELECT * FROM price_entries ORDER BY effective_from, created_at").fetchall()
    tokens: list[TokenPrice] = []
    resources: list[ResourcePrice] = []
    for row in rows:
        if row["kind"] == "tokens":
            tokens.append(
                TokenPrice(
                    model=row["model"],
                    currency=row["currency"],
                    input_per_mtok=row["input_per_mtok"],
                    output_per_mtok=row["output_per_mtok"],
                    cached_input_per_mtok=row["cached_input_per_mtok"],
                    effective_from=row["effective_from"],
                )
            )
        else:
            resources.append(
                ResourcePrice(
                    pattern=row["pattern"],
                    pattern_type=PatternType(row["pattern_type"]),
                    currency=row["currency"],
                    per_request=row["per_request"],
                    per_unit=row["per_unit"],
                    unit=row["unit"],
                    effective_from=row["effective_from"],
                )
            )
    return tokens, resources


def load_pricebook(conn: Connection) -> Pricebook:
    tokens, resources = load(conn)
    return Pricebook(tokens, resources)
