"""Database administration: health, read-only ad hoc queries, reset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from caracald.admin.common import audit, now
from caracald.core.audit import AuditEventType
from caracald.core.errors import StoreUnavailableError, ValidationError
from caracald.store.database import Database
from caracald.store.migrate import latest_version, migrate, schema_version


@dataclass(frozen=True, slots=True)
class HealthReport:
    healthy: bool
    server_version: str
    latency_ms: float
    schema_version: int
    expected_schema_version: int
    replica: str  # "not configured", "healthy" or the error
    pool: dict[str, int]
    problems: tuple[str, ...]


def health_check(db: Database) -> HealthReport:
    problems: list[str] = []
    latency = db.ping() * 1000
    with db.transaction() as conn:
        row = conn.execute("SHOW server_version").fetchone()
        version = str(row["server_version"]) if row else "unknown"
        current = schema_version(conn)
    expected = latest_version()
    if current < expected:
        problems.append(f"schema is at version {current}, {expected} expected: run caracal db migrate")
    replica = "not configured"
    if db.read_replica_url:
        try:
            with db.read() as conn:
                conn.execute("SELECT 1")
            replica = "healthy"
        except StoreUnavailableError as exc:
            replica = f"unavailable ({exc})"
            problems.append(f"read replica: {exc}")
    return HealthReport(
        healthy=not problems,
        server_version=version,
        latency_ms=latency,
        schema_version=current,
        expected_schema_version=expected,
        replica=replica,
        pool=db.pool_stats(),
        problems=tuple(problems),
    )


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool


def read_only_query(
    db: Database, query: str, *, row_limit: int = 1000, timeout_ms: int = 10_000
) -> QueryResult:
    """Run one statement in a READ ONLY transaction with a statement timeout and a row limit.

    The statement is prepared on the server, which accepts exactly one statement, so a trailing
    ``; COMMIT; DROP ...`` cannot end the read-only transaction and write after it.
    """
    if not query.strip():
        raise ValidationError("empty query")
    if row_limit < 1:
        raise ValidationError("row limit must be at least 1")
    try:
        with db.read() as conn:
            conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(timeout_ms)))
            # without parameters psycopg would use the simple protocol, which runs several statements
            cur = conn.execute(query.encode(), prepare=True)
            if cur.description is None:
                return QueryResult([], [], False)
            columns = [c.name for c in cur.description]
            fetched = cur.fetchmany(row_limit + 1)
    except psycopg.errors.ReadOnlySqlTransaction:
        raise ValidationError("db query is read-only: the statement tried to write") from None
    except psycopg.errors.SyntaxError as exc:
        if "multiple commands" in str(exc):
            raise ValidationError("db query takes exactly one SQL statement") from None
        raise ValidationError(f"query failed: {(exc.diag.message_primary or str(exc)).strip()}") from None
    except psycopg.errors.QueryCanceled:
        raise ValidationError(f"query cancelled after the {timeout_ms} ms statement timeout") from None
    except psycopg.Error as exc:
        message = (exc.diag.message_primary or str(exc)).strip()
        raise ValidationError(f"query failed: {message}") from None
    rows = [tuple(r.values()) for r in fetched[:row_limit]]
    return QueryResult(columns, rows, len(fetched) > row_limit)


def record_migrations(db: Database, applied: list[str], version: int, *, actor: str) -> None:
    with db.transaction() as conn:
        audit(
            conn,
            actor=actor,
            event_type=AuditEventType.DATABASE,
            action="db.migrate",
            at=now(),
            details={"applied": applied, "version": version},
        )


def reset(db: Database, *, actor: str) -> int:
    """Drop every Caracal table and recreate an empty, migrated schema. Returns the new schema version."""
    with db.transaction() as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    report = migrate(db.url)
    with db.transaction() as conn:
        audit(
            conn,
            actor=actor,
            event_type=AuditEventType.DATABASE,
            action="db.reset",
            at=now(),
            reason="database reset",
            details={"version": report.current_version},
        )
    return report.current_version
