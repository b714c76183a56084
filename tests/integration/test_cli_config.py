"""``caracal config show``: the effective configuration, secrets redacted."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from caracal_ops.cli.main import app


def test_config_show_redacts_secrets_and_names_its_source(tmp_path: Path) -> None:
    secret = tmp_path / "database-url"
    secret.write_text("postgresql://caracal:hunter2@db.internal:5432/caracal\n")
    config = tmp_path / "caracal.yaml"
    config.write_text(
        f"database:\n  url_file: {secret}\n  pool_size: 50\n"
        "gateway:\n  upstreams:\n    openai:\n      base_url: https://api.openai.com\n      api_key: sk-live-123\n"
    )
    runner = CliRunner()
    shown = runner.invoke(
        app, ["--config", str(config), "config", "show"], env={"CARACAL__DATABASE__MAX_OVERFLOW": "7"}
    )
    assert shown.exit_code == 0, shown.output
    assert "hunter2" not in shown.stdout and "sk-live-123" not in shown.stdout
    assert shown.stdout.startswith(f"# source: {config}")
    data = json.loads(
        runner.invoke(
            app,
            ["--config", str(config), "config", "show", "-o", "json"],
            env={"CARACAL__DATABASE__MAX_OVERFLOW": "7"},
        ).stdout
    )
    assert data["database"]["url"] == "********"
    assert data["database"]["pool_size"] == 50
    assert data["database"]["max_overflow"] == 7
    assert data["gateway"]["upstreams"]["openai"]["api_key"] == "********"


def test_config_errors_are_one_line(tmp_path: Path) -> None:
    config = tmp_path / "caracal.yaml"
    config.write_text("database:\n  pool_size: lots\n")
    result = CliRunner().invoke(app, ["--config", str(config), "config", "show"])
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: invalid configuration")
    assert result.stderr.count("\n") == 1
