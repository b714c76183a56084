"""``caracal audit`` against a real PostgreSQL: every change is recorded, queried, and tamper-evident."""

from __future__ import annotations

import getpass
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest

from caracal_ops.cli.main import app
from caracald.core.audit import AuditEntry, AuditEventType, chain_hash
from caracald.store.database import Database
from tests.clitools import block
from tests.integration.conftest import Cli, CliResult

pytestmark = pytest.mark.integration


def rows(db: Database, query: str, *params: object) -> list[dict[str, Any]]:
    with db.read() as conn:
        return conn.execute(query, params).fetchall()


def assert_error(result: CliResult, code: int, *fragments: str) -> None:
    """One line on stderr starting with ``Error:``, nothing on stdout, the given exit code."""
    assert result.exit_code == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result
    for fragment in fragments:
        assert fragment in lines[0], result
    assert result.stdout == "", result


def query(cli: Cli, *args: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads(cli.ok("audit", "query", "--format", "json", *args).stdout)
    return records


def agent(cli: Cli, name: str, actor: str = "tester@example.com") -> str:
    result = cli.ok("agent", "create", "--name", name, "--owner", "user@example.com", actor=actor)
    return block(result.stdout)["Agent ID"]


def seed(cli: Cli, count: int = 4) -> list[str]:
    """A few agent.create records, one per agent, with distinct times."""
    return [agent(cli, f"agent-{n}") for n in range(count)]


def tamper(db: Database, statement: str, *params: object) -> None:
    """As the superuser: switch the append-only trigger off, change the log, switch it back on."""
    with db.transaction() as conn:
        conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
        conn.execute(statement, params)
        conn.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only")


def verify(cli: Cli) -> tuple[CliResult, dict[str, str]]:
    result = cli("audit", "verify")
    return result, block(result.stdout)


# --------------------------------------------------------------------------- what is recorded


def test_every_change_command_is_audited(cli: Cli, db: Database, tmp_path: Path) -> None:
    agent_id = agent(cli, "my-agent", actor="alice@example.com")
    cli.ok("agent", "suspend", "--agent-id", agent_id, "--reason", "runaway loop", actor="bob@example.com")
    cli.ok("agent", "activate", "--agent-id", agent_id, "--reason", "loop fixed", actor="bob@example.com")
    cli.ok("agent", "rotate-key", "--agent-id", agent_id, "--reason", "key leaked", actor="carol@example.com")
    policy_id = block(
        cli.ok(
            "policy",
            "create",
            "--agent-id",
            agent_id,
            "--limit",
            "100",
            "--change-reason",
            "initial",
            actor="dave@example.com",
        ).stdout
    )["Policy ID"]
    cli.ok("policy", "update", "--policy-id", policy_id, "--limit", "150", "--change-reason", "growth",
           actor="erin@example.com")  # fmt: skip
    cli.ok("policy", "deactivate", "--policy-id", policy_id, "--change-reason", "retired",
           actor="erin@example.com")  # fmt: skip
    entry_id = block(
        cli.ok(
            "allowlist",
            "create",
            "--agent-id",
            agent_id,
            "--pattern",
            "https://api.anthropic.com/*",
            actor="frank@example.com",
        ).stdout
    )["Allowlist ID"]
    cli.ok("allowlist", "delete", "--allowlist-id", entry_id, actor="frank@example.com")
    cli.ok("pricebook", "set", "--model", "gpt-4o", "--input", "2.5", "--output", "10",
           actor="grace@example.com")  # fmt: skip
    cli.ok("pricebook", "set", "--pattern", "https://api.search.example/*", "--per-request", "0.005",
           actor="grace@example.com")  # fmt: skip
    prices = tmp_path / "prices.yaml"
    prices.write_text("- model: gpt-4o-mini\n  input: 0.15\n  output: 0.6\n")
    cli.ok("pricebook", "import", str(prices), actor="heidi@example.com")

    records = query(cli)
    assert [(r["actor"], r["event_type"], r["action"], r["reason"]) for r in records] == [
        ("alice@example.com", "agent_lifecycle", "agent.create", None),
        ("bob@example.com", "agent_lifecycle", "agent.suspend", "runaway loop"),
        ("bob@example.com", "agent_lifecycle", "agent.activate", "loop fixed"),
        ("carol@example.com", "credential", "agent.rotate_key", "key leaked"),
        ("dave@example.com", "policy_change", "policy.create", "initial"),
        ("erin@example.com", "policy_change", "policy.change", "growth"),
        ("erin@example.com", "policy_change", "policy.deactivate", "retired"),
        ("frank@example.com", "allowlist_change", "allowlist.create", None),
        ("frank@example.com", "allowlist_change", "allowlist.delete", None),
        ("grace@example.com", "pricebook_change", "pricebook.set_model", None),
        ("grace@example.com", "pricebook_change", "pricebook.set_resource", None),
        ("heidi@example.com", "pricebook_change", "pricebook.set_model", None),
    ]
    # ids ascend, subjects and agents point at what changed
    assert [r["audit_id"] for r in records] == sorted(r["audit_id"] for r in records)
    assert [r["subject_id"] for r in records[:4]] == [agent_id] * 4
    assert [r["subject_id"] for r in records[4:7]] == [policy_id] * 3
    assert [r["subject_id"] for r in records[7:9]] == [entry_id] * 2
    assert all(r["agent_id"] == agent_id for r in records[:9])
    assert all(r["agent_id"] is None for r in records[9:])
    # the details say what the change was
    assert (records[5]["details"]["limit"], records[5]["details"]["previous_limit"]) == ("150.00", "100.00")
    assert records[4]["details"]["limit"] == "100.00"
    assert records[6]["details"]["status"] == "inactive"
    assert records[7]["details"] == {"pattern": "https://api.anthropic.com/*", "pattern_type": "glob"}
    assert (
        records[11]["details"]["model"] == "gpt-4o-mini"
        and records[11]["details"]["input_per_mtok"] == "0.15"
    )

    # failed or no-op commands leave no record
    cli("policy", "create", "--agent-id", agent_id, "--limit", "-1", "--change-reason", "x")
    cli("agent", "create", "--name", "my-agent", "--owner", "someone@example.com")
    cli.ok("agent", "activate", "--agent-id", agent_id)
    assert len(query(cli)) == len(records)

    table = cli.ok("audit", "query").stdout.splitlines()
    assert table[0].split() == ["ID", "TIME", "ACTOR", "EVENT", "TYPE", "ACTION", "SUBJECT", "REASON"]
    assert len(table) == 1 + len(records)
    assert table[2].split()[2:7] == [
        "bob@example.com",
        "agent_lifecycle",
        "agent.suspend",
        agent_id,
        "runaway",
    ]


def test_actor_from_the_environment_or_the_os_user(cli: Cli, db: Database) -> None:
    # the fixture always passes --actor; CARACAL_ACTOR and the OS user are the other documented ways
    environments: list[tuple[str, dict[str, str | None]]] = [
        ("env-agent", {"CARACAL_ACTOR": "from-env@example.com"}),
        ("os-agent", {"CARACAL_ACTOR": None}),  # unset
    ]
    for name, env in environments:
        result = cli.runner.invoke(
            app,
            [
                "--database-url",
                cli.database_url,
                "agent",
                "create",
                "--name",
                name,
                "--owner",
                "o@example.com",
            ],
            env=env,
        )
        assert result.exit_code == 0, result.stderr
    actors = [r["actor"] for r in rows(db, "SELECT actor FROM audit_log ORDER BY audit_id")]
    assert actors == ["from-env@example.com", getpass.getuser()]


# --------------------------------------------------------------------------- query


def test_query_filters_by_event_type(cli: Cli) -> None:
    agent_id = agent(cli, "my-agent")
    cli.ok("agent", "rotate-key", "--agent-id", agent_id)
    cli.ok("policy", "create", "--agent-id", agent_id, "--limit", "100", "--change-reason", "initial")
    cli.ok("allowlist", "create", "--agent-id", agent_id, "--pattern", "https://api.anthropic.com/*")
    cli.ok("agent", "suspend", "--agent-id", agent_id)
    cli.ok("pricebook", "set", "--model", "gpt-4o", "--input", "2.5", "--output", "10")

    both = query(cli, "--event-type", "policy_change,agent_lifecycle")
    assert [r["action"] for r in both] == ["agent.create", "policy.create", "agent.suspend"]
    assert [r["action"] for r in query(cli, "--event-type", " Credential ")] == ["agent.rotate_key"]
    assert [r["action"] for r in query(cli, "--event-type", "pricebook_change")] == ["pricebook.set_model"]
    assert len(query(cli)) == 6
    assert cli.ok("audit", "query", "--event-type", "database").stdout.strip() == "No audit records match."

    other = agent(cli, "other-agent")
    assert [r["action"] for r in query(cli, "--agent-id", other)] == ["agent.create"]
    assert [r["action"] for r in query(cli, "--agent-id", agent_id, "--event-type", "agent_lifecycle")] == [
        "agent.create",
        "agent.suspend",
    ]
    assert [r["action"] for r in query(cli, "--limit", "2")] == ["agent.create", "agent.rotate_key"]


def test_query_filters_by_time(cli: Cli) -> None:
    seed(cli)
    records = query(cli)
    times = [r["occurred_at"] for r in records]
    assert times == sorted(times) and len(set(times)) == 4
    ids = [r["audit_id"] for r in records]

    # both bounds are inclusive
    assert [r["audit_id"] for r in query(cli, "--start-time", times[1])] == ids[1:]
    assert [r["audit_id"] for r in query(cli, "--end-time", times[2])] == ids[:3]
    assert [r["audit_id"] for r in query(cli, "--start-time", times[1], "--end-time", times[2])] == ids[1:3]
    assert query(cli, "--start-time", "2000-01-01T00:00:00Z", "--end-time", "2000-12-31T23:59:59Z") == []
    assert query(cli, "--end-time", "2000-01-01") == []
    assert len(query(cli, "--start-time", "2000-01-01", "--end-time", "now")) == 4
    # an offset is honoured: the same instant written in another zone
    paris_summer = timezone(timedelta(hours=2))
    second = datetime.fromisoformat(times[1].replace("Z", "+00:00")).astimezone(paris_summer).isoformat()
    assert second.endswith("+02:00")
    assert [r["audit_id"] for r in query(cli, "--start-time", second)] == ids[1:]


def test_query_bad_input(cli: Cli) -> None:
    seed(cli, 1)
    assert_error(
        cli("audit", "query", "--event-type", "policy_change,nonsense"), 2, "unknown event type nonsense"
    )
    assert_error(cli("audit", "query", "--start-time", "yesterday"), 2, "invalid start time 'yesterday'")
    assert_error(cli("audit", "query", "--end-time", "2024-02-30T00:00:00Z"), 2, "invalid end time")
    assert_error(
        cli("audit", "query", "--start-time", "2024-02-01", "--end-time", "2024-01-01"),
        2,
        "end time must not be before start time",
    )
    assert_error(cli("audit", "query", "--agent-id", "nope"), 2, "malformed agent id")


def test_query_as_json(cli: Cli) -> None:
    agent_id = agent(cli, "my-agent", actor="alice@example.com")
    (record,) = query(cli)
    assert set(record) == {
        "audit_id", "occurred_at", "actor", "event_type", "action", "subject_id", "agent_id", "reason",
        "details", "record_hash",
    }  # fmt: skip
    assert record["audit_id"] == 1
    assert record["occurred_at"].endswith("Z")
    assert (record["actor"], record["event_type"], record["action"]) == (
        "alice@example.com",
        "agent_lifecycle",
        "agent.create",
    )
    assert record["subject_id"] == agent_id == record["agent_id"]
    assert record["details"]["name"] == "my-agent"
    assert len(bytes.fromhex(record["record_hash"])) == 32


# --------------------------------------------------------------------------- verify


def test_verify_passes_on_a_clean_log(cli: Cli) -> None:
    empty, fields = verify(cli)
    assert empty.exit_code == 0, empty
    assert fields == {"Records Checked": "0", "Integrity": "PASSED", "Tamper Detected": "No"}

    seed(cli, 3)
    result, fields = verify(cli)
    assert result.exit_code == 0, result
    assert result.stdout.splitlines()[0] == "Audit Chain Verification:"
    assert fields == {"Records Checked": "3", "Integrity": "PASSED", "Tamper Detected": "No"}
    data = json.loads(cli.ok("audit", "verify", "--format", "json").stdout)
    assert data == {"records": 3, "integrity": "PASSED", "first_bad_id": None, "problem": None}


def test_the_log_is_append_only(cli: Cli, db: Database) -> None:
    seed(cli, 2)
    for statement in ["UPDATE audit_log SET actor = 'mallory' WHERE audit_id = 1", "DELETE FROM audit_log"]:
        refused = pytest.raises(
            psycopg.errors.IntegrityConstraintViolation, match="audit_log rows are immutable"
        )
        with refused, db.transaction() as conn:
            conn.execute(statement)
    assert verify(cli)[0].exit_code == 0


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET actor = 'mallory@example.com' WHERE audit_id = 2",
        "UPDATE audit_log SET reason = 'nothing happened' WHERE audit_id = 2",
        'UPDATE audit_log SET details = details || \'{"owner": "mallory"}\' WHERE audit_id = 2',
        "UPDATE audit_log SET occurred_at = occurred_at - interval '1 day' WHERE audit_id = 2",
    ],
)
def test_verify_detects_a_changed_record(cli: Cli, db: Database, statement: str) -> None:
    seed(cli)
    tamper(db, statement)
    result, fields = verify(cli)
    assert result.exit_code == 1, result
    assert fields["Integrity"] == "FAILED"
    assert fields["Tamper Detected"] == "Yes"
    assert fields["First Bad Record"] == "2: content does not match its hash"
    assert fields["Records Checked"] == "1"


def test_verify_detects_a_deleted_record(cli: Cli, db: Database) -> None:
    seed(cli)
    tamper(db, "DELETE FROM audit_log WHERE audit_id = 2")
    result, fields = verify(cli)
    assert result.exit_code == 1, result
    assert fields["Integrity"] == "FAILED"
    # record 3 no longer chains onto what now comes before it
    assert fields["First Bad Record"] == "3: does not point at the record before it"

    data = json.loads(cli("audit", "verify", "--format", "json").stdout)
    assert (data["integrity"], data["first_bad_id"]) == ("FAILED", 3)


def test_verify_detects_a_rehashed_record(cli: Cli, db: Database) -> None:
    """Rewriting a record and its own hash still breaks the link from the next record."""
    seed(cli)
    with db.read() as conn:
        row = conn.execute("SELECT * FROM audit_log WHERE audit_id = 2").fetchone()
    assert row is not None
    forged = AuditEntry(
        occurred_at=row["occurred_at"],
        actor="mallory@example.com",
        event_type=AuditEventType(row["event_type"]),
        action=row["action"],
        subject_id=row["subject_id"],
        agent_id=str(row["agent_id"]),
        reason=row["reason"],
        details=row["details"],
    )
    tamper(
        db,
        "UPDATE audit_log SET actor = %s, record_hash = %s WHERE audit_id = 2",
        forged.actor,
        chain_hash(bytes(row["prev_hash"]), forged),
    )
    result, fields = verify(cli)
    assert result.exit_code == 1, result
    assert fields["First Bad Record"] == "3: does not point at the record before it"
