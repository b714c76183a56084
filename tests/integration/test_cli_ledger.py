"""``caracal ledger query`` against real ledger rows."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from caracald.core.ledger import LedgerEvent, LedgerEventType
from caracald.core.money import Money
from caracald.store import ledger as ledger_store
from caracald.store.database import Database
from tests.clitools import block
from tests.integration.conftest import Cli


def _agent(cli: Cli) -> str:
    out = cli.ok(
        "agent", "create", "--name", f"a-{uuid.uuid4().hex[:8]}", "--owner", "o@example.com", "-o", "json"
    )
    return str(json.loads(out.stdout)["agent_id"])


def _event(
    agent: str,
    at: datetime,
    cost: str,
    kind: LedgerEventType = LedgerEventType.SETTLEMENT,
    currency: str = "USD",
) -> LedgerEvent:
    return LedgerEvent(
        uuid.uuid4(),
        kind,
        uuid.UUID(agent),
        at,
        Money(Decimal(cost), currency),
        resource="https://api.openai.com/v1/chat/completions",
        model="gpt-4o",
    )


def test_range_query_matches_the_runbook_summary(cli: Cli, db: Database) -> None:
    agent = _agent(cli)
    january = datetime(2024, 1, 1, tzinfo=UTC)
    events = [_event(agent, january + timedelta(minutes=30 * i), "0.037") for i in range(1234)]
    events[0] = _event(agent, january, str(Decimal("0.037") + Decimal("45.67") - Decimal("0.037") * 1234))
    outside = [
        _event(agent, datetime(2024, 2, 1, tzinfo=UTC), "99"),
        _event(agent, datetime(2023, 12, 31, 23, 59, 59, tzinfo=UTC), "99"),
    ]
    with db.transaction() as conn:
        assert ledger_store.insert_events(conn, [*events, *outside]) == 1236

    out = cli.ok(
        "ledger",
        "query",
        "--agent-id",
        agent,
        "--start-time",
        "2024-01-01T00:00:00Z",
        "--end-time",
        "2024-01-31T23:59:59Z",
    )
    fields = block(out.stdout)
    assert out.stdout.startswith("Spending Summary:")
    assert fields == {
        "Agent ID": agent,
        "Time Range": "2024-01-01 to 2024-01-31",
        "Total Spending": "$45.67 USD",
        "Event Count": "1,234",
        "Average Cost per Event": "$0.037",
    }


def test_only_charges_count_and_reservations_cost_nothing(cli: Cli, db: Database) -> None:
    agent = _agent(cli)
    at = datetime(2024, 3, 1, 12, tzinfo=UTC)
    with db.transaction() as conn:
        ledger_store.insert_events(
            conn,
            [
                _event(agent, at, "0", LedgerEventType.RESERVATION),
                _event(agent, at, "1.50", LedgerEventType.SETTLEMENT),
                _event(agent, at, "2.00", LedgerEventType.EXPIRY),
                _event(agent, at, "-0.25", LedgerEventType.ADJUSTMENT),
                _event(agent, at, "0", LedgerEventType.DENIAL),
            ],
        )
    out = cli.ok(
        "ledger",
        "query",
        "--agent-id",
        agent,
        "--start-time",
        "2024-03-01",
        "--end-time",
        "2024-03-02",
        "-o",
        "json",
    )
    (summary,) = json.loads(out.stdout)
    assert summary["total_spending"] == "3.25"
    assert summary["event_count"] == 2


def test_sub_cent_costs_are_exact(cli: Cli, db: Database) -> None:
    agent = _agent(cli)
    at = datetime(2024, 3, 1, 12, tzinfo=UTC)
    with db.transaction() as conn:
        ledger_store.insert_events(conn, [_event(agent, at, "0.0000075") for _ in range(3)])
    out = cli.ok("ledger", "query", "--agent-id", agent, "--start-time", "2024-03-01", "-o", "json")
    assert json.loads(out.stdout)[0]["total_spending"] == "0.0000225"


def test_replayed_events_are_not_counted_twice(cli: Cli, db: Database) -> None:
    agent = _agent(cli)
    event = _event(agent, datetime(2024, 3, 1, tzinfo=UTC), "5")
    with db.transaction() as conn:
        assert ledger_store.insert_events(conn, [event]) == 1
        assert ledger_store.insert_events(conn, [event, event]) == 0
    out = cli.ok("ledger", "query", "--agent-id", agent, "--start-time", "2024-03-01", "-o", "json")
    assert json.loads(out.stdout)[0]["total_spending"] == "5.00"


def test_current_window_uses_the_policy_time_zone(cli: Cli, db: Database) -> None:
    agent = _agent(cli)
    cli.ok(
        "policy",
        "create",
        "--agent-id",
        agent,
        "--limit",
        "10",
        "--time-window",
        "daily",
        "--timezone",
        "Pacific/Kiritimati",
        "--change-reason",
        "test",
    )
    now = datetime.now(UTC)
    with db.transaction() as conn:
        ledger_store.insert_events(conn, [_event(agent, now - timedelta(seconds=5), "1.25")])
        # 30 hours ago is always outside today's window, in any zone
        ledger_store.insert_events(conn, [_event(agent, now - timedelta(hours=30), "7")])
    out = cli.ok("ledger", "query", "--agent-id", agent, "--time-window", "daily", "-o", "json")
    (summary,) = json.loads(out.stdout)
    assert summary["total_spending"] == "1.25"
    start = datetime.fromisoformat(summary["start_time"])
    assert start.astimezone(UTC).hour == 10  # local midnight at UTC+14


def test_currencies_are_reported_separately(cli: Cli, db: Database) -> None:
    agent = _agent(cli)
    at = datetime(2024, 3, 1, tzinfo=UTC)
    with db.transaction() as conn:
        ledger_store.insert_events(
            conn, [_event(agent, at, "1", currency="USD"), _event(agent, at, "2", currency="EUR")]
        )
    out = cli.ok("ledger", "query", "--agent-id", agent, "--start-time", "2024-03-01")
    assert "$1.00 USD" in out.stdout
    assert "€2.00 EUR" in out.stdout


def test_bad_input_is_refused(cli: Cli) -> None:
    agent = _agent(cli)
    cases = [
        (["--start-time", "yesterday"], "invalid start time"),
        (["--start-time", "2024-02-01", "--end-time", "2024-01-01"], "end time"),
        (["--time-window", "fortnightly"], "unknown window"),
        (["--time-window", "daily", "--start-time", "2024-01-01"], "either"),
        ([], "--start-time"),
        (["--time-window", "daily", "--timezone", "Nowhere/City"], "time zone"),
    ]
    for args, message in cases:
        result = cli("ledger", "query", "--agent-id", agent, *args)
        assert result.exit_code == 2, (args, result)
        assert message in result.stderr, (args, result)
        assert "Traceback" not in result.stderr
    missing = cli("ledger", "query", "--agent-id", str(uuid.uuid4()), "--start-time", "2024-01-01")
    assert missing.exit_code == 1
    assert "not found" in missing.stderr
