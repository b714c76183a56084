"""State shared by every command, and how failures are reported."""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass, field
from pathlib import Path

import typer

from caracald.runtime.config import CaracalConfig, load_config
from caracald.store.connect import open_database
from caracald.store.database import Database

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code)


@dataclass
class CliState:
    """What every command may need, opened lazily so that ``--help`` never touches a database."""

    config_path: Path | None = None
    database_url: str | None = None
    data_dir: Path | None = None
    actor: str | None = None
    _config: CaracalConfig | None = field(default=None, repr=False)
    _db: Database | None = field(default=None, repr=False)

    @property
    def config(self) -> CaracalConfig:
        if self._config is None:
            self._config = load_config(
                self.config_path,
                overrides={("database", "url"): self.database_url, ("embedded", "data_dir"): self.data_dir},
            )
        return self._config

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = open_database(self.config)
        return self._db

    @property
    def who(self) -> str:
        """Who is acting, for the audit log: ``--actor`` or ``CARACAL_ACTOR``, else the OS user."""
        if self.actor:
            return self.actor
        try:
            return getpass.getuser()
        except (KeyError, OSError):
            return f"uid:{os.getuid()}"

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def state(ctx: typer.Context) -> CliState:
    obj = ctx.find_root().obj
    assert isinstance(obj, CliState)
    return obj
