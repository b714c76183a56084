"""Per-test databases cloned from one migrated template, and a CLI runner pointed at them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from caracal_ops.cli.main import app
from caracald.store.database import Database
from caracald.store.migrate import migrate
from tests.harness.postgres import PostgresService

TEMPLATE = "caracal_template"


@pytest.fixture(scope="session")
def migrated_template(postgres_service: PostgresService) -> str:
    postgres_service.drop_database(TEMPLATE)
    postgres_service.create_database(TEMPLATE)
    migrate(postgres_service.admin_uri(TEMPLATE))
    return TEMPLATE


@pytest.fixture
def database_url(postgres_service: PostgresService, migrated_template: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    postgres_service.create_database(name, template=migrated_template)
    yield postgres_service.admin_uri(name)
    postgres_service.drop_database(name)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    with Database(database_url) as database:
        yield database


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def __repr__(self) -> str:
        return f"CliResult(exit_code={self.exit_code}, stdout={self.stdout!r}, stderr={self.stderr!r})"


class Cli:
    """Runs ``caracal`` in process against the test database, as a given actor."""

    def __init__(self, database_url: str, env: dict[str, str] | None = None) -> None:
        self.database_url = database_url
        self.runner = CliRunner()
        self.env = dict(env or {})

    def __call__(self, *args: str, actor: str = "tester@example.com", input: str | None = None) -> CliResult:
        result = self.runner.invoke(
            app,
            ["--database-url", self.database_url, "--actor", actor, *args],
            input=input,
            env=self.env,
            catch_exceptions=False,
        )
        return CliResult(result.exit_code, result.stdout, result.stderr)

    def ok(self, *args: str, **kwargs: str) -> CliResult:
        result = self(*args, **kwargs)  # type: ignore[arg-type]
        assert result.exit_code == 0, result
        return result


@pytest.fixture
def cli(database_url: str) -> Cli:
    return Cli(database_url)
