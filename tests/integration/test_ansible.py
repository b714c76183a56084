"""ansible/: lint-clean at the production profile, every playbook parses, ``deploy.yml`` runs in check mode
against this machine (every path under a temporary folder, so it changes nothing), and the operations
playbooks run for real on the ``local`` platform against the real PostgreSQL test database.

A playbook that calls a ``caracal`` command which does not exist fails here (ansible-playbook exits non-zero
and the test prints its output): it is never skipped.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from caracald.store.database import Database
from caracald.store.gateway import DENY_ALL, get_switch
from tests.deploytools import ROOT

pytestmark = pytest.mark.integration

ANSIBLE = ROOT / "ansible"
BIN = Path(sys.executable).parent
PLAYBOOKS = sorted(p.name for p in ANSIBLE.glob("*.yml"))
GROUPS = ("caracal_gateways", "caracal_consumers", "caracal_backup")


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: pip install -e '.[dev]' (ansible-core and ansible-lint)")
    return str(path)


def _env(tmp_path: Path) -> dict[str, str]:
    """Ansible's own state (its temp folders, collections cache) under tmp_path, and this virtualenv first."""
    home = tmp_path / "ansible-home"
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_REMOTE_TEMP": str(home / "remote-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_STDOUT_CALLBACK": "default",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
    }


def _run(argv: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ANSIBLE, env=env, capture_output=True, text=True, timeout=timeout)


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def _inventory(tmp_path: Path) -> Path:
    """This machine in every group, over the local connection, with this interpreter (it has pip's needs)."""
    host = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        # The playbooks escalate with sudo on real hosts; here the test user runs them as itself.
        "ansible_become": False,
    }
    inventory = {
        "all": {
            "hosts": {"localhost": host},
            "children": {group: {"hosts": {"localhost": {}}} for group in GROUPS},
        }
    }
    path = tmp_path / "inventory.json"
    path.write_text(json.dumps(inventory))
    return path


def _vars(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "extra-vars.json"
    path.write_text(json.dumps(values))
    return path


def _playbook(
    tmp_path: Path, playbook: str, values: dict[str, Any], *args: str
) -> subprocess.CompletedProcess[str]:
    return _run(
        [
            _tool("ansible-playbook"),
            "-i",
            str(_inventory(tmp_path)),
            "-e",
            f"@{_vars(tmp_path, values)}",
            *args,
            playbook,
        ],
        _env(tmp_path),
    )


def _recap(stdout: str) -> dict[str, int]:
    line = next(line for line in stdout.splitlines() if line.startswith("localhost") and "ok=" in line)
    return {key: int(value) for key, value in (part.split("=") for part in line.split()[2:])}


# -- static checks -------------------------------------------------------------------------------------


def test_the_playbooks_and_roles_exist() -> None:
    assert {
        "deploy.yml",
        "backup.yml",
        "restore.yml",
        "emergency-shutdown.yml",
        "resume-writes.yml",
        "rotate-credentials.yml",
    } <= set(PLAYBOOKS)
    for role in ("common", "gateway", "consumers", "backup"):
        assert (ANSIBLE / "roles" / role / "tasks" / "main.yml").is_file(), role
    assert (ANSIBLE / "inventory" / "example.yml").is_file()
    assert (ANSIBLE / "group_vars" / "all.yml").is_file()


@pytest.mark.timeout(900)
def test_ansible_lint_production_profile_is_clean(tmp_path: Path) -> None:
    result = _run(
        [_tool("ansible-lint"), "--offline", "--profile", "production", "--nocolor", "."],
        _env(tmp_path),
    )
    assert result.returncode == 0, _output(result)
    assert "passed" in (result.stdout + result.stderr), _output(result)


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_syntax_check(tmp_path: Path, playbook: str) -> None:
    result = _run(
        [_tool("ansible-playbook"), "-i", "inventory/example.yml", "--syntax-check", playbook],
        _env(tmp_path),
    )
    assert result.returncode == 0, _output(result)


# -- deploy.yml in check mode --------------------------------------------------------------------------


@pytest.mark.timeout(900)  # ansible-playbook runs ~25 tasks, a few seconds each
def test_deploy_check_mode_on_this_machine_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "database-url").write_text("postgresql://caracal:not-a-secret@db.invalid:5432/caracal\n")
    values = {
        "caracal_root": str(root),
        "caracal_file_owner": pwd.getpwuid(os.getuid()).pw_name,
        "caracal_file_group": grp.getgrgid(os.getgid()).gr_name,
        "caracal_systemd_src": str(ROOT / "systemd"),
        "caracal_pip_spec": f"caracal @ file://{ROOT}",
        # one credential from a file on the control machine, the others inline (vault variables in real use)
        "caracal_credentials": [
            {"name": "database-url", "src": str(secrets / "database-url")},
            {"name": "redis-url", "content": "redis://redis.invalid:6379/0"},
            {"name": "openai-api-key", "content": ""},
            {"name": "anthropic-api-key", "content": ""},
        ],
        "caracal_consumer_ports": {
            "ledger-writer": {"health": 8081, "metrics": 9091},
            "metrics-aggregator": {"health": 8082, "metrics": 9092},
            "audit-logger": {"health": 8083, "metrics": 9093},
        },
    }
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "ansible-home" not in p.parts)
    result = _playbook(tmp_path, "deploy.yml", values, "--check", "--diff")
    assert result.returncode == 0, _output(result)
    recap = _recap(result.stdout)
    assert recap["failed"] == 0 and recap["unreachable"] == 0, _output(result)
    assert recap["changed"] > 0, _output(result)  # a fresh machine: everything is to do
    # nothing was written: the temporary root was never created
    assert not root.exists(), sorted(str(p) for p in root.rglob("*"))
    after = sorted(
        p.relative_to(tmp_path)
        for p in tmp_path.rglob("*")
        if "ansible-home" not in p.parts and p.name not in {"inventory.json", "extra-vars.json"}
    )
    assert after == before
    # the plan shows the rendered configuration (no secret in it) and the consumers' port drop-ins
    assert "platform:" in result.stdout and "kind: systemd" in result.stdout, _output(result)
    assert "CARACAL_HEALTH_PORT=8081" in result.stdout, _output(result)
    assert "not-a-secret" not in result.stdout + result.stderr
    assert "redis.invalid" not in result.stdout + result.stderr


# -- operations playbooks, for real, on the local platform ---------------------------------------------


@pytest.fixture
def ops_values(tmp_path: Path, database_url: str) -> dict[str, Any]:
    config = tmp_path / "caracal.yaml"
    config.write_text(
        json.dumps(
            {
                "platform": {"kind": "local", "stop_timeout_seconds": 2},
                "embedded": {"data_dir": str(tmp_path / "data")},
                "backup": {"dir": str(tmp_path / "backups")},
            }
        )
    )
    return {
        "caracal_cli": str(_tool("caracal")),
        "caracal_config_path": str(config),
        "caracal_actor": "ansible:test",
        # the URL goes through the environment (an extra-vars file), never on a command line
        "caracal_cli_environment": {"CARACAL_DATABASE_URL": database_url},
    }


def test_backup_playbook_creates_and_verifies_a_backup_that_restore_puts_back(
    tmp_path: Path, ops_values: dict[str, Any]
) -> None:
    result = _playbook(tmp_path, "backup.yml", ops_values)
    assert result.returncode == 0, _output(result)
    recap = _recap(result.stdout)
    assert recap["failed"] == 0 and recap["changed"] == 1, _output(result)
    manifests = list((tmp_path / "backups").rglob("*manifest*"))
    assert manifests, sorted(str(p) for p in (tmp_path / "backups").rglob("*"))
    found = re.search(r"Backup (\S+) verified", result.stdout)
    assert found, _output(result)
    assert "postgresql://" not in result.stdout + result.stderr

    # restore.yml puts it back (on the local platform nothing runs, so nothing is stopped or started)
    restored = _playbook(tmp_path, "restore.yml", {**ops_values, "backup_id": found.group(1)})
    assert restored.returncode == 0, _output(restored)
    assert _recap(restored.stdout)["changed"] == 1, _output(restored)
    assert f"Backup {found.group(1)} restored." in restored.stdout, _output(restored)


def test_restore_requires_a_backup_id(tmp_path: Path, ops_values: dict[str, Any]) -> None:
    result = _playbook(tmp_path, "restore.yml", ops_values)
    assert result.returncode != 0
    assert "-e backup_id=" in result.stdout, _output(result)


def test_emergency_shutdown_then_resume(
    tmp_path: Path, ops_values: dict[str, Any], database_url: str
) -> None:
    def switch_on() -> bool:
        with Database(database_url) as db, db.read() as conn:
            switch = get_switch(conn, DENY_ALL)
        return bool(switch and switch.enabled)

    assert not switch_on()

    # check mode: only the plan (--dry-run), nothing changes
    preview = _playbook(tmp_path, "emergency-shutdown.yml", ops_values, "--check")
    assert preview.returncode == 0, _output(preview)
    assert "Dry run" in preview.stdout and _recap(preview.stdout)["changed"] == 0, _output(preview)
    assert not switch_on()

    stop = _playbook(tmp_path, "emergency-shutdown.yml", ops_values)
    assert stop.returncode == 0, _output(stop)
    assert _recap(stop.stdout)["changed"] == 1 and "Writes stopped." in stop.stdout, _output(stop)
    assert switch_on()

    resume = _playbook(tmp_path, "resume-writes.yml", ops_values)
    assert resume.returncode == 0, _output(resume)
    assert _recap(resume.stdout)["changed"] == 1 and "Writes resumed" in resume.stdout, _output(resume)
    assert not switch_on()
