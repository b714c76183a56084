"""``caracal agent`` against a real PostgreSQL: the runbook output, the key shown once, the lifecycle."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
from psycopg import sql

from caracald.core.credentials import secret_matches, split_key
from caracald.store.database import Database
from tests.clitools import block
from tests.integration.conftest import Cli, CliResult

pytestmark = pytest.mark.integration

# ck_<9 random bytes as hex>_<32 random bytes, urlsafe base64 without padding>
API_KEY = re.compile(r"^ck_[0-9a-f]{18}_[A-Za-z0-9_-]{43}$")
UNKNOWN = "550e8400-e29b-41d4-a716-446655440000"


def rows(db: Database, query: str, *params: object) -> list[dict[str, Any]]:
    with db.read() as conn:
        return conn.execute(query, params).fetchall()


def count(db: Database, table: str) -> int:
    with db.read() as conn:
        row = conn.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(sql.Identifier(table))).fetchone()
    assert row is not None
    return int(row["n"])


def written(db: Database) -> dict[str, int]:
    return {t: count(db, t) for t in ("agents", "agent_credentials", "audit_log")}


def assert_error(result: CliResult, code: int, *fragments: str) -> None:
    """One line on stderr starting with ``Error:``, nothing on stdout, the given exit code."""
    assert result.exit_code == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result
    for fragment in fragments:
        assert fragment in lines[0], result
    assert result.stdout == "", result


def create(cli: Cli, name: str = "my-agent", *extra: str) -> dict[str, str]:
    return block(cli.ok("agent", "create", "--name", name, "--owner", "user@example.com", *extra).stdout)


def tables_containing(db: Database, text: str) -> list[str]:
    """Every table of the public schema in which some row's text contains ``text``."""
    with db.read() as conn:
        tables = [
            r["table_name"]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
            ).fetchall()
        ]
        found = []
        for table in tables:
            hit = conn.execute(
                sql.SQL("SELECT 1 FROM {} AS t WHERE strpos(t::text, %s) > 0 LIMIT 1").format(
                    sql.Identifier(table)
                ),
                (text,),
            ).fetchone()
            if hit:
                found.append(table)
    return found


# --------------------------------------------------------------------------- create


def test_create_prints_the_runbook_block_and_the_key_once(cli: Cli, db: Database) -> None:
    result = cli.ok(
        "agent", "create", "--name", "my-agent", "--description", "My AI agent", "--owner", "user@example.com"
    )

    lines = result.stdout.splitlines()
    assert lines[0] == "Agent created successfully:"
    fields = block(result.stdout)
    assert list(fields) == ["Agent ID", "Name", "Owner", "Status", "API Key"]
    agent_id = uuid.UUID(fields["Agent ID"])
    assert fields["Name"] == "my-agent"
    assert fields["Owner"] == "user@example.com"
    assert fields["Status"] == "active"
    api_key = fields["API Key"]
    assert API_KEY.match(api_key), api_key
    # the warning goes to stderr, never the key itself
    assert "only a hash of it is stored" in result.stderr
    assert api_key not in result.stderr

    (agent,) = rows(db, "SELECT * FROM agents")
    assert agent["agent_id"] == agent_id
    assert (agent["name"], agent["owner"], agent["description"], agent["status"]) == (
        "my-agent",
        "user@example.com",
        "My AI agent",
        "active",
    )
    assert agent["parent_id"] is None

    # only a 32-byte digest of the secret is stored, under the public key id
    key_id, secret = split_key(api_key)
    (credential,) = rows(db, "SELECT * FROM agent_credentials")
    assert credential["agent_id"] == agent_id
    assert credential["key_id"] == key_id
    assert credential["revoked_at"] is None
    digest = bytes(credential["secret_hash"])
    assert len(digest) == 32
    assert secret_matches(secret, digest)
    assert not secret_matches(secret + "x", digest)

    # neither the key nor its secret is in any table (the audit log records the public key id only)
    assert tables_containing(db, secret) == []
    assert tables_containing(db, api_key) == []
    (record,) = rows(db, "SELECT * FROM audit_log")
    assert record["details"]["key_id"] == key_id
    assert secret not in json.dumps(record["details"])

    # and it is never shown again
    shown = cli.ok("agent", "get", "--agent-id", str(agent_id))
    assert "API Key" not in shown.stdout
    assert secret not in shown.stdout
    listed = cli.ok("agent", "list", "--format", "json")
    assert secret not in listed.stdout


def test_create_as_json(cli: Cli, db: Database) -> None:
    result = cli.ok(
        "agent", "create", "--name", "json-agent", "--owner", "ops@example.com", "--format", "json"
    )
    data = json.loads(result.stdout)
    assert data["name"] == "json-agent"
    assert data["owner"] == "ops@example.com"
    assert data["status"] == "active"
    assert data["parent_id"] is None
    assert data["description"] == ""
    assert API_KEY.match(data["api_key"])
    (agent,) = rows(db, "SELECT agent_id FROM agents")
    assert str(agent["agent_id"]) == data["agent_id"]
    (credential,) = rows(db, "SELECT secret_hash FROM agent_credentials")
    assert secret_matches(split_key(data["api_key"])[1], bytes(credential["secret_hash"]))

    # every agent gets its own key
    other = json.loads(
        cli.ok("agent", "create", "--name", "other", "--owner", "o@example.com", "--format", "json").stdout
    )
    assert split_key(other["api_key"])[0] != split_key(data["api_key"])[0]
    assert split_key(other["api_key"])[1] != split_key(data["api_key"])[1]


def test_duplicate_name_is_refused(cli: Cli, db: Database) -> None:
    create(cli, "my-agent")
    before = written(db)
    result = cli("agent", "create", "--name", "my-agent", "--owner", "other@example.com")
    assert_error(result, 1, "an agent named 'my-agent' already exists")
    assert written(db) == before


INVALID_NAMES = ["bad name", "-starts-with-dash", "", "x" * 201, "semi;colon", "名前"]


def test_invalid_name_or_empty_owner_is_bad_input(cli: Cli, db: Database) -> None:
    for name in INVALID_NAMES:
        result = cli("agent", "create", "--name", name, "--owner", "user@example.com")
        assert_error(result, 2, "invalid agent name")
    for owner in ["", "   "]:
        result = cli("agent", "create", "--name", "my-agent", "--owner", owner)
        assert_error(result, 2, "owner must be a non-empty name")
    assert written(db) == {"agents": 0, "agent_credentials": 0, "audit_log": 0}


def test_create_with_a_parent(cli: Cli, db: Database) -> None:
    parent = create(cli, "parent")["Agent ID"]
    child = create(cli, "child", "--parent-id", parent)
    assert child["Parent ID"] == parent
    (row,) = rows(db, "SELECT parent_id FROM agents WHERE name = 'child'")
    assert str(row["parent_id"]) == parent
    shown = block(cli.ok("agent", "get", "--agent-id", child["Agent ID"]).stdout)
    assert shown["Parent ID"] == parent


def test_unknown_or_malformed_parent_writes_nothing(cli: Cli, db: Database) -> None:
    result = cli("agent", "create", "--name", "child", "--owner", "o@example.com", "--parent-id", UNKNOWN)
    assert_error(result, 1, f"parent agent {UNKNOWN} not found")
    result = cli("agent", "create", "--name", "child", "--owner", "o@example.com", "--parent-id", "nope")
    assert_error(result, 2, "malformed parent id 'nope'")
    assert written(db) == {"agents": 0, "agent_credentials": 0, "audit_log": 0}


def test_suspended_parent_cannot_delegate(cli: Cli, db: Database) -> None:
    parent = create(cli, "parent")["Agent ID"]
    cli.ok("agent", "suspend", "--agent-id", parent)
    before = written(db)
    result = cli("agent", "create", "--name", "child", "--owner", "o@example.com", "--parent-id", parent)
    assert_error(result, 1, "suspended")
    assert written(db) == before


# --------------------------------------------------------------------------- list and get


def test_list_as_table_and_json(cli: Cli) -> None:
    assert "No agents yet" in cli.ok("agent", "list").stdout
    alpha = create(cli, "alpha")["Agent ID"]
    beta = create(cli, "beta", "--parent-id", alpha)["Agent ID"]
    cli.ok("agent", "suspend", "--agent-id", beta)

    lines = cli.ok("agent", "list").stdout.splitlines()
    assert lines[0].split() == ["AGENT", "ID", "NAME", "OWNER", "STATUS", "PARENT", "ID", "CREATED"]
    assert len(lines) == 3
    assert lines[1].split()[:5] == [alpha, "alpha", "user@example.com", "active", "-"]
    assert lines[2].split()[:5] == [beta, "beta", "user@example.com", "suspended", alpha]

    data = json.loads(cli.ok("agent", "list", "--format", "json").stdout)
    assert [(a["agent_id"], a["name"], a["status"], a["parent_id"]) for a in data] == [
        (alpha, "alpha", "active", None),
        (beta, "beta", "suspended", alpha),
    ]
    assert all("api_key" not in a for a in data)

    suspended = json.loads(cli.ok("agent", "list", "--status", "suspended", "--format", "json").stdout)
    assert [a["name"] for a in suspended] == ["beta"]
    assert_error(cli("agent", "list", "--status", "asleep"), 2, "unknown status")


def test_get_shows_the_agent(cli: Cli) -> None:
    agent_id = block(
        cli.ok(
            "agent",
            "create",
            "--name",
            "my-agent",
            "--description",
            "My AI agent",
            "--owner",
            "user@example.com",
        ).stdout
    )["Agent ID"]
    result = cli.ok("agent", "get", "--agent-id", agent_id)
    assert result.stdout.splitlines()[0] == "Agent:"
    fields = block(result.stdout)
    assert fields["Agent ID"] == agent_id
    assert fields["Name"] == "my-agent"
    assert fields["Owner"] == "user@example.com"
    assert fields["Status"] == "active"
    assert fields["Description"] == "My AI agent"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", fields["Created At"])

    data = json.loads(cli.ok("agent", "get", "--agent-id", agent_id, "--format", "json").stdout)
    assert data["agent_id"] == agent_id
    assert data["description"] == "My AI agent"


def test_get_unknown_or_malformed_agent(cli: Cli) -> None:
    assert_error(cli("agent", "get", "--agent-id", UNKNOWN), 1, f"agent {UNKNOWN} not found")
    assert_error(cli("agent", "get", "--agent-id", "12345"), 2, "malformed agent id '12345'")


# --------------------------------------------------------------------------- lifecycle


def lifecycle_records(db: Database, agent_id: str) -> list[tuple[str, str | None, dict[str, Any]]]:
    return [
        (r["action"], r["reason"], r["details"])
        for r in rows(
            db,
            "SELECT action, reason, details FROM audit_log WHERE agent_id = %s AND action <> 'agent.create' "
            "ORDER BY audit_id",
            agent_id,
        )
    ]


def test_suspend_twice_is_a_no_op_then_activate(cli: Cli, db: Database) -> None:
    agent_id = create(cli)["Agent ID"]

    first = cli.ok("agent", "suspend", "--agent-id", agent_id, "--reason", "runaway spending")
    assert first.stdout.splitlines()[0] == "Agent suspended:"
    assert block(first.stdout)["Status"] == "suspended"
    assert rows(db, "SELECT status FROM agents")[0]["status"] == "suspended"

    again = cli.ok("agent", "suspend", "--agent-id", agent_id, "--reason", "again")
    assert again.stdout.strip() == f"Agent {agent_id} is already suspended; nothing changed."
    assert lifecycle_records(db, agent_id) == [
        ("agent.suspend", "runaway spending", {"from": "active", "to": "suspended"})
    ]

    activated = cli.ok("agent", "activate", "--agent-id", agent_id)
    assert activated.stdout.splitlines()[0] == "Agent activated:"
    assert block(activated.stdout)["Status"] == "active"
    assert rows(db, "SELECT status FROM agents")[0]["status"] == "active"
    assert cli.ok("agent", "activate", "--agent-id", agent_id).stdout.strip() == (
        f"Agent {agent_id} is already active; nothing changed."
    )
    assert [r[0] for r in lifecycle_records(db, agent_id)] == ["agent.suspend", "agent.activate"]


def test_lifecycle_of_unknown_or_malformed_agent(cli: Cli, db: Database) -> None:
    for command in ["suspend", "activate", "rotate-key"]:
        assert_error(cli("agent", command, "--agent-id", UNKNOWN), 1, f"agent {UNKNOWN} not found")
        assert_error(cli("agent", command, "--agent-id", "not-a-uuid"), 2, "malformed agent id")
    assert written(db) == {"agents": 0, "agent_credentials": 0, "audit_log": 0}


def test_rotate_key_revokes_the_old_key(cli: Cli, db: Database) -> None:
    created = create(cli)
    agent_id, old_key = created["Agent ID"], created["API Key"]

    result = cli.ok("agent", "rotate-key", "--agent-id", agent_id, "--reason", "leaked in a log")
    assert result.stdout.splitlines()[0] == "API key rotated:"
    fields = block(result.stdout)
    assert fields["Agent ID"] == agent_id
    new_key = fields["API Key"]
    assert API_KEY.match(new_key)
    assert new_key != old_key
    assert new_key not in result.stderr

    old_id, old_secret = split_key(old_key)
    new_id, new_secret = split_key(new_key)
    assert old_id != new_id
    assert old_secret != new_secret
    credentials = {
        r["key_id"]: r for r in rows(db, "SELECT * FROM agent_credentials WHERE agent_id = %s", agent_id)
    }
    assert set(credentials) == {old_id, new_id}
    old, new = credentials[old_id], credentials[new_id]
    assert old["revoked_at"] is not None
    assert secret_matches(old_secret, bytes(old["secret_hash"]))
    assert new["revoked_at"] is None
    assert secret_matches(new_secret, bytes(new["secret_hash"]))
    assert not secret_matches(old_secret, bytes(new["secret_hash"]))
    live = rows(
        db, "SELECT key_id FROM agent_credentials WHERE agent_id = %s AND revoked_at IS NULL", agent_id
    )
    assert [r["key_id"] for r in live] == [new_id]
    assert tables_containing(db, new_secret) == []

    (record,) = rows(db, "SELECT * FROM audit_log WHERE action = 'agent.rotate_key'")
    assert record["event_type"] == "credential"
    assert record["reason"] == "leaked in a log"
    assert record["details"] == {"key_id": new_id, "revoked": 1}

    # rotating again leaves exactly one live key, the newest
    newest = split_key(block(cli.ok("agent", "rotate-key", "--agent-id", agent_id).stdout)["API Key"])[0]
    live = rows(
        db, "SELECT key_id FROM agent_credentials WHERE agent_id = %s AND revoked_at IS NULL", agent_id
    )
    assert [r["key_id"] for r in live] == [newest]


def test_rotate_key_as_json(cli: Cli, db: Database) -> None:
    agent_id = create(cli)["Agent ID"]
    data = json.loads(cli.ok("agent", "rotate-key", "--agent-id", agent_id, "--format", "json").stdout)
    assert data["agent_id"] == agent_id
    key_id, secret = split_key(data["api_key"])
    (live,) = rows(db, "SELECT key_id, secret_hash FROM agent_credentials WHERE revoked_at IS NULL")
    assert live["key_id"] == key_id
    assert secret_matches(secret, bytes(live["secret_hash"]))
