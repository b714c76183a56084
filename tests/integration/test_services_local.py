"""``caracal services`` and ``caracal logs`` on the local platform, with real processes.

Small Python daemons stand in for the components through ``platform.commands``, so that every behaviour
(SIGTERM, SIGKILL after the timeout, a crash at start, a death later, a recycled pid) is real; the last
test runs the real ``caracald gateway`` and talks to it over HTTP.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from caracal_ops.platform.local import caracald_commands
from tests.harness.ports import free_port
from tests.integration.conftest import Cli

pytestmark = pytest.mark.integration

DAEMON = """
import os, signal, sys, time
name, mode = sys.argv[1], sys.argv[2]
if mode == "stubborn":
    signal.signal(signal.SIGTERM, lambda *_: print(f"{name} ignores SIGTERM", flush=True))
print(f"{name} ready pid {os.getpid()} db={os.environ.get('CARACAL_DATABASE_URL', '')[:13]}", flush=True)
if mode == "crash":
    sys.exit(3)
if mode == "dies-later":
    time.sleep(1.5)
    sys.exit(4)
while True:
    time.sleep(0.1)
"""

MODES = {
    "gateway": "normal",
    "ledger-writer": "normal",
    "metrics-aggregator": "stubborn",
    "audit-logger": "normal",
}


def _setup(tmp_path: Path, database_url: str, modes: dict[str, str], extra: str = "") -> Cli:
    script = tmp_path / "daemon.py"
    script.write_text(DAEMON)
    lines = [
        "platform:",
        "  kind: local",
        "  stop_timeout_seconds: 1",
        *(["  commands:"] if modes else []),
        *[
            f"    {name}: [{json.dumps(sys.executable)}, {json.dumps(str(script))}, {name}, {mode}]"
            for name, mode in modes.items()
        ],
        "embedded:",
        f"  data_dir: {json.dumps(str(tmp_path / 'data'))}",
        extra,
    ]
    config = tmp_path / "caracal.yaml"
    config.write_text("\n".join(lines) + "\n")
    return Cli(database_url, env={"CARACAL_CONFIG": str(config)})


def _status(cli: Cli) -> dict[str, dict[str, Any]]:
    data = json.loads(cli.ok("services", "status", "-o", "json").stdout)
    assert data["platform"] == "local"
    return {c["component"]: c for c in data["components"]}


def _pid(tmp_path: Path, component: str) -> int:
    return int(json.loads((tmp_path / "data" / "run" / f"{component}.pid").read_text())["pid"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.fixture
def stop_everything(tmp_path: Path) -> Iterator[list[Cli]]:
    """Whatever a test started is stopped at its end, even when it fails."""
    started: list[Cli] = []
    yield started
    for cli in started:
        cli("services", "down")


def test_up_status_logs_down(tmp_path: Path, database_url: str, stop_everything: list[Cli]) -> None:
    cli = _setup(tmp_path, database_url, MODES)
    stop_everything.append(cli)
    assert {c["state"] for c in _status(cli).values()} == {"stopped"}

    up = cli.ok("services", "up")
    for name in MODES:
        assert f"{name} started (pid " in up.stdout
    assert "[4/4] Start audit-logger" in up.stderr
    status = _status(cli)
    assert {name: c["state"] for name, c in status.items()} == dict.fromkeys(MODES, "running")
    pids = {name: _pid(tmp_path, name) for name in MODES}
    assert all(_alive(pid) for pid in pids.values())
    assert status["gateway"]["detail"].startswith(f"pid {pids['gateway']}, up ")

    again = cli.ok("services", "up", "--component", "gateway")
    assert f"gateway already running (pid {pids['gateway']})" in again.stdout

    logs = cli.ok("logs", "--component", "ledger-writer", "--lines", "5")
    assert f"ledger-writer ready pid {pids['ledger-writer']} db=postgresql://" in logs.stdout
    table = cli.ok("services", "status").stdout.splitlines()
    assert table[0] == "Platform: local"
    assert table[1].split() == ["COMPONENT", "STATE", "READY", "DETAIL"]

    down = cli.ok("services", "down")
    assert "gateway stopped (pid" in down.stdout
    assert "SIGTERM" in down.stdout.split("gateway stopped")[1].splitlines()[0]
    assert "metrics-aggregator stopped" in down.stdout
    assert "SIGKILL after 1 s" in down.stdout.split("metrics-aggregator stopped")[1].splitlines()[0]
    assert not any(_alive(pid) for pid in pids.values())
    assert {c["state"] for c in _status(cli).values()} == {"stopped"}
    assert not list((tmp_path / "data" / "run").glob("*.pid"))
    stubborn_log = cli.ok("logs", "--component", "metrics-aggregator").stdout
    assert "metrics-aggregator ignores SIGTERM" in stubborn_log
    assert "caracal services: stopped metrics-aggregator (SIGKILL after 1 s)" in stubborn_log

    # every run is in the audit log
    audit = json.loads(cli.ok("audit", "query", "--event-type", "ops_procedure", "-o", "json").stdout)
    actions = [entry["action"] for entry in (audit if isinstance(audit, list) else audit["records"])]
    assert actions.count("services.up.finished") == 2
    assert actions.count("services.down.finished") == 1


def test_scale_and_restart(tmp_path: Path, database_url: str, stop_everything: list[Cli]) -> None:
    cli = _setup(tmp_path, database_url, {"gateway": "normal"})
    stop_everything.append(cli)
    scaled = cli.ok("services", "scale", "--component", "gateway", "--replicas", "3")
    assert "the local platform runs one replica per component" in scaled.stdout
    first = _pid(tmp_path, "gateway")
    restarted = cli.ok("services", "restart", "--component", "caracal-gateway")
    second = _pid(tmp_path, "gateway")
    assert second != first and not _alive(first) and _alive(second)
    assert "gateway stopped" in restarted.stdout and "gateway started" in restarted.stdout
    cli.ok("services", "scale", "--component", "gateway", "--replicas", "0")
    assert not _alive(second)
    assert _status(cli)["gateway"]["state"] == "stopped"


def test_a_component_that_dies_at_start_or_later(
    tmp_path: Path, database_url: str, stop_everything: list[Cli]
) -> None:
    cli = _setup(tmp_path, database_url, {"gateway": "crash", "ledger-writer": "dies-later"})
    stop_everything.append(cli)
    crashed = cli("services", "up", "--component", "gateway")
    assert crashed.exit_code == 1
    error = crashed.stderr.strip().splitlines()[-1]
    assert error.startswith(
        "Error: services.up failed at step 1 of 1 (Start gateway): gateway exited at once (exit code 3)"
    )
    assert "gateway.log: gateway ready pid" in error
    assert not (tmp_path / "data" / "run" / "gateway.pid").exists()

    cli.ok("services", "up", "--component", "ledger-writer")
    pid = _pid(tmp_path, "ledger-writer")
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    status = _status(cli)["ledger-writer"]
    assert status["state"] == "failed"
    assert f"pid {pid} exited without being stopped" in status["detail"]
    down = cli.ok("services", "down", "--component", "ledger-writer")
    assert f"ledger-writer not running (removed the stale pid file of pid {pid})" in down.stdout
    assert _status(cli)["ledger-writer"]["state"] == "stopped"


def test_a_recycled_pid_is_never_signalled(tmp_path: Path, database_url: str) -> None:
    """A pid file whose pid now belongs to another process (here: this test) is stale, not running."""
    cli = _setup(tmp_path, database_url, {"gateway": "normal"})
    run = tmp_path / "data" / "run"
    run.mkdir(parents=True)
    (run / "gateway.pid").write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "start_ticks": 1,
                "argv": ["caracald", "gateway"],
                "started_at": "2024-01-15T10:30:00+00:00",
            }
        )
    )
    assert _status(cli)["gateway"]["state"] == "failed"
    down = cli.ok("services", "down", "--component", "gateway")
    assert "gateway not running (removed the stale pid file" in down.stdout
    assert _alive(os.getpid())


def test_bad_input(tmp_path: Path, database_url: str) -> None:
    cli = _setup(tmp_path, database_url, {"gateway": "normal"})
    unknown = cli("services", "up", "--component", "postgresql")
    assert unknown.exit_code == 2
    assert "unknown component 'postgresql'" in unknown.stderr
    no_log = cli("logs", "--component", "gateway")
    assert no_log.exit_code == 1
    assert "no log for gateway yet" in no_log.stderr


def test_the_real_gateway_daemon(tmp_path: Path, database_url: str, stop_everything: list[Cli]) -> None:
    """``caracald gateway`` as the local platform runs it: up, serving /health, logs, down with SIGTERM."""
    assert "gateway" in caracald_commands()
    port = free_port()
    cli = _setup(tmp_path, database_url, {}, extra=f"gateway:\n  host: 127.0.0.1\n  port: {port}\n")
    stop_everything.append(cli)
    absent = [
        c for c in ("ledger-writer", "metrics-aggregator", "audit-logger") if c not in caracald_commands()
    ]
    status = _status(cli)
    for name in absent:
        assert status[name]["state"] == "not-installed"
    if absent:
        refused = cli("services", "up", "--component", absent[0])
        assert refused.exit_code == 2
        assert f"{absent[0]} cannot run on the local platform" in refused.stderr

    up = cli.ok("services", "up", "--component", "gateway")
    assert "gateway started (pid" in up.stdout
    deadline = time.monotonic() + 60
    health = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                health = json.loads(response.read())
                break
        except OSError:
            time.sleep(0.2)
    assert health is not None, cli.ok("logs", "--component", "gateway").stdout
    assert _status(cli)["gateway"]["state"] == "running"
    assert f"{port}" in cli.ok("logs", "--component", "gateway", "--lines", "50").stdout

    pid = _pid(tmp_path, "gateway")
    down = cli.ok("services", "down", "--component", "gateway")
    assert "SIGTERM" in down.stdout and "SIGKILL" not in down.stdout
    assert not _alive(pid)
