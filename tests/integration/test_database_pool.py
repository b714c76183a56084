"""The store's connection pool after the server ended its connections (a restart, a failover)."""

from __future__ import annotations

import psycopg
import pytest

from caracald.store.database import Database

pytestmark = pytest.mark.integration


def test_connections_the_server_ended_are_replaced_not_handed_out(database_url: str) -> None:
    with Database(database_url) as db:
        with db.read() as conn:
            first = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]
        # the server ends every other session of this database, as a restart would
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        with db.read() as conn:  # not "terminating connection due to administrator command"
            again = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]
        assert again != first
