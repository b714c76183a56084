"""The dashboard against real PostgreSQL (a fresh migrated database per test): what it reads, and each action's
plan, typed confirmation and run, checked afterwards with the ``caracal`` CLI and the audit log."""

from __future__ import annotations

import json
import re
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from caracal_ops.cli.context import CliState
from caracal_tui.live import LiveSource
from caracal_tui.screens.agents import AgentDetailScreen, AgentsScreen
from caracal_tui.screens.dlq import DlqScreen
from caracal_tui.screens.modals import ConfirmScreen, RunScreen
from caracal_tui.screens.operations import OperationsScreen
from caracal_tui.sources import ActionRequest, DlqSummary, Health, NotAvailable
from caracald.core.ledger import LedgerEvent, LedgerEventType
from caracald.core.money import Money
from caracald.store import dlq as dlq_store
from caracald.store import ledger as ledger_store
from caracald.store.database import Database
from caracald.store.dlq import DeadLetter
from tests.integration.conftest import Cli
from tests.tui.helpers import column, make_app, notices, screen_text, settle, table_rows, text_of

ACTOR = "tui-operator@example.com"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def key_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Signing keys and backups in the test's folder (the CLI and the dashboard read the same settings)."""
    keys = tmp_path / "keys"
    monkeypatch.setenv("CARACAL__INTEGRITY__KEY_DIR", str(keys))
    monkeypatch.setenv("CARACAL__BACKUP__DIR", str(tmp_path / "backups"))
    monkeypatch.setenv("CARACAL_DATA_DIR", str(tmp_path / "data"))
    # No gateway runs in these tests: point at a port nothing listens on, not at the default one, where
    # another process of the machine may serve
    monkeypatch.setenv("CARACAL__GATEWAY__PORT", str(closed_port()))
    monkeypatch.setenv("CARACAL__GATEWAY__METRICS_PORT", str(closed_port()))
    return keys


@pytest.fixture
def live(database_url: str, key_dir: Path) -> Iterator[LiveSource]:
    source = LiveSource(CliState(database_url=database_url, actor=ACTOR))
    yield source
    source.close()


def _agent(cli: Cli, name: str, parent: str | None = None) -> str:
    args = ["agent", "create", "--name", name, "--owner", f"{name}@example.com", "-o", "json"]
    if parent:
        args += ["--parent-id", parent]
    return str(json.loads(cli.ok(*args).stdout)["agent_id"])


def _policy(cli: Cli, agent: str, limit: str) -> str:
    out = cli.ok(
        "policy", "create", "--agent-id", agent, "--limit", limit, "--change-reason", "initial", "-o", "json"
    )
    return str(json.loads(out.stdout)["policy_id"])


def _charge(db: Database, agent: str, amount: str, *, at: datetime | None = None, **extra: object) -> None:
    event = LedgerEvent(
        uuid.uuid4(),
        LedgerEventType.SETTLEMENT,
        uuid.UUID(agent),
        at or datetime.now(UTC) - timedelta(seconds=5),
        Money(Decimal(amount), "USD"),
        resource="openai/v1/chat/completions",
        model="gpt-4o",
        input_tokens=1000,
        output_tokens=200,
        request_id=uuid.uuid4(),
        metadata=dict(extra),
    )
    with db.transaction() as conn:
        ledger_store.insert_events(conn, [event])


def _audit(cli: Cli) -> list[dict[str, object]]:
    return list(json.loads(cli.ok("audit", "query", "--start-time", "2000-01-01", "-o", "json").stdout))


async def test_reads_agents_budgets_and_the_ledger(cli: Cli, db: Database, live: LiveSource) -> None:
    parent = _agent(cli, "platform-team")
    child = _agent(cli, "support-bot", parent)
    _policy(cli, parent, "100")
    _policy(cli, child, "10")
    _charge(db, child, "9.25")
    _charge(db, parent, "1.50")
    app = make_app(live, initial_view="agents")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        rows = {row[0]: row for row in table_rows(app, "#agents")}
        assert rows["support-bot"][3] == "█████  92%"  # 9.25 of 10: the bar and the number
        assert rows["platform-team"][3].endswith(" 10%")  # its own spend and its child's
        assert "2 agents · 2 active · 0 suspended · 1 at ≥90%" in text_of(app, "#status")

        await pilot.press("slash", *"support", "enter", "enter")
        await settle(pilot)
        assert isinstance(app.screen, AgentDetailScreen)
        scopes = table_rows(app, "#scopes")
        assert [row[1] for row in scopes] == ["own", "platform-team"]
        assert table_rows(app, "#recent")[0][1] == "settlement"

        await pilot.press("L")
        await settle(pilot)
        ledger = table_rows(app, "#ledger")
        assert [row[2] for row in ledger] == ["support-bot"]
        assert ledger[0][-1] == "$9.25"
        assert "charged $9.25" in text_of(app, "#status")


async def test_overview_against_the_store(cli: Cli, db: Database, live: LiveSource) -> None:
    overview = live.overview()
    by_name = {c.name: c for c in overview.components}
    assert by_name["store"].health is Health.OK
    assert by_name["gateway"].health is Health.DOWN  # none runs in this test: said, not hidden
    assert "not answering" in by_name["gateway"].state
    assert isinstance(overview.traffic, NotAvailable)
    assert overview.dlq == DlqSummary(0, None)
    assert overview.deployment == "distributed"
    app = make_app(live)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        assert re.search(r"● OK +store +ok \d+ ms +PostgreSQL", text_of(app, "#components"))
        assert "gateway metrics" in text_of(app, "#traffic")


async def test_suspend_and_activate_confirm_and_run(cli: Cli, live: LiveSource) -> None:
    agent = _agent(cli, "research-agent")
    app = make_app(live, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("s", *"runaway loop", "enter")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmScreen)
        text = screen_text(app)
        assert "Plan: Suspend agent research-agent" in text
        assert f"Record agent.suspend in the audit log as {ACTOR}" in text
        await pilot.press(*"suspend", "enter")
        await settle(pilot)
        assert isinstance(app.screen, RunScreen) and app.screen.ok
        await pilot.press("enter")
        await settle(pilot)
        assert column(app, "#agents", 1) == ["■ suspended"]
        shown = json.loads(cli.ok("agent", "get", "--agent-id", agent, "-o", "json").stdout)
        assert shown["status"] == "suspended"
        last = _audit(cli)[-1]
        assert (last["action"], last["actor"], last["reason"]) == ("agent.suspend", ACTOR, "runaway loop")

        await pilot.press("a", "enter")
        await settle(pilot)
        await pilot.press(*"activate", "enter")
        await settle(pilot)
        assert isinstance(app.screen, RunScreen) and app.screen.ok
        await pilot.press("enter")
        await settle(pilot)
        assert column(app, "#agents", 1) == ["● active"]


async def test_change_limit_writes_a_new_version(cli: Cli, live: LiveSource) -> None:
    agent = _agent(cli, "billing-assistant")
    policy = _policy(cli, agent, "50")
    app = make_app(live, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)
        await pilot.press("l", "ctrl+u", *"75.50", "enter", *"month end", "enter")
        await settle(pilot)
        assert "limit $50.00 USD -> $75.50 USD" in screen_text(app)
        await pilot.press(*"change", "enter")
        await settle(pilot)
        assert app.screen.ok  # type: ignore[attr-defined]
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, AgentDetailScreen)
        history = json.loads(cli.ok("policy", "history", "--agent-id", agent, "-o", "json").stdout)
        assert [(v["version"], v["limit"]) for v in history] == [(1, "50.00"), (2, "75.50")]
        assert history[-1]["changed_by"] == ACTOR
        assert policy == history[-1]["policy_id"]


async def test_a_change_the_store_refuses_fails_cleanly(cli: Cli, live: LiveSource) -> None:
    parent = _agent(cli, "parent")
    child = _agent(cli, "child", parent)
    _policy(cli, parent, "20")
    _policy(cli, child, "10")
    app = make_app(live, initial_view="agents")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("slash", *"child", "enter", "enter")
        await settle(pilot)
        # a child may not get more than its parent delegates: the plan shows, the run is refused
        await pilot.press("l", "ctrl+u", *"500", "enter", *"try", "enter")
        await settle(pilot)
        await pilot.press(*"change", "enter")
        await settle(pilot)
        run = app.screen
        assert isinstance(run, RunScreen) and run.ok is False
        assert "✖ FAILED" in screen_text(app)
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, AgentDetailScreen)
        history = json.loads(cli.ok("policy", "history", "--agent-id", child, "-o", "json").stdout)
        assert len(history) == 1

        # and a plan that cannot be made says why, without a dialog
        await pilot.press("a", "enter")
        await settle(pilot)
        assert isinstance(app.screen, AgentDetailScreen)
        assert "cannot activate agent: agent child is already active" in notices(app)


async def test_dead_letters_retry_and_purge(cli: Cli, db: Database, live: LiveSource) -> None:
    now = datetime.now(UTC)
    letters = [
        DeadLetter(
            "caracal.metering.events",
            0,
            10 + i,
            "ledger-writer-group",
            b"k",
            b'{"kind": "settlement"}',
            (),
            "DecodeError",
            f"broken payload {i}",
            3,
            now - timedelta(minutes=10 - i),
        )
        for i in range(3)
    ]
    with db.transaction() as conn:
        dlq_store.insert(conn, letters)
    app = make_app(live, initial_view="dlq")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, DlqScreen)
        ids = column(app, "#letters", 0)
        assert len(ids) == 3
        assert "broken payload 0" in text_of(app, "#detail")

        await pilot.press("t")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmScreen)
        assert "Redrive 1 dead letter(s)" in screen_text(app)
        await pilot.press(*app.screen.plan.confirm_word, "enter")
        await settle(pilot)
        assert app.screen.ok, screen_text(app)  # type: ignore[attr-defined]
        await pilot.press("enter")
        await settle(pilot)
        assert column(app, "#letters", 0) == ids[1:]

        await pilot.press("x")
        await settle(pilot)
        assert "[destructive]" in screen_text(app)
        await pilot.press(*"purge", "enter")
        await settle(pilot)
        assert app.screen.ok  # type: ignore[attr-defined]
        await pilot.press("enter")
        await settle(pilot)
        assert column(app, "#letters", 0) == ids[2:]
    with db.read() as conn:
        statuses = {
            d.dlq_id: (d.status.value, d.resolved_by) for d in dlq_store.list_letters(conn, status=None)
        }
    assert statuses[int(ids[0])] == ("redriven", ACTOR)
    assert statuses[int(ids[1])] == ("purged", ACTOR)
    actions = [a["action"] for a in _audit(cli)]
    assert "dlq.retry.finished" in actions and "dlq.purge.finished" in actions


async def test_verify_a_sealed_batch_then_find_the_tampered_event(
    cli: Cli, db: Database, live: LiveSource
) -> None:
    agent = _agent(cli, "sealed-agent")
    for i in range(5):
        _charge(db, agent, f"0.0{i + 1}", n=i)
    cli.ok("merkle", "generate-key")
    cli.ok("merkle", "seal")
    app = make_app(live, initial_view="integrity")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        assert len(table_rows(app, "#batches")) == 1
        await pilot.press("v")
        await settle(pilot)
        result = text_of(app, "#result")
        assert "✔ PASSED" in result
        assert "1 batches, 5 events" in result
        assert table_rows(app, "#batches")[0][5] == "✔ passed"  # the outcome is recorded

        with db.transaction() as conn:
            conn.execute("ALTER TABLE ledger_events DISABLE TRIGGER ledger_events_sealed_update")
            row = conn.execute(
                "SELECT event_id FROM ledger_events ORDER BY event_id LIMIT 1 OFFSET 2"
            ).fetchone()
            assert row is not None
            conn.execute("UPDATE ledger_events SET cost = 100 WHERE event_id = %s", (row["event_id"],))
            conn.execute("ALTER TABLE ledger_events ENABLE TRIGGER ledger_events_sealed_update")
        await pilot.press("g", *"-1d", "enter", "enter")
        await settle(pilot)
        result = text_of(app, "#result")
        assert "✖ FAILED" in result
        assert re.search(rf"First bad event +{row['event_id']} \(seq 3\)", result)
        assert "cost changed" in result
        await pilot.press("1")
        await settle(pilot)
        assert "LEDGER VERIFICATION FAILED" in screen_text(app)


async def test_rotate_the_signing_key(cli: Cli, live: LiveSource) -> None:
    cli.ok("merkle", "generate-key")
    before = json.loads(cli.ok("merkle", "list-keys", "-o", "json").stdout)
    app = make_app(live, initial_view="operations")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        operations = app.screen
        assert isinstance(operations, OperationsScreen)
        operations.table.move_cursor(row=3)
        assert operations.table.selected_key == "integrity.rotate-key"
        await pilot.press("enter", *"scheduled", "enter")
        await settle(pilot)
        assert "[destructive]" in screen_text(app)
        await pilot.press(*"rotate", "enter")
        await settle(pilot)
        assert app.screen.ok, screen_text(app)  # type: ignore[attr-defined]
    after = json.loads(cli.ok("merkle", "list-keys", "-o", "json").stdout)
    assert len(after) == len(before) + 1
    assert [k for k in after if k.get("retired_at") is None] != [
        k for k in before if k.get("retired_at") is None
    ]


async def test_backup_snapshot_and_emergency_stop_and_resume(
    cli: Cli, live: LiveSource, key_dir: Path
) -> None:
    _agent(cli, "ops-agent")
    app = make_app(live, initial_view="operations")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        operations = app.screen
        assert isinstance(operations, OperationsScreen)
        available = {row[0]: row[1] for row in table_rows(app, "#operations")}
        assert set(available.values()) == {"● available"}

        async def run(row: int, *typed: str) -> RunScreen:
            operations.table.move_cursor(row=row)
            await pilot.press("enter", *typed)
            await settle(pilot)
            confirm = app.screen
            assert isinstance(confirm, ConfirmScreen), notices(app)
            await pilot.press(*confirm.plan.confirm_word, "enter")
            await settle(pilot)
            run = app.screen
            assert isinstance(run, RunScreen)
            assert run.ok, screen_text(app)
            await pilot.press("enter")
            await settle(pilot)
            return run

        await run(0)  # back up now
        assert any((key_dir.parent / "backups").iterdir())
        await run(1)  # take a snapshot
        assert json.loads(cli.ok("snapshot", "list", "-o", "json").stdout)
        await run(4, *"incident 7", "enter")  # emergency stop-writes
        assert "DENY-ALL ON" in screen_text(app)
        await run(5)  # resume writes
        assert "DENY-ALL" not in screen_text(app)
    actions = [a["action"] for a in _audit(cli)]
    for done in ("backup.create.finished", "snapshot.create.finished", "emergency.stop-writes.finished"):
        assert done in actions, actions


async def test_replay_runs_with_its_progress(cli: Cli, live: LiveSource) -> None:
    live.follow_seconds = 2
    live.stall_seconds = 1
    app = make_app(live, initial_view="operations")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        operations = app.screen
        assert isinstance(operations, OperationsScreen)
        operations.table.move_cursor(row=2)
        await pilot.press("enter", *"-1h", "enter", "enter")
        await settle(pilot)
        confirm = app.screen
        assert isinstance(confirm, ConfirmScreen), notices(app)
        assert "Follow ledger-writer-group as it reads the events again" in screen_text(app)
        await pilot.press(*"replay", "enter")
        await settle(pilot)
        run = app.screen
        assert isinstance(run, RunScreen)
        text = screen_text(app)
        assert run.ok, text
        assert "✔ 2/2 Follow ledger-writer-group" in text


async def test_readonly_live_source_refuses_changes(cli: Cli, database_url: str, key_dir: Path) -> None:
    agent = _agent(cli, "watched")
    source = LiveSource(CliState(database_url=database_url, actor=ACTOR), readonly=True)
    try:
        assert not source.capability("agent.suspend").available
        with pytest.raises(Exception, match="read-only"):
            source.plan(ActionRequest("agent.suspend", agent, "watched"))
        app = make_app(source, readonly=True, initial_view="agents")
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot)
            await pilot.press("s")
            await settle(pilot)
            assert isinstance(app.screen, AgentsScreen)
            assert "Suspend" not in screen_text(app)
    finally:
        source.close()
    shown = json.loads(cli.ok("agent", "get", "--agent-id", agent, "-o", "json").stdout)
    assert shown["status"] == "active"


def test_bulk_budget_figures_match_the_per_policy_ones(cli: Cli, db: Database, live: LiveSource) -> None:
    """The dashboard reads every policy's figures in one statement; they must be the CLI's, policy by policy."""
    from caracal_ops import inventory
    from caracald.admin import budget as budget_admin

    parent = _agent(cli, "parent-team")
    child = _agent(cli, "child-bot", parent)
    grandchild = _agent(cli, "grandchild-bot", child)
    _policy(cli, parent, "100")
    _policy(cli, child, "50")
    _policy(cli, grandchild, "20")
    _charge(db, grandchild, "3.25")
    _charge(db, child, "1.10")
    _charge(db, parent, "0.40")
    _charge(db, child, "9.99", at=datetime.now(UTC) - timedelta(days=3))  # an earlier window: not counted
    request = uuid.uuid4()
    held = LedgerEvent(
        uuid.uuid4(),
        LedgerEventType.RESERVATION,
        uuid.UUID(grandchild),
        datetime.now(UTC) - timedelta(seconds=2),
        Money(Decimal(0), "USD"),
        request_id=request,
        metadata={"hold": "0.75"},
    )
    with db.transaction() as conn:
        ledger_store.insert_events(conn, [held])
    at = datetime.now(UTC)
    bulk = {b.policy_id: b for b in inventory.budgets(live.state, at)}
    scopes = budget_admin.all_scopes(db)
    one_by_one = budget_admin.ledger_status(db, scopes, at, hold_ttl=timedelta(minutes=15))
    assert len(bulk) == len(one_by_one) == 3
    for status in one_by_one:
        got = bulk[status.scope.policy_id]
        assert (got.settled, got.held, got.holds) == (status.settled, status.held, status.holds)
    assert {str(b.settled.amount.normalize()) for b in bulk.values()} == {"4.75", "4.35", "3.25"}


def test_an_unchanged_agent_comes_back_as_the_same_row_and_a_changed_one_is_made_again(
    cli: Cli, db: Database, database_url: str, live: LiveSource
) -> None:
    """A refresh reuses what did not change (the dashboard then skips those rows): agents and budgets are
    the same objects as before unless something about them changed, and the figures are always those a
    source with nothing to reuse reads."""
    parent = _agent(cli, "reuse-parent")
    child = _agent(cli, "reuse-child", parent)
    other = _agent(cli, "reuse-other")
    _policy(cli, parent, "100")
    _policy(cli, child, "50")
    _policy(cli, other, "30")
    _charge(db, child, "1.25")

    def fresh() -> dict[uuid.UUID, object]:
        source = LiveSource(CliState(database_url=database_url, actor=ACTOR))
        try:
            return {row.agent_id: row for row in source.agents().agents}
        finally:
            source.close()

    first = {row.agent_id: row for row in live.agents().agents}
    second = {row.agent_id: row for row in live.agents().agents}
    assert all(second[a] is first[a] for a in first)
    assert second == fresh()

    _charge(db, child, "2.00")  # the child's budget and its parent's change
    third = {row.agent_id: row for row in live.agents().agents}
    assert third[uuid.UUID(other)] is second[uuid.UUID(other)]
    assert third[uuid.UUID(child)] is not second[uuid.UUID(child)]
    assert third[uuid.UUID(parent)] is not second[uuid.UUID(parent)]
    assert third == fresh()
    settled = {a: [str(b.settled.amount.normalize()) for b in row.budgets] for a, row in third.items()}
    assert settled[uuid.UUID(child)] == ["3.25"]
    assert settled[uuid.UUID(parent)] == ["3.25"]

    cli.ok("agent", "suspend", "--agent-id", other, "--reason", "test")  # the catalog changes: all made anew
    fourth = {row.agent_id: row for row in live.agents().agents}
    assert all(fourth[a] is not third[a] for a in third)
    assert fourth[uuid.UUID(other)].status == "suspended"
    assert fourth == fresh()
