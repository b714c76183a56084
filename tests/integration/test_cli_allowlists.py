"""``caracal allowlist`` against a real PostgreSQL: what an agent may call, matched on the whole URL."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from psycopg import sql

from caracald.store.database import Database
from tests.clitools import block
from tests.integration.conftest import Cli, CliResult

pytestmark = pytest.mark.integration

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
OPENAI_REGEX = r"^https://api\.openai\.com/.*$"
ANTHROPIC_GLOB = "https://api.anthropic.com/*"
CHAT = "https://api.openai.com/v1/chat/completions"


def rows(db: Database, query: str, *params: object) -> list[dict[str, Any]]:
    with db.read() as conn:
        return conn.execute(query, params).fetchall()


def written(db: Database) -> dict[str, int]:
    counts = {}
    with db.read() as conn:
        for table in ("allowlists", "audit_log"):
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


def agent(cli: Cli, name: str = "my-agent") -> str:
    return block(cli.ok("agent", "create", "--name", name, "--owner", "user@example.com").stdout)["Agent ID"]


def allow(cli: Cli, agent_id: str, pattern: str, pattern_type: str) -> str:
    result = cli.ok(
        "allowlist", "create", "--agent-id", agent_id, "--pattern", pattern, "--pattern-type", pattern_type
    )
    return block(result.stdout)["Allowlist ID"]


def check(cli: Cli, agent_id: str, resource: str) -> CliResult:
    return cli("allowlist", "test", "--agent-id", agent_id, "--resource", resource)


# --------------------------------------------------------------------------- create


def test_runbook_examples(cli: Cli, db: Database) -> None:
    agent_id = agent(cli)
    regex = cli.ok(
        "allowlist", "create", "--agent-id", agent_id, "--pattern", OPENAI_REGEX, "--pattern-type", "regex",
        actor="alice@example.com",
    )  # fmt: skip
    glob = cli.ok(
        "allowlist", "create", "--agent-id", agent_id, "--pattern", ANTHROPIC_GLOB, "--pattern-type", "glob"
    )
    for result, pattern, kind in [(regex, OPENAI_REGEX, "regex"), (glob, ANTHROPIC_GLOB, "glob")]:
        assert result.stdout.splitlines()[0] == "Allowlist created successfully:"
        fields = block(result.stdout)
        assert list(fields) == ["Allowlist ID", "Agent ID", "Pattern", "Pattern Type", "Status"]
        assert re.fullmatch(UUID, fields["Allowlist ID"])
        assert (fields["Agent ID"], fields["Pattern"], fields["Pattern Type"], fields["Status"]) == (
            agent_id,
            pattern,
            kind,
            "active",
        )

    stored = rows(db, "SELECT * FROM allowlists ORDER BY created_at")
    assert [(r["pattern"], r["pattern_type"], r["status"], r["created_by"]) for r in stored] == [
        (OPENAI_REGEX, "regex", "active", "alice@example.com"),
        (ANTHROPIC_GLOB, "glob", "active", "tester@example.com"),
    ]
    assert str(stored[0]["allowlist_id"]) == block(regex.stdout)["Allowlist ID"]

    table = cli.ok("allowlist", "list", "--agent-id", agent_id).stdout.splitlines()
    assert table[0].split() == ["ALLOWLIST", "ID", "PATTERN", "TYPE", "STATUS", "CREATED"]
    assert table[1].split()[1:4] == [OPENAI_REGEX, "regex", "active"]
    assert table[2].split()[1:4] == [ANTHROPIC_GLOB, "glob", "active"]
    listed = json.loads(cli.ok("allowlist", "list", "--agent-id", agent_id, "--format", "json").stdout)
    assert [(e["pattern"], e["pattern_type"], e["status"], e["deleted_at"]) for e in listed] == [
        (OPENAI_REGEX, "regex", "active", None),
        (ANTHROPIC_GLOB, "glob", "active", None),
    ]


def test_invalid_patterns_are_bad_input_and_write_nothing(cli: Cli, db: Database) -> None:
    agent_id = agent(cli)
    before = written(db)
    for pattern, kind, message in [
        ("([", "regex", "invalid regex '(['"),
        ("https://x/[a", "glob", "unterminated '['"),
        ("https://x/[z-a]", "glob", "reversed range"),
        ("   ", "glob", "pattern is empty"),
        ("https://x/*", "wildcard", "unknown pattern type 'wildcard'"),
    ]:
        result = cli(
            "allowlist", "create", "--agent-id", agent_id, "--pattern", pattern, "--pattern-type", kind
        )
        assert_error(result, 2, message)
    assert written(db) == before


def test_allowlist_for_a_suspended_or_unknown_agent_is_refused(cli: Cli, db: Database) -> None:
    agent_id = agent(cli)
    cli.ok("agent", "suspend", "--agent-id", agent_id)
    before = written(db)
    result = cli("allowlist", "create", "--agent-id", agent_id, "--pattern", ANTHROPIC_GLOB)
    assert_error(result, 1, "suspended")
    unknown = "550e8400-e29b-41d4-a716-446655440000"
    result = cli("allowlist", "create", "--agent-id", unknown, "--pattern", ANTHROPIC_GLOB)
    assert_error(result, 1, "not found")
    assert written(db) == before


# --------------------------------------------------------------------------- test


def test_allowed_resource_names_the_matching_entry(cli: Cli) -> None:
    agent_id = agent(cli)
    allow(cli, agent_id, ANTHROPIC_GLOB, "glob")
    openai = allow(cli, agent_id, OPENAI_REGEX, "regex")

    result = check(cli, agent_id, CHAT)
    assert result.exit_code == 0, result
    assert result.stdout.splitlines()[0] == "Allowlist Test:"
    assert block(result.stdout) == {
        "Resource": CHAT,
        "Result": "ALLOWED",
        "Matched Allowlist ID": openai,
        "Matched Pattern": f"{OPENAI_REGEX} (regex)",
    }

    data = json.loads(
        cli.ok("allowlist", "test", "--agent-id", agent_id, "--resource", CHAT, "-o", "json").stdout
    )
    assert data["allowed"] is True
    assert data["matched"]["allowlist_id"] == openai

    # the glob's * spans slashes
    messages = check(cli, agent_id, "https://api.anthropic.com/v1/messages")
    assert messages.exit_code == 0
    assert block(messages.stdout)["Matched Pattern"] == f"{ANTHROPIC_GLOB} (glob)"


def test_denied_resource_exits_1(cli: Cli) -> None:
    agent_id = agent(cli)
    # an empty allowlist allows nothing
    empty = check(cli, agent_id, CHAT)
    assert empty.exit_code == 1, empty
    assert block(empty.stdout) == {
        "Resource": CHAT,
        "Result": "DENIED",
        "Reason": "no match among 0 active entries",
    }

    allow(cli, agent_id, OPENAI_REGEX, "regex")
    result = check(cli, agent_id, "https://api.anthropic.com/v1/messages")
    assert result.exit_code == 1, result
    fields = block(result.stdout)
    assert fields["Result"] == "DENIED"
    assert "Matched Allowlist ID" not in fields
    assert fields["Reason"] == "no match among 1 active entries"

    data = json.loads(
        cli(
            "allowlist", "test", "--agent-id", agent_id, "--resource", "https://x.example/", "-o", "json"
        ).stdout
    )
    assert data == {"resource": "https://x.example/", "allowed": False, "matched": None}

    assert_error(check(cli, agent_id, "api.openai.com/v1"), 2, "not a full URL")


# (pattern, type, whether it allows the plain chat URL)
ANCHORING_CASES = [
    (OPENAI_REGEX, "regex", True),
    (r"https://api\.openai\.com/.*", "regex", True),
    # unanchored as written, anchored anyway: it must match from the URL's start, so it allows nothing
    (r"api\.openai\.com/.*", "regex", False),
    ("https://api.openai.com/*", "glob", True),
]
LOOKALIKES = [
    "https://evil.example/?u=https://api.openai.com/v1",
    "https://evil.example/api.openai.com/v1",
    "https://api.openai.com.evil.example/v1",
    "http://api.openai.com/v1/chat/completions",
]


def test_patterns_match_the_whole_url(cli: Cli) -> None:
    for n, (pattern, pattern_type, allows_chat) in enumerate(ANCHORING_CASES):
        agent_id = agent(cli, f"agent-{n}")
        allow(cli, agent_id, pattern, pattern_type)
        for resource in LOOKALIKES:
            result = check(cli, agent_id, resource)
            assert result.exit_code == 1, (pattern, resource, result)
            assert block(result.stdout)["Result"] == "DENIED"
        assert check(cli, agent_id, CHAT).exit_code == (0 if allows_chat else 1), pattern


def test_host_is_case_insensitive_path_is_not(cli: Cli) -> None:
    agent_id = agent(cli)
    allow(cli, agent_id, OPENAI_REGEX, "regex")
    glob = allow(cli, agent_id, "https://API.Example.com/v1/*", "glob")

    upper = check(cli, agent_id, "HTTPS://API.OpenAI.COM/v1/chat/completions")
    assert upper.exit_code == 0, upper
    assert block(upper.stdout)["Resource"] == CHAT

    mixed = check(cli, agent_id, "https://api.EXAMPLE.com/v1/search")
    assert mixed.exit_code == 0
    assert block(mixed.stdout)["Matched Allowlist ID"] == glob
    assert check(cli, agent_id, "https://api.example.com/V1/search").exit_code == 1


# --------------------------------------------------------------------------- delete


def test_delete_stops_matching_and_keeps_the_entry_as_deleted(cli: Cli, db: Database) -> None:
    agent_id = agent(cli)
    entry = allow(cli, agent_id, OPENAI_REGEX, "regex")
    kept = allow(cli, agent_id, ANTHROPIC_GLOB, "glob")
    assert check(cli, agent_id, CHAT).exit_code == 0

    result = cli.ok("allowlist", "delete", "--allowlist-id", entry, actor="carol@example.com")
    assert result.stdout.splitlines()[0] == "Allowlist entry deleted:"
    assert block(result.stdout)["Status"] == "deleted"

    denied = check(cli, agent_id, CHAT)
    assert denied.exit_code == 1
    assert block(denied.stdout)["Reason"] == "no match among 1 active entries"
    assert check(cli, agent_id, "https://api.anthropic.com/v1/messages").exit_code == 0

    active = json.loads(cli.ok("allowlist", "list", "--agent-id", agent_id, "-o", "json").stdout)
    assert [e["allowlist_id"] for e in active] == [kept]
    everything = json.loads(cli.ok("allowlist", "list", "--agent-id", agent_id, "--all", "-o", "json").stdout)
    by_id = {e["allowlist_id"]: e for e in everything}
    assert by_id[entry]["status"] == "deleted"
    assert by_id[entry]["deleted_at"] is not None
    assert by_id[kept]["status"] == "active"
    table = cli.ok("allowlist", "list", "--agent-id", agent_id, "--all").stdout
    assert any(entry in line and "deleted" in line for line in table.splitlines())

    (record,) = rows(db, "SELECT * FROM audit_log WHERE action = 'allowlist.delete'")
    assert (record["actor"], record["subject_id"], str(record["agent_id"])) == (
        "carol@example.com",
        entry,
        agent_id,
    )

    before = written(db)
    assert_error(cli("allowlist", "delete", "--allowlist-id", entry), 1, "not found or already deleted")
    unknown = "550e8400-e29b-41d4-a716-446655440000"
    assert_error(cli("allowlist", "delete", "--allowlist-id", unknown), 1, "not found")
    assert_error(cli("allowlist", "delete", "--allowlist-id", "xyz"), 2, "malformed allowlist id")
    assert written(db) == before
