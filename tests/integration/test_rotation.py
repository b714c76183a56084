"""``caracal db rotate-password`` against a real PostgreSQL role, and ``kafka rotate-credentials`` refusing a
Kafka without SASL/SCRAM.

The test server trusts local connections (any password logs in), so whether a password works is checked
the way the server would check it under scram-sha-256: against the verifier stored in ``pg_authid``.
"""

from __future__ import annotations

import json
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from psycopg import sql

from caracal_ops.procedures.rotation import verifier_matches
from tests.harness.postgres import PostgresService

OLD = "old-password-123"


@pytest.fixture
def role(postgres_service: PostgresService) -> Iterator[str]:
    name = f"rot_{uuid.uuid4().hex[:10]}"
    with postgres_service.connect() as conn:
        conn.execute(sql.SQL("SET password_encryption = 'scram-sha-256'"))
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(OLD)
            )
        )
    yield name
    with postgres_service.connect() as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def _stored(postgres_service: PostgresService, role: str) -> str:
    with postgres_service.connect() as conn:
        row = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,)).fetchone()
    assert row is not None
    return str(row[0])


def _config(tmp_path: Path, database_url: str, role: str, secret: Path) -> Path:
    parts = urlsplit(database_url)
    where = f"{parts.hostname}:{parts.port}" if parts.hostname else ""  # empty: a socket in ?host=
    url = urlunsplit((parts.scheme, f"{role}@{where}", parts.path, parts.query, ""))
    config = tmp_path / "caracal.yaml"
    config.write_text(
        "\n".join(
            [
                "database:",
                f"  url: {json.dumps(url)}",
                f"  password_file: {json.dumps(str(secret))}",
                "platform:",
                "  kind: local",
                "embedded:",
                f"  data_dir: {json.dumps(str(tmp_path / 'data'))}",
            ]
        )
        + "\n"
    )
    return config


def _run(config: Path, *args: str) -> tuple[int, str, str]:
    from typer.testing import CliRunner

    from caracal_ops.cli.main import app

    result = CliRunner().invoke(
        app, ["--actor", "ops@example.com", *args], env={"CARACAL_CONFIG": str(config)}
    )
    return result.exit_code, result.stdout, result.stderr


def test_db_rotate_password(
    tmp_path: Path, database_url: str, role: str, postgres_service: PostgresService
) -> None:
    secret = tmp_path / "secrets" / "db-password"
    secret.parent.mkdir()
    secret.write_text(OLD + "\n")
    config = _config(tmp_path, database_url, role, secret)
    assert verifier_matches(_stored(postgres_service, role), OLD)

    code, out, err = _run(config, "db", "rotate-password", "--dry-run")
    assert code == 0, err
    assert f"ALTER ROLE {role} PASSWORD" in out and "Dry run: nothing was changed." in out
    assert secret.read_text().strip() == OLD and verifier_matches(_stored(postgres_service, role), OLD)

    code, out, err = _run(config, "db", "rotate-password", "--yes")
    assert code == 0, err
    new = secret.read_text().strip()
    assert new != OLD and len(new) >= 32
    assert new not in out and new not in err  # never printed
    stored = _stored(postgres_service, role)
    assert verifier_matches(stored, new)
    assert not verifier_matches(stored, OLD)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert [p.name for p in secret.parent.iterdir()] == ["db-password"]  # no temporary file left
    assert "no daemon was running" in out

    # the new password is what the CLI uses now, and the run is audited
    code, out, err = _run(config, "audit", "query", "--event-type", "ops_procedure", "--format", "json")
    assert code == 0, err
    actions = [r["action"] for r in json.loads(out)]
    assert "db.rotate-password.started" in actions and "db.rotate-password.finished" in actions


def test_db_rotate_password_needs_a_secret_file(tmp_path: Path, database_url: str) -> None:
    config = tmp_path / "caracal.yaml"
    config.write_text(f"database:\n  url: {json.dumps(database_url)}\n")
    code, _, err = _run(config, "db", "rotate-password", "--dry-run")
    assert code == 1 and "database.password_file is not set" in err


def test_kafka_rotate_credentials_without_sasl(tmp_path: Path) -> None:
    config = tmp_path / "caracal.yaml"
    config.write_text("kafka:\n  bootstrap_servers: 127.0.0.1:9\n")
    code, _, err = _run(config, "kafka", "rotate-credentials", "--dry-run")
    assert code == 1
    assert "without SASL/SCRAM" in err and "no credentials to rotate" in err


def test_kafka_rotate_credentials_plan(tmp_path: Path) -> None:
    config = tmp_path / "caracal.yaml"
    config.write_text(
        "kafka:\n  bootstrap_servers: 127.0.0.1:9\n  security_protocol: SASL_PLAINTEXT\n"
        "  sasl_mechanism: SCRAM-SHA-512\n  sasl_username: caracal\n"
        f"  sasl_password_file: {json.dumps(str(tmp_path / 'kafka-password'))}\n"
    )
    (tmp_path / "kafka-password").write_text("old\n")
    code, out, err = _run(config, "kafka", "rotate-credentials", "--dry-run")
    assert code == 0, err
    assert "Upsert the SCRAM-SHA-512 credential of caracal" in out
    assert (tmp_path / "kafka-password").read_text() == "old\n"
