"""Configuration: file, environment, secrets from files, redaction."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from caracald.core.errors import ValidationError
from caracald.runtime.config import default_data_dir, load_config


def test_defaults_mean_the_embedded_store(tmp_path: Path) -> None:
    config = load_config(environ={"CARACAL_HOME": str(tmp_path)})
    assert config.embedded_mode
    assert config.database.pool_size == 20
    assert config.database.max_overflow == 50


def test_data_dir_defaults_per_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CARACAL_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "caracal"
    monkeypatch.setenv("CARACAL_HOME", str(tmp_path / "elsewhere"))
    assert default_data_dir() == tmp_path / "elsewhere"


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "caracal.yaml"
    path.write_text(
        "database:\n  url: postgresql://file/caracal\n  pool_size: 50\n  max_overflow: 100\n"
        "  read_replica_url: postgresql://replica:5432/caracal\n"
    )
    config = load_config(path, environ={"CARACAL__DATABASE__POOL_SIZE": "60"})
    assert config.database.url is not None
    assert config.database.url.get_secret_value() == "postgresql://file/caracal"
    assert config.database.pool_size == 60
    assert config.database.max_overflow == 100
    overridden = load_config(
        path,
        environ={"CARACAL_DATABASE_URL": "postgresql://env/caracal"},
        overrides={("database", "url"): "postgresql://flag/caracal"},
    )
    assert overridden.database.url is not None
    assert overridden.database.url.get_secret_value() == "postgresql://flag/caracal"
    assert not overridden.embedded_mode


def test_secrets_come_from_files_and_are_redacted(tmp_path: Path) -> None:
    (tmp_path / "url").write_text("postgresql://caracal@db.internal:5432/caracal\n")
    (tmp_path / "password").write_text("s3cr3t/with:chars\n")
    path = tmp_path / "caracal.yaml"
    path.write_text(f"database:\n  url_file: {tmp_path / 'url'}\n  password_file: {tmp_path / 'password'}\n")
    config = load_config(path, environ={})
    assert config.database.url is not None
    url = config.database.url.get_secret_value()
    assert url == "postgresql://caracal:s3cr3t%2Fwith%3Achars@db.internal:5432/caracal"
    shown = config.redacted()
    assert shown["database"]["url"] == "********"
    assert "s3cr3t" not in repr(config)
    assert "s3cr3t" not in str(shown)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("database: [1, 2", "not valid YAML"),
        ("- a\n- b\n", "mapping at the top level"),
        ("database:\n  pool_size: 0\n", "pool_size"),
        ("database:\n  pool_sise: 5\n", "pool_sise"),
        ("database:\n  url_file: /nonexistent/caracal-url\n", "cannot read url secret"),
    ],
)
def test_bad_configuration_is_reported_clearly(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "caracal.yaml"
    path.write_text(text)
    with pytest.raises(ValidationError, match=re.escape(message)):
        load_config(path, environ={})


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml", environ={})
