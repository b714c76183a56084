"""``caracal emergency stop-writes / resume-writes`` on the local platform, against real PostgreSQL and a
real gateway: after stop-writes every replica answers 403 deny_all within a second, and resume-writes undoes
it. Small Python daemons stand in for the locally supervised gateway and ledger writer (``platform.commands``)
so that stopping and starting them is real; the gateway that must deny is a real one (the e2e harness),
a replica on "another host" that the platform does not manage.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from caracald.store.database import Database
from caracald.store.gateway import DENY_ALL, get_switch
from tests.clitools import block
from tests.e2e.gateway_harness import GatewayHarness, make_agent
from tests.integration.conftest import Cli
from tests.integration.pipeline import add_agents, make_events, rows, send_events, wait_for
from tests.integration.test_gateway_denials import CHAT, prices
from tests.integration.test_services_local import DAEMON

pytestmark = pytest.mark.integration


def _post(url: str, key: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    request = urllib.request.Request(  # noqa: S310
        f"{url}/openai/v1/chat/completions",
        data=json.dumps(CHAT).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
            return answer.status, json.loads(answer.read()), dict(answer.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}"), dict(exc.headers)


@pytest.fixture
def gateway(database_url: str, cli: Cli) -> Iterator[GatewayHarness]:
    prices(cli)
    with GatewayHarness(database_url, switch_poll_seconds=0.5) as gw:
        yield gw


@pytest.fixture
def ops(tmp_path: Path, database_url: str, gateway: GatewayHarness) -> Iterator[Cli]:
    script = tmp_path / "daemon.py"
    script.write_text(DAEMON)
    config = tmp_path / "caracal.yaml"
    config.write_text(
        "\n".join(
            [
                "platform:",
                "  kind: local",
                "  stop_timeout_seconds: 2",
                f"  gateway_urls: [{json.dumps(gateway.url)}]",
                "  commands:",
                *[
                    f"    {name}: [{json.dumps(sys.executable)}, {json.dumps(str(script))}, {name}, normal]"
                    for name in ("gateway", "ledger-writer")
                ],
                "embedded:",
                f"  data_dir: {json.dumps(str(tmp_path / 'data'))}",
            ]
        )
        + "\n"
    )
    cli = Cli(database_url, env={"CARACAL_CONFIG": str(config)})
    yield cli
    cli("services", "down")


def _states(cli: Cli) -> dict[str, str]:
    data = json.loads(cli.ok("services", "status", "-o", "json").stdout)
    return {c["component"]: c["state"] for c in data["components"]}


def _actions(db: Database) -> list[str]:
    with db.read() as conn:
        rows = conn.execute(
            "SELECT action FROM audit_log WHERE event_type = 'ops_procedure' ORDER BY audit_id"
        ).fetchall()
    return [r["action"] for r in rows]


def test_stop_writes_denies_within_a_second_and_resume_undoes_it(
    ops: Cli, cli: Cli, gateway: GatewayHarness, db: Database
) -> None:
    agent = make_agent(cli, "agent-one")
    gateway.refresh()
    ops.ok("services", "up", "--component", "gateway", "--component", "ledger-writer")
    assert _post(gateway.url, agent.api_key)[0] == 200

    # the dry run prints the plan and changes nothing
    dry = ops.ok("emergency", "stop-writes", "--dry-run")
    assert "Plan: Stop every write" in dry.stdout and "Dry run: nothing was changed." in dry.stdout
    lines = [line.strip() for line in dry.stdout.splitlines()]
    first = next(i for i, line in enumerate(lines) if "deny-all switch on in PostgreSQL" in line)
    stop_gateway = next(
        i
        for i, line in enumerate(lines)
        if line.endswith("Stop gateway (scale to 0) on the local platform  [destructive]")
    )
    assert first < stop_gateway
    with db.read() as conn:
        assert get_switch(conn, DENY_ALL) is None
    assert _states(ops)["gateway"] == "running" and _states(ops)["ledger-writer"] == "running"
    assert _post(gateway.url, agent.api_key)[0] == 200
    assert not [a for a in _actions(db) if a.startswith("emergency.")]

    # without --yes or --execute it is a dry run too
    assert "Dry run" in ops.ok("emergency", "stop-writes").stdout

    stopped = ops.ok("emergency", "stop-writes", "--yes", "--reason", "drill")
    assert "all 1 replicas report deny_all=on" in stopped.stdout
    assert "Undo with: caracal emergency resume-writes" in stopped.stdout
    # the replica confirmed the switch within a second of it being set
    confirm = re.search(
        r"Wait until the gateway replicas deny.*?\n\s+done: .*?\((\d+\.\d) s\)", stopped.stderr, re.S
    )
    assert confirm is not None, stopped.stderr
    assert float(confirm.group(1)) <= 1.0
    status, body, headers = _post(gateway.url, agent.api_key)
    assert status == 403 and body["error"]["code"] == "deny_all"
    assert headers["x-caracal-deny-reason"] == "deny_all"
    with db.read() as conn:
        switch = get_switch(conn, DENY_ALL)
    assert switch is not None and switch.enabled and switch.reason == "drill"
    assert switch.set_by == "tester@example.com"
    assert _states(ops)["gateway"] == "stopped" and _states(ops)["ledger-writer"] == "stopped"

    resumed = ops.ok("emergency", "resume-writes", "--yes")
    assert "Writes resumed" in resumed.stdout
    assert _states(ops)["gateway"] == "running" and _states(ops)["ledger-writer"] == "running"
    assert _post(gateway.url, agent.api_key)[0] == 200
    with db.read() as conn:
        switch = get_switch(conn, DENY_ALL)
    assert switch is not None and not switch.enabled

    actions = _actions(db)
    for procedure in ("emergency.stop-writes", "emergency.resume-writes"):
        assert f"{procedure}.started" in actions and f"{procedure}.finished" in actions


def test_preserve_evidence_dry_run_and_run(ops: Cli, tmp_path: Path, db: Database) -> None:
    dry = ops.ok("emergency", "preserve-evidence", "--tag", "corruption-evidence", "--dry-run")
    assert "Back up PostgreSQL" in dry.stdout and not (tmp_path / "data" / "backups").exists()
    ops.ok("services", "up", "--component", "ledger-writer")
    done = ops.ok("emergency", "preserve-evidence", "--tag", "corruption-evidence")
    folder = Path(done.stdout.strip().splitlines()[-1].removeprefix("Evidence preserved in "))
    manifest = json.loads((folder / "manifest.json").read_text())
    names = {f["name"] for f in manifest["files"]}
    assert {"ledger-writer.log", "status.json"} <= names
    assert manifest["backups"][0]["type"] == "postgresql"
    assert (folder / "manifest.json").stat().st_mode & 0o777 == 0o600
    assert "emergency.preserve-evidence.finished" in _actions(db)


def test_restart_all_on_local_checks_external_services(ops: Cli) -> None:
    dry = ops.ok("emergency", "restart-all", "--dry-run")
    assert "not managed by the local platform" in dry.stdout
    order = [line for line in dry.stdout.splitlines() if re.match(r"\s+\d+\. ", line)]
    assert "PostgreSQL" in order[0] and "Kafka" in order[1] and "Redis" in order[2] and "gateway" in order[3]
    done = ops.ok("emergency", "restart-all", "--yes")
    assert "Every component restarted and healthy." in done.stdout
    assert _states(ops)["gateway"] == "running"


def test_rotate_all_rotates_the_signing_key_of_a_running_ledger_writer(
    tmp_path: Path, database_url: str, db: Database
) -> None:
    """No database password file and no Kafka: those are skipped; the Merkle key is rotated for real, the
    running ledger writer is restarted, seals with the new key, and the batches before still verify."""
    key_dir = tmp_path / "keys"
    config = tmp_path / "caracal.yaml"
    config.write_text(
        "\n".join(
            [
                "integrity:",
                f"  key_dir: {json.dumps(str(key_dir))}",
                "  batch_size: 50",
                "  batch_max_age_seconds: 1",
                "platform:",
                "  kind: local",
                "  stop_timeout_seconds: 30",
                "embedded:",
                f"  data_dir: {json.dumps(str(tmp_path / 'data'))}",
            ]
        )
        + "\n"
    )
    ops = Cli(database_url, env={"CARACAL_CONFIG": str(config)})
    try:
        _rotate_all_with_a_writer(ops, database_url, db, key_dir)
    finally:
        ops("services", "down")


def _sealed_by(url: str) -> dict[str, int]:
    found = rows(
        url,
        "SELECT b.key_name, count(*) AS n FROM ledger_events e JOIN merkle_batches b"
        " ON b.batch_id = e.merkle_root_id GROUP BY 1",
    )
    return {r["key_name"]: int(r["n"]) for r in found}


def _rotate_all_with_a_writer(ops: Cli, url: str, db: Database, key_dir: Path) -> None:
    from caracald.bus import pg_log
    from caracald.integrity import keys

    old = "ledger-key-before"
    ops.ok("merkle", "generate-key", "--name", old)
    agents = add_agents(url, 2)
    ops.ok("services", "up", "--component", "ledger-writer")

    def produce(start: int) -> None:
        producer = pg_log.PgLogProducer(url)
        try:
            send_events(producer, make_events(agents, 120, start=start))
        finally:
            producer.close()

    def all_sealed(count: int) -> bool:
        return sum(_sealed_by(url).values()) == count

    produce(0)
    wait_for(lambda: all_sealed(120), timeout=90, what="the first events sealed")
    assert set(_sealed_by(url)) == {old}
    pid_before = json.loads(ops.ok("services", "status", "-o", "json").stdout)["components"]

    dry = ops.ok("emergency", "rotate-all", "--dry-run")
    assert "Merkle: rotate the signing key" in dry.stdout and keys.active_name(key_dir) == old
    done = ops.ok("emergency", "rotate-all", "--yes")
    assert "database password skipped" in done.stdout and "Kafka credentials skipped" in done.stdout
    assert "signing key rotated" in done.stdout and "Credentials rotated." in done.stdout
    new = keys.active_name(key_dir)
    assert new is not None and new != old
    assert not (key_dir / f"{old}.key").exists() and (key_dir / f"{old}.pub").exists()
    with db.read() as conn:
        history = {r.key_name: r.active for r in keys.key_history(conn)}
    assert history == {old: False, new: True}
    status = json.loads(ops.ok("services", "status", "-o", "json").stdout)["components"]
    writer = {c["component"]: c for c in status}["ledger-writer"]
    assert writer["state"] == "running"
    assert writer["detail"] != {c["component"]: c for c in pid_before}["ledger-writer"]["detail"]  # restarted

    produce(120)
    wait_for(lambda: all_sealed(240), timeout=90, what="the later events sealed")
    assert _sealed_by(url) == {old: 120, new: 120}
    verified = block(
        ops.ok("merkle", "verify-range", "--start-time", "2000-01-01", "--end-time", "now").stdout
    )
    assert verified["Integrity"] == "PASSED" and verified["Event Count"] == "240"
    actions = _actions(db)
    assert "emergency.rotate-all.finished" in actions
