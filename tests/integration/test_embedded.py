"""The embedded default, driven through the installed console scripts as a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _run(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CARACAL_HOME": str(home)}
    for name in ("CARACAL_DATABASE_URL", "CARACAL_CONFIG", "CARACAL_DATA_DIR"):
        env.pop(name, None)
    result = subprocess.run(
        [str(BIN / args[0]), *args[1:]], env=env, capture_output=True, text=True, timeout=180
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("caracal-home")
    path.chmod(0o755)  # the embedded server runs as its own user when started by root
    yield path
    _run(path, "caracal", "db", "stop", check=False)
    shutil.rmtree(path, ignore_errors=True)


def test_up_sets_up_the_store_and_says_what_to_do_next(home: Path) -> None:
    out = _run(home, "caracald", "up", "--setup-only").stdout
    assert f"embedded PostgreSQL in {home}" in out
    assert "caracal agent create" in out
    assert (home / "pgdata" / "PG_VERSION").exists()


def test_commands_share_the_running_embedded_server(home: Path) -> None:
    created = json.loads(
        _run(
            home,
            "caracal",
            "agent",
            "create",
            "--name",
            "embedded-agent",
            "--owner",
            "o@example.com",
            "-o",
            "json",
        ).stdout
    )
    listed = json.loads(_run(home, "caracal", "agent", "list", "-o", "json").stdout)
    assert [a["agent_id"] for a in listed] == [created["agent_id"]]
    health = json.loads(_run(home, "caracal", "db", "health-check", "-o", "json").stdout)
    assert health["mode"] == "embedded"
    assert health["status"] == "healthy"


def test_stop_then_the_next_command_starts_it_again(home: Path) -> None:
    assert "stopped" in _run(home, "caracal", "db", "stop").stdout
    assert "not running" in _run(home, "caracal", "db", "stop").stdout
    listed = json.loads(_run(home, "caracal", "agent", "list", "-o", "json").stdout)
    assert [a["name"] for a in listed] == ["embedded-agent"]  # data survived the restart


def test_help_never_starts_a_server(tmp_path: Path) -> None:
    _run(tmp_path, "caracal", "--help")
    _run(tmp_path, "caracal", "agent", "create", "--help")
    assert not (tmp_path / "pgdata").exists()


def test_usage_errors_are_one_line_too(home: Path) -> None:
    result = _run(home, "caracal", "policy", "create", "--agent-id", "x", check=False)
    assert result.returncode == 2
    assert result.stderr == "Error: Missing option '--limit'. (see 'caracal policy create --help')\n"


def test_bad_input_exits_cleanly_without_a_traceback(home: Path) -> None:
    result = _run(home, "caracal", "agent", "get", "--agent-id", "not-a-uuid", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "Error: malformed agent id 'not-a-uuid': expected a UUID such as 550e8400-e29b-41d4-a716-446655440000"
    )
