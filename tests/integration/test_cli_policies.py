"""``caracal policy`` against a real PostgreSQL: budgets, their immutable versions, delegation limits."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import sql

from caracald.store.database import Database
from tests.clitools import block
from tests.integration.conftest import Cli, CliResult

pytestmark = pytest.mark.integration

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def rows(db: Database, query: str, *params: object) -> list[dict[str, Any]]:
    with db.read() as conn:
        return conn.execute(query, params).fetchall()


def written(db: Database) -> dict[str, int]:
    counts = {}
    with db.read() as conn:
        for table in ("policies", "policy_versions", "audit_log"):
            row = conn.execute(
                sql.SQL("SELECT count(*) AS n FROM {}").format(sql.Identifier(table))
            ).fetchone()
            assert row is not None
            counts[table] = int(row["n"])
    return counts


def assert_error(result: CliResult, code: int, *fragments: str) -> None:
    """One line on stderr starting with ``Error:``, nothing on stdout, the given exit code."""
    assert result.exit_code == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result
    for fragment in fragments:
        assert fragment in lines[0], result
    assert result.stdout == "", result


def agent(cli: Cli, name: str = "my-agent", parent: str | None = None) -> str:
    extra = ["--parent-id", parent] if parent else []
    result = cli.ok("agent", "create", "--name", name, "--owner", "user@example.com", *extra)
    return block(result.stdout)["Agent ID"]


def create_policy(cli: Cli, agent_id: str, limit: str, *extra: str, actor: str = "tester@example.com") -> str:
    result = cli.ok(
        "policy",
        "create",
        "--agent-id",
        agent_id,
        "--limit",
        limit,
        "--change-reason",
        "budget",
        *extra,
        actor=actor,
    )
    return block(result.stdout)["Policy ID"]


def policy_create(cli: Cli, agent_id: str, limit: str, *extra: str) -> CliResult:
    return cli(
        "policy", "create", "--agent-id", agent_id, "--limit", limit, "--change-reason", "budget", *extra
    )


# --------------------------------------------------------------------------- create


def test_create_matches_the_runbook(cli: Cli, db: Database) -> None:
    agent_id = agent(cli)
    result = cli.ok(
        "policy", "create", "--agent-id", agent_id, "--limit", "100.00", "--currency", "USD",
        "--time-window", "daily", "--window-type", "calendar", "--change-reason", "Initial budget allocation",
    )  # fmt: skip
    policy_id = block(result.stdout)["Policy ID"]
    assert re.fullmatch(UUID, policy_id)
    assert result.stdout == (
        "Policy created successfully:\n"
        f"  Policy ID: {policy_id}\n"
        f"  Agent ID: {agent_id}\n"
        "  Limit: $100.00 USD\n"
        "  Time Window: daily (calendar)\n"
        "  Status: active\n"
        "  Version: 1\n"
    )

    (version,) = rows(db, "SELECT * FROM policy_versions")
    assert str(version["policy_id"]) == policy_id
    assert version["version"] == 1
    assert version["limit_amount"] == Decimal("100")
    assert (version["currency"], version["time_window"], version["window_type"], version["timezone"]) == (
        "USD",
        "daily",
        "calendar",
        "UTC",
    )
    assert (version["status"], version["change_reason"], version["changed_by"]) == (
        "active",
        "Initial budget allocation",
        "tester@example.com",
    )
    (policy,) = rows(db, "SELECT * FROM policies")
    assert str(policy["agent_id"]) == agent_id
    assert policy["current_version"] == 1


def test_create_with_other_terms(cli: Cli) -> None:
    agent_id = agent(cli)
    result = cli.ok(
        "policy", "create", "--agent-id", agent_id, "--limit", "1500", "--currency", "jpy", "--time-window",
        "monthly", "--window-type", "rolling", "--timezone", "Asia/Tokyo", "--change-reason", "yen budget",
    )  # fmt: skip
    fields = block(result.stdout)
    assert fields["Limit"] == "¥1,500 JPY"
    assert fields["Time Window"] == "monthly (rolling)"
    assert fields["Time Zone"] == "Asia/Tokyo"

    data = json.loads(
        cli.ok(
            "policy",
            "create",
            "--agent-id",
            agent_id,
            "--limit",
            "12.5",
            "--currency",
            "EUR",
            "--change-reason",
            "euros",
            "--format",
            "json",
        ).stdout
    )
    assert data["limit"] == "12.50"
    assert data["currency"] == "EUR"
    assert (data["time_window"], data["window_type"], data["timezone"]) == ("daily", "calendar", "UTC")
    assert (data["version"], data["status"], data["change_reason"]) == (1, "active", "euros")


# (option overrides, what the one-line error says)
BAD_INPUTS: list[tuple[dict[str, str], str]] = [
    ({"--limit": "-5"}, "limit must be greater than zero"),
    ({"--limit": "0"}, "limit must be greater than zero"),
    ({"--limit": "0.00"}, "limit must be greater than zero"),
    ({"--limit": "abc"}, "limit 'abc' is not a number"),
    ({"--limit": "12,50"}, "is not a number"),
    ({"--limit": "1e999"}, "too large"),
    ({"--limit": "1e30"}, "too large"),
    ({"--limit": "NaN"}, "not a finite number"),
    ({"--limit": "Infinity"}, "not a finite number"),
    ({"--limit": "100.001"}, "limit 100.001 has more than 2 decimal places for USD"),
    ({"--limit": "1.5", "--currency": "JPY"}, "limit 1.5 has more than 0 decimal places for JPY"),
    ({"--currency": "USX"}, "unknown currency 'USX'"),
    ({"--currency": "dollars"}, "unknown currency"),
    ({"--time-window": "yearly"}, "unknown window 'yearly'"),
    ({"--window-type": "sliding"}, "unknown window type 'sliding'"),
    ({"--timezone": "Mars/Olympus_Mons"}, "unknown time zone 'Mars/Olympus_Mons'"),
    ({"--change-reason": ""}, "a change reason is required"),
    ({"--change-reason": "   "}, "a change reason is required"),
    ({"--agent-id": "not-a-uuid"}, "malformed agent id"),
]


def test_every_bad_input_is_refused_and_writes_nothing(cli: Cli, db: Database) -> None:
    agent_id = agent(cli)
    before = written(db)
    for overrides, message in BAD_INPUTS:
        options = {
            "--agent-id": agent_id,
            "--limit": "100",
            "--currency": "USD",
            "--time-window": "daily",
            "--window-type": "calendar",
            "--timezone": "UTC",
            "--change-reason": "budget",
            **overrides,
        }
        args = [part for option in options.items() for part in option]
        result = cli("policy", "create", *args)
        assert_error(result, 2, message)
        assert written(db) == before, overrides


def test_policy_for_a_suspended_or_unknown_agent_is_refused(cli: Cli, db: Database) -> None:
    agent_id = agent(cli)
    cli.ok("agent", "suspend", "--agent-id", agent_id)
    before = written(db)
    assert_error(policy_create(cli, agent_id, "100"), 1, "suspended")
    unknown = "550e8400-e29b-41d4-a716-446655440000"
    assert_error(policy_create(cli, unknown, "100"), 1, f"agent {unknown} not found")
    assert written(db) == before


# --------------------------------------------------------------------------- versions


def test_update_writes_a_new_version_and_history_keeps_both(cli: Cli, db: Database) -> None:
    agent_id = agent(cli)
    policy_id = create_policy(cli, agent_id, "100", actor="alice@example.com")

    result = cli.ok(
        "policy", "update", "--policy-id", policy_id, "--limit", "150", "--change-reason", "Q2 growth",
        actor="bob@example.com",
    )  # fmt: skip
    assert result.stdout.splitlines()[0] == "Policy updated successfully:"
    fields = block(result.stdout)
    assert (fields["Policy ID"], fields["Limit"], fields["Version"]) == (policy_id, "$150.00 USD", "2")

    versions = rows(db, "SELECT * FROM policy_versions ORDER BY version")
    assert [(v["version"], v["limit_amount"], v["change_reason"], v["changed_by"]) for v in versions] == [
        (1, Decimal("100"), "budget", "alice@example.com"),
        (2, Decimal("150"), "Q2 growth", "bob@example.com"),
    ]
    assert rows(db, "SELECT current_version FROM policies")[0]["current_version"] == 2

    history = json.loads(cli.ok("policy", "history", "--agent-id", agent_id, "--format", "json").stdout)
    assert [(h["version"], h["limit"], h["change_reason"], h["changed_by"]) for h in history] == [
        (1, "100.00", "budget", "alice@example.com"),
        (2, "150.00", "Q2 growth", "bob@example.com"),
    ]
    table = cli.ok("policy", "history", "--agent-id", agent_id).stdout.splitlines()
    assert "REASON" in table[0]
    assert "CHANGED BY" in table[0]
    assert "$100.00 USD" in table[1]
    assert "alice@example.com" in table[1]
    assert table[1].endswith("budget")
    assert "$150.00 USD" in table[2]
    assert "bob@example.com" in table[2]
    assert table[2].endswith("Q2 growth")

    # only the current version is listed
    listed = json.loads(cli.ok("policy", "list", "--agent-id", agent_id, "--format", "json").stdout)
    assert [(p["policy_id"], p["version"], p["limit"]) for p in listed] == [(policy_id, 2, "150.00")]


def test_bad_update_writes_nothing(cli: Cli, db: Database) -> None:
    agent_id = agent(cli)
    policy_id = create_policy(cli, agent_id, "100")
    before = written(db)
    for limit, reason, code, message in [
        ("-1", "r", 2, "greater than zero"),
        ("10.005", "r", 2, "more than 2 decimal places"),
        ("1e999", "r", 2, "too large"),
        ("50", " ", 2, "change reason is required"),
    ]:
        result = cli(
            "policy", "update", "--policy-id", policy_id, "--limit", limit, "--change-reason", reason
        )
        assert_error(result, code, message)
    unknown = "550e8400-e29b-41d4-a716-446655440000"
    result = cli("policy", "update", "--policy-id", unknown, "--limit", "5", "--change-reason", "r")
    assert_error(result, 1, f"policy {unknown} not found")
    assert written(db) == before


def test_deactivate_and_list_all(cli: Cli, db: Database) -> None:
    agent_id = agent(cli)
    kept = create_policy(cli, agent_id, "100")
    stopped = create_policy(cli, agent_id, "500", "--time-window", "monthly")

    result = cli.ok("policy", "deactivate", "--policy-id", stopped, "--change-reason", "project ended")
    assert result.stdout.splitlines()[0] == "Policy deactivated:"
    fields = block(result.stdout)
    assert (fields["Policy ID"], fields["Status"], fields["Version"]) == (stopped, "inactive", "2")
    (latest,) = rows(db, "SELECT * FROM policy_versions WHERE policy_id = %s AND version = 2", stopped)
    assert latest["status"] == "inactive"
    assert latest["change_reason"] == "project ended"
    assert latest["limit_amount"] == Decimal("500")

    listed = cli.ok("policy", "list", "--agent-id", agent_id).stdout
    assert kept in listed
    assert stopped not in listed
    everything = json.loads(
        cli.ok("policy", "list", "--agent-id", agent_id, "--all", "--format", "json").stdout
    )
    assert {(p["policy_id"], p["status"]) for p in everything} == {(kept, "active"), (stopped, "inactive")}
    table = cli.ok("policy", "list", "--agent-id", agent_id, "--all").stdout
    assert any(stopped in line and "inactive" in line for line in table.splitlines())

    before = written(db)
    again = cli("policy", "deactivate", "--policy-id", stopped, "--change-reason", "again")
    assert_error(again, 1, "already inactive")
    update = cli("policy", "update", "--policy-id", stopped, "--limit", "5", "--change-reason", "r")
    assert_error(update, 1, "inactive")
    assert written(db) == before

    # an agent with no policies at all
    other = agent(cli, "other")
    assert cli.ok("policy", "list", "--agent-id", other).stdout.strip() == "No policies for this agent."


def test_policy_versions_cannot_be_changed_even_with_sql(cli: Cli, db: Database) -> None:
    policy_id = create_policy(cli, agent(cli), "100")
    for statement in [
        "UPDATE policy_versions SET limit_amount = 1000000 WHERE policy_id = %s",
        "UPDATE policy_versions SET change_reason = 'nothing to see' WHERE policy_id = %s",
        "DELETE FROM policy_versions WHERE policy_id = %s",
    ]:
        refused = pytest.raises(
            psycopg.errors.IntegrityConstraintViolation, match="policy_versions rows are immutable"
        )
        with refused, db.transaction() as conn:
            conn.execute(statement, (policy_id,))
    (version,) = rows(db, "SELECT limit_amount, change_reason FROM policy_versions")
    assert (version["limit_amount"], version["change_reason"]) == (Decimal("100"), "budget")


# --------------------------------------------------------------------------- delegation


def test_child_limit_is_bounded_by_the_parents_daily_budget(cli: Cli, db: Database) -> None:
    parent = agent(cli, "parent-agent")
    parent_policy = create_policy(cli, parent, "100")
    child = agent(cli, "child-agent", parent)

    before = written(db)
    result = policy_create(cli, child, "150")
    assert_error(result, 1, "exceeds", "$100.00 USD daily", "parent-agent", parent_policy)
    assert written(db) == before

    create_policy(cli, child, "100")  # equal is fine
    create_policy(cli, child, "40.50")


def test_child_daily_limit_is_bounded_by_the_parents_monthly_budget(cli: Cli, db: Database) -> None:
    parent = agent(cli, "parent-agent")
    create_policy(cli, parent, "80", "--time-window", "monthly")
    child = agent(cli, "child-agent", parent)
    before = written(db)
    assert_error(policy_create(cli, child, "90"), 1, "$80.00 USD monthly", "parent-agent")
    assert written(db) == before
    create_policy(cli, child, "20")


def test_grandchild_is_bounded_by_the_grandparent(cli: Cli) -> None:
    root = agent(cli, "root-agent")
    create_policy(cli, root, "100")
    middle = agent(cli, "middle-agent", root)  # no policy of its own
    leaf = agent(cli, "leaf-agent", middle)
    assert_error(policy_create(cli, leaf, "100.01"), 1, "root-agent")
    create_policy(cli, leaf, "99.99")


def test_parent_cannot_be_lowered_below_a_delegated_budget(cli: Cli, db: Database) -> None:
    parent = agent(cli, "parent-agent")
    parent_policy = create_policy(cli, parent, "100")
    child = agent(cli, "child-agent", parent)
    child_policy = create_policy(cli, child, "60")

    before = written(db)
    result = cli("policy", "update", "--policy-id", parent_policy, "--limit", "50", "--change-reason", "cut")
    assert_error(result, 1, "below the $60.00 USD daily budget", "child-agent", child_policy)
    assert written(db) == before
    assert (
        rows(db, "SELECT current_version FROM policies WHERE policy_id = %s", parent_policy)[0][
            "current_version"
        ]
        == 1
    )

    # nor can a child be raised above its parent
    result = cli("policy", "update", "--policy-id", child_policy, "--limit", "120", "--change-reason", "more")
    assert_error(result, 1, "parent-agent")
    assert written(db) == before

    cli.ok(
        "policy",
        "update",
        "--policy-id",
        parent_policy,
        "--limit",
        "60",
        "--change-reason",
        "cut to the child",
    )


def test_currency_is_part_of_comparability(cli: Cli) -> None:
    parent = agent(cli, "parent-agent")
    create_policy(cli, parent, "100", "--currency", "USD")
    child = agent(cli, "child-agent", parent)
    eur = create_policy(cli, child, "500", "--currency", "EUR")
    listed = json.loads(cli.ok("policy", "list", "--agent-id", child, "--format", "json").stdout)
    assert [(p["policy_id"], p["limit"], p["currency"]) for p in listed] == [(eur, "500.00", "EUR")]
    # but a USD one above the parent's is still refused
    assert_error(policy_create(cli, child, "500", "--currency", "USD"), 1, "parent-agent")
