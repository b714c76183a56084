"""``caracal snapshot create / list / restore`` against real PostgreSQL."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from caracal_ops.procedures import snapshot as snapshots
from caracald.core.ledger import LedgerEventType
from caracald.store import ledger as ledger_store
from caracald.store.database import Database
from tests.clitools import block
from tests.integration.conftest import Cli
from tests.integration.test_cli_ledger import _agent, _event


@pytest.fixture
def snap_cli(database_url: str, tmp_path: Path) -> Cli:
    return Cli(database_url, env={"CARACAL__BACKUP__DIR": str(tmp_path / "backups")})


def _seed(cli: Cli, db: Database) -> str:
    agent = _agent(cli)
    day = datetime(2024, 1, 15, tzinfo=UTC)
    events = [_event(agent, day + timedelta(hours=i * 5), "1.25") for i in range(10)]
    events.append(_event(agent, day, "0", kind=LedgerEventType.RESERVATION))
    events.append(_event(agent, day, "2.00", currency="EUR"))
    with db.transaction() as conn:
        ledger_store.insert_events(conn, events)
    return agent


def test_create_list_and_restore(snap_cli: Cli, db: Database, tmp_path: Path) -> None:
    agent = _seed(snap_cli, db)
    out = snap_cli.ok("snapshot", "create")
    assert "Snapshot created successfully:" in out.stdout
    fields = block(out.stdout)
    assert set(fields) >= {"Snapshot ID", "Timestamp", "Total Events", "Merkle Root", "Size"}
    assert fields["Total Events"] == "12"
    snapshot_id = fields["Snapshot ID"]
    assert (tmp_path / "backups" / "snapshots" / f"{snapshot_id}.json").exists()

    listed = json.loads(snap_cli.ok("snapshot", "list", "--format", "json").stdout)
    assert [s["snapshot_id"] for s in listed] == [snapshot_id]
    assert listed[0]["total_events"] == 12 and listed[0]["merkle_root"] is None
    with db.read() as conn:
        row = conn.execute("SELECT document FROM ledger_snapshots").fetchone()
    assert row is not None
    totals = json.loads(row["document"])["totals"]
    usd = [t for t in totals if t["currency"] == "USD"]
    assert {t["day"] for t in usd} == {"2024-01-15", "2024-01-16"}
    assert sum(float(t["charged"]) for t in usd) == 12.5
    assert all(t["agent_id"] == agent for t in totals)

    # a dry run by default: the plan, nothing done
    dry = snap_cli.ok("snapshot", "restore", "--snapshot-id", snapshot_id)
    assert "Plan:" in dry.stdout and "Dry run" in dry.stdout

    # events after the snapshot do not matter; the ledger up to it matches
    with db.transaction() as conn:
        ledger_store.insert_events(conn, [_event(agent, datetime(2024, 2, 1, tzinfo=UTC), "9")])
    done = snap_cli.ok("snapshot", "restore", "--snapshot-id", snapshot_id, "--yes")
    assert "matches the snapshot" in done.stdout and "spend_totals rebuilt" in done.stdout
    with db.read() as conn:
        actions = [
            r["action"]
            for r in conn.execute(
                "SELECT action FROM audit_log WHERE event_type = 'ops_procedure' ORDER BY audit_id"
            ).fetchall()
        ]
    assert "snapshot.create.finished" in actions and "snapshot.restore.finished" in actions


def test_restore_reports_differences_and_damage(snap_cli: Cli, db: Database) -> None:
    _seed(snap_cli, db)
    snapshot_id = block(snap_cli.ok("snapshot", "create").stdout)["Snapshot ID"]
    # the ledger changed behind the snapshot's back (ledger_events is append-only: disable its guards)
    with db.transaction() as conn:
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(
            "UPDATE ledger_events SET cost = cost + 1 WHERE event_id = (SELECT min(event_id) FROM ledger_events WHERE event_type = 'settlement')"
        )
    failed = snap_cli("snapshot", "restore", "--snapshot-id", snapshot_id, "--yes")
    assert failed.exit_code == 1
    assert "differs from the snapshot in 1 place" in failed.stderr and "nothing was changed" in failed.stderr

    with db.transaction() as conn:
        conn.execute(
            "UPDATE ledger_snapshots SET document = replace(document, '\"format\":', '\"format\": ')"
        )
    damaged = snap_cli("snapshot", "restore", "--snapshot-id", snapshot_id, "--yes")
    assert damaged.exit_code == 1 and "is damaged" in damaged.stderr


def test_restore_after_reset_reads_the_file_and_puts_back_the_reference_data(
    snap_cli: Cli, db: Database
) -> None:
    agent = _seed(snap_cli, db)
    snap_cli.ok(
        "policy", "create", "--agent-id", agent, "--limit", "100.25", "--currency", "USD",
        "--time-window", "daily", "--change-reason", "budget",
    )  # fmt: skip
    snap_cli.ok("pricebook", "set", "--model", "gpt-4o", "--input", "2.5125", "--output", "10.00")
    with db.read() as conn:
        before = snapshots.reference_data(conn)
    assert all(
        before[t] for t in ("agents", "agent_credentials", "policies", "policy_versions", "price_entries")
    )
    snapshot_id = block(snap_cli.ok("snapshot", "create").stdout)["Snapshot ID"]
    snap_cli.ok("db", "reset", "--confirm")
    with db.read() as conn:
        assert not any(snapshots.reference_counts(conn).values())
    dry = snap_cli.ok("snapshot", "restore", "--snapshot-id", snapshot_id)
    assert "Put back the snapshot's agents" in dry.stdout and "a reset database" in dry.stdout
    out = snap_cli.ok("snapshot", "restore", "--snapshot-id", snapshot_id, "--yes")
    assert "ledger empty up to the snapshot" in out.stdout
    assert "put back 1 agents, 1 agent_credentials, 1 policies, 1 policy_versions" in out.stdout
    assert snap_cli.ok("snapshot", "list", "-o", "json").stdout.count(snapshot_id) == 1
    with db.read() as conn:
        assert snapshots.reference_data(conn) == before  # every row, amounts exact
    listed = json.loads(snap_cli.ok("policy", "list", "--agent-id", agent, "-o", "json").stdout)
    assert [Decimal(p["limit"]) for p in listed] == [Decimal("100.25")]
    # a second restore leaves the reference data alone
    assert (
        "already holds reference data"
        in snap_cli.ok("snapshot", "restore", "--snapshot-id", snapshot_id).stdout
    )
    again = snap_cli.ok("snapshot", "restore", "--snapshot-id", snapshot_id, "--yes")
    assert "put back" not in again.stdout


def test_unknown_snapshot(snap_cli: Cli) -> None:
    missing = snap_cli("snapshot", "restore", "--snapshot-id", str(uuid.uuid4()))
    assert missing.exit_code == 1 and "not found" in missing.stderr
    assert snap_cli("snapshot", "restore", "--snapshot-id", "nope").exit_code == 2
