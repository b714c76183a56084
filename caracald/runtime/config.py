"""Configuration: one YAML file, environment overrides, secrets read from files.

Precedence, lowest first: built-in defaults, the YAML file (``--config`` or ``CARACAL_CONFIG``),
environment variables (``CARACAL_DATABASE_URL`` and friends, or the generic
``CARACAL__SECTION__KEY=value``), then explicit command-line options. A secret is never required on a
command line: every secret field has a ``*_file`` twin (``database.url_file``, ``database.password_file``,
``redis.url_file`` ...) naming a file to read it from, as systemd credentials and Kubernetes secrets provide.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from caracald.core.errors import ValidationError as CaracalValidationError

ENV_PREFIX = "CARACAL__"

#: Short, documented environment names for the settings people change most.
ENV_SHORTCUTS: Mapping[str, tuple[str, ...]] = {
    "CARACAL_DATABASE_URL": ("database", "url"),
    "CARACAL_READ_REPLICA_URL": ("database", "read_replica_url"),
    "CARACAL_DATA_DIR": ("embedded", "data_dir"),
    "CARACAL_KAFKA_BOOTSTRAP_SERVERS": ("kafka", "bootstrap_servers"),
    "CARACAL_REDIS_URL": ("redis", "url"),
}


def default_data_dir() -> Path:
    """Per-user data folder: ``$CARACAL_HOME``, ``$XDG_DATA_HOME/caracal`` or ``~/.local/share/caracal``."""
    if home := os.environ.get("CARACAL_HOME"):
        return Path(home).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "caracal"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseConfig(_Section):
    """PostgreSQL. With no ``url`` Caracal runs the embedded server in ``embedded.data_dir``."""

    url: SecretStr | None = None
    url_file: Path | None = None
    password_file: Path | None = None
    read_replica_url: SecretStr | None = None
    read_replica_url_file: Path | None = None
    pool_size: int = Field(default=20, ge=1, le=1000)
    max_overflow: int = Field(default=50, ge=0, le=1000)
    connect_timeout_seconds: int = Field(default=5, ge=1, le=300)
    statement_timeout_ms: int = Field(default=30_000, ge=100)


class EmbeddedConfig(_Section):
    data_dir: Path = Field(default_factory=lambda: default_data_dir())


class KafkaConfig(_Section):
    bootstrap_servers: str | None = None
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None


class RedisConfig(_Section):
    url: SecretStr | None = None
    url_file: Path | None = None


class CaracalConfig(_Section):
    database: DatabaseConfig = DatabaseConfig()
    embedded: EmbeddedConfig = EmbeddedConfig()
    kafka: KafkaConfig = KafkaConfig()
    redis: RedisConfig = RedisConfig()
    #: Where the settings came from (a file path, or "defaults"); shown by ``config show``.
    source: str = Field(default="defaults", exclude=True)

    @property
    def embedded_mode(self) -> bool:
        return self.database.url is None

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, with every secret replaced by a marker."""
        data = self.model_dump(mode="json")
        for section in data.values():
            if isinstance(section, dict):
                for key, value in section.items():
                    if value is not None and _is_secret_field(key):
                        section[key] = "********"
        return data


def _is_secret_field(key: str) -> bool:
    return key in {"url", "read_replica_url", "sasl_password"}


def _set_path(target: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = target
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise CaracalValidationError(f"configuration key {'.'.join(path)} conflicts with a scalar value")
        node = child
    node[path[-1]] = value


def _read_secret(path: Path, what: str) -> str:
    try:
        return path.expanduser().read_text().strip()
    except OSError as exc:
        raise CaracalValidationError(f"cannot read {what} from {path}: {exc.strerror}") from None


def _resolve_secret_files(data: dict[str, Any]) -> None:
    """Replace ``x_file`` entries by the secret they point to (unless ``x`` is set directly)."""
    for section in data.values():
        if not isinstance(section, dict):
            continue
        for key in [k for k in section if k.endswith("_file") and k != "password_file"]:
            target = key.removesuffix("_file")
            path = section.get(key)
            if path and not section.get(target):
                section[target] = _read_secret(Path(path), f"{target} secret")


def _apply_password_file(data: dict[str, Any]) -> None:
    """``database.password_file`` supplies the password of a URL that has none."""
    database = data.get("database") or {}
    password_file = database.get("password_file")
    url = database.get("url")
    if not password_file or not url:
        return
    password = _read_secret(Path(password_file), "database password")
    parts = urlsplit(url)
    if parts.password:
        return
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{quote(user)}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    database["url"] = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str, ...], Any] | None = None,
) -> CaracalConfig:
    """Build the effective configuration. Raises a Caracal ValidationError with a readable message."""
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    source = "defaults"
    config_path = path or (Path(env["CARACAL_CONFIG"]) if env.get("CARACAL_CONFIG") else None)
    if config_path is not None:
        try:
            loaded = yaml.safe_load(config_path.expanduser().read_text())
        except OSError as exc:
            raise CaracalValidationError(f"cannot read config file {config_path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise CaracalValidationError(f"config file {config_path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise CaracalValidationError(f"config file {config_path} must hold a mapping at the top level")
        data = loaded
        source = str(config_path)
    for name, key_path in ENV_SHORTCUTS.items():
        if env.get(name):
            _set_path(data, key_path, env[name])
    for name, value in env.items():
        if name.startswith(ENV_PREFIX):
            parts = tuple(part.lower() for part in name.removeprefix(ENV_PREFIX).split("__") if part)
            if len(parts) >= 2:
                _set_path(data, parts, value)
    for key_path, value in (overrides or {}).items():
        if value is not None:
            _set_path(data, key_path, value)
    _resolve_secret_files(data)
    _apply_password_file(data)
    data["source"] = source
    try:
        return CaracalConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise CaracalValidationError(f"invalid configuration ({source}): {problems}") from None
