"""Forward-only schema migrations, applied in order and recorded.

Migrations are the numbered ``migrations/NNNN_name.sql`` files shipped in the package. Applying them is
idempotent and safe from several processes at once: a transaction-scoped advisory lock serialises the
runners, and each one re-reads what is applied after taking it. An applied migration whose file changed is
refused, since the schema would no longer match its history.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from caracald.core.errors import ConflictError

#: Arbitrary constant naming Caracal's migration lock among other advisory locks.
MIGRATION_LOCK_KEY = 0x0CA7AC41
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class MigrationReport:
    applied: tuple[Migration, ...]
    current_version: int


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("caracald.store.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migration files are not numbered 1..n without gaps: {versions}")
    return found


def latest_version() -> int:
    migrations = available_migrations()
    return migrations[-1].version if migrations else 0


def _ensure_history_table(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version    integer PRIMARY KEY,
            name       text NOT NULL,
            checksum   text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def applied_versions(conn: psycopg.Connection[Any]) -> dict[int, str]:
    # a plain cursor, whatever row factory the connection was opened with
    with conn.cursor(row_factory=tuple_row) as cur:
        exists = cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return {}
        rows = cur.execute("SELECT version, checksum FROM schema_migrations").fetchall()
    return {int(r[0]): str(r[1]) for r in rows}


def migrate(url: str) -> MigrationReport:
    """Apply every pending migration. Returns what this call applied."""
    applied: list[Migration] = []
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            _ensure_history_table(conn)
            done = applied_versions(conn)
            for migration in available_migrations():
                recorded = done.get(migration.version)
                if recorded is not None:
                    if recorded != migration.checksum:
                        raise ConflictError(
                            f"migration {migration.version:04d}_{migration.name} was changed after it was "
                            "applied; migrations are forward-only: add a new one instead"
                        )
                    continue
                with conn.transaction():
                    conn.execute(migration.sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (migration.version, migration.name, migration.checksum),
                    )
                applied.append(migration)
        current = max(applied_versions(conn), default=0)
    return MigrationReport(tuple(applied), current)


def schema_version(conn: psycopg.Connection[Any]) -> int:
    return max(applied_versions(conn), default=0)
