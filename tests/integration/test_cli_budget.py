"""``caracal budget``: status from the ledger (embedded) or from Redis, and rebuilding Redis from the ledger."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from caracald.admin import budget as budget_admin
from caracald.budget.base import AdmissionRequest
from caracald.budget.redis_backend import RedisBudget
from caracald.core.ledger import LedgerEvent, LedgerEventType
from caracald.core.money import Money
from caracald.store import ledger as ledger_store
from caracald.store.database import Database
from tests.harness.redis_server import RedisService
from tests.integration.conftest import Cli


def _agent(cli: Cli, name: str, parent: str | None = None) -> str:
    args = ["agent", "create", "--name", name, "--owner", "o@example.com", "-o", "json"]
    if parent:
        args += ["--parent-id", parent]
    return str(json.loads(cli.ok(*args).stdout)["agent_id"])


def _policy(cli: Cli, agent: str, limit: str, window: str = "daily", kind: str = "calendar") -> str:
    out = cli.ok(
        "policy",
        "create",
        "--agent-id",
        agent,
        "--limit",
        limit,
        "--time-window",
        window,
        "--window-type",
        kind,
        "--change-reason",
        "test",
        "-o",
        "json",
    )
    return str(json.loads(out.stdout)["policy_id"])


def _charge(
    db: Database,
    agent: str,
    amount: str,
    at: datetime,
    kind: LedgerEventType = LedgerEventType.SETTLEMENT,
    request: uuid.UUID | None = None,
    hold: str | None = None,
) -> None:
    event = LedgerEvent(
        uuid.uuid4(),
        kind,
        uuid.UUID(agent),
        at,
        Money(Decimal(amount), "USD"),
        request_id=request or uuid.uuid4(),
        metadata={"hold": hold} if hold else {},
    )
    with db.transaction() as conn:
        ledger_store.insert_events(conn, [event])


def test_status_counts_the_whole_delegation_subtree(cli: Cli, db: Database) -> None:
    parent = _agent(cli, "parent")
    child = _agent(cli, "child", parent)
    parent_policy = _policy(cli, parent, "100")
    child_policy = _policy(cli, child, "10")
    now = datetime.now(UTC)
    _charge(db, child, "2.50", now - timedelta(seconds=1))
    _charge(db, parent, "1.00", now - timedelta(seconds=1))
    _charge(db, child, "0", now, LedgerEventType.RESERVATION, hold="0.75")
    data = json.loads(cli.ok("budget", "status", "--agent-id", child, "-o", "json").stdout)
    assert data["source"] == "ledger"
    by_policy = {p["policy_id"]: p for p in data["policies"]}
    assert set(by_policy) == {parent_policy, child_policy}
    assert by_policy[child_policy]["settled"] == "2.50"
    assert by_policy[child_policy]["held"] == "0.75"
    assert by_policy[child_policy]["remaining"] == "6.75"
    assert by_policy[parent_policy]["settled"] == "3.50"  # the parent's budget carries its child's spend
    table = cli.ok("budget", "status", "--agent-id", child)
    assert "parent" in table.stdout and "$6.75 USD" in table.stdout


def test_status_without_policies_says_calls_will_be_refused(cli: Cli) -> None:
    agent = _agent(cli, "unbudgeted")
    assert "will refuse" in cli.ok("budget", "status", "--agent-id", agent).stdout


def test_rebuild_restores_redis_counters_from_the_ledger(
    cli: Cli, db: Database, database_url: str, redis_service: RedisService
) -> None:
    agent = _agent(cli, "rebuilt")
    _policy(cli, agent, "50", "daily")
    _policy(cli, agent, "80", "weekly", "rolling")
    now = datetime.now(UTC)
    for amount in ("1.25", "2.00"):
        _charge(db, agent, amount, now - timedelta(minutes=1))
    _charge(db, agent, "40", now - timedelta(days=9))  # outside both windows
    env = {"CARACAL__BUDGET__BACKEND": "redis", "CARACAL_REDIS_URL": redis_service.url}
    redis_cli = Cli(database_url, env=env)
    assert "Rebuilt" in redis_cli.ok("budget", "rebuild").stdout
    statuses = json.loads(redis_cli.ok("budget", "status", "--agent-id", agent, "-o", "json").stdout)
    assert statuses["source"] == "redis"
    assert sorted(p["settled"] for p in statuses["policies"]) == ["3.25", "3.25"]

    scopes = budget_admin.scopes_for(db, uuid.UUID(agent))

    async def check_admission() -> None:
        budget = RedisBudget.from_url(redis_service.url)
        try:
            request = AdmissionRequest(
                uuid.uuid4(),
                uuid.UUID(agent),
                tuple(scopes),
                Money(Decimal("46.76"), "USD"),
                datetime.now(UTC),
                timedelta(minutes=5),
            )
            assert not (await budget.admit(request)).admitted  # 3.25 + 46.76 > 50
        finally:
            await budget.close()

    asyncio.run(check_admission())


def test_status_errors(cli: Cli) -> None:
    assert cli("budget", "status", "--agent-id", "nope").exit_code == 2
    missing = cli("budget", "status", "--agent-id", str(uuid.uuid4()))
    assert missing.exit_code == 1 and "not found" in missing.stderr


def test_the_catalog_is_read_again_exactly_when_agents_or_policies_change(cli: Cli, db: Database) -> None:
    """The dashboard keeps the agents and policy scopes between refreshes; any change, by any path, must
    show on the next one, and no change must cost no re-read."""
    first = budget_admin.catalog(db)
    assert budget_admin.catalog(db, first) is first  # nothing changed: the same objects

    agent = _agent(cli, "catalog-bot")
    second = budget_admin.catalog(db, first)
    assert second is not first and uuid.UUID(agent) in {a.agent_id for a in second.agents}
    assert budget_admin.catalog(db, second) is second

    policy = _policy(cli, agent, "10")
    third = budget_admin.catalog(db, second)
    assert [s.limit.amount for s in third.scopes if str(s.policy_id) == policy] == [Decimal("10")]

    cli.ok("policy", "update", "--policy-id", policy, "--limit", "25", "--change-reason", "more")
    fourth = budget_admin.catalog(db, third)
    assert [s.limit.amount for s in fourth.scopes if str(s.policy_id) == policy] == [Decimal("25")]

    cli.ok("agent", "suspend", "--agent-id", agent, "--reason", "test")
    fifth = budget_admin.catalog(db, fourth)
    assert [a.status for a in fifth.agents if str(a.agent_id) == agent] != [
        a.status for a in fourth.agents if str(a.agent_id) == agent
    ]

    with db.transaction() as conn:  # behind the toolkit's back, as a restore or a hand fix would
        conn.execute("UPDATE agents SET description = 'edited by hand' WHERE agent_id = %s", (agent,))
    sixth = budget_admin.catalog(db, fifth)
    assert [a.description for a in sixth.agents if str(a.agent_id) == agent] == ["edited by hand"]
