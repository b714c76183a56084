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
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

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


def _redact(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: "********" if value is not None and _is_secret_field(key) else _redact(value)
            for key, value in node.items()
        }
    return node


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
    #: How long a gateway with a charge journal (``bus.spool_dir``) lets its events gather before they go to
    #: Kafka together. The journal already holds them, so no request waits for this: a longer wait only
    #: delays the ledger, and spares the gateway's core the wake-ups of many small batches.
    gateway_linger_ms: int = Field(default=100, ge=0, le=5_000)


class RedisConfig(_Section):
    url: SecretStr | None = None
    url_file: Path | None = None


class UpstreamConfig(_Section):
    """A provider the gateway forwards to. The agent never sees ``api_key``."""

    # An error must not print the key it found wrong.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    base_url: str
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    #: How the provider wants its key: "bearer" (Authorization: Bearer), or a header name such as x-api-key.
    auth: str = "bearer"
    #: Wire format for usage metering and error shapes: openai, anthropic or generic.
    flavor: Literal["openai", "anthropic", "generic"] = "generic"

    @field_validator("api_key", "auth")
    @classmethod
    def _header_safe(cls, value: Any) -> Any:
        """Both go into a request header: no control characters (a line break would end the header)."""
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str) and (any(ord(c) < 32 or ord(c) == 127 for c in text) or not text.isascii()):
            raise ValueError("must be printable ASCII (no line breaks or other control characters)")
        return value


def _default_upstreams() -> dict[str, UpstreamConfig]:
    return {
        "openai": UpstreamConfig(base_url="https://api.openai.com", flavor="openai"),
        "anthropic": UpstreamConfig(
            base_url="https://api.anthropic.com", auth="x-api-key", flavor="anthropic"
        ),
    }


class TlsConfig(_Section):
    cert_file: Path | None = None
    key_file: Path | None = None
    #: When set, clients must present a certificate chaining to this CA (mTLS).
    client_ca_file: Path | None = None


class GatewayConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=_default_upstreams)
    #: Allow the generic route (target URL in the X-Caracal-Target-URL header).
    generic_route: bool = True
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    upstream_timeout_seconds: float = Field(default=600, gt=0)
    hold_ttl_seconds: int = Field(default=900, ge=10)
    #: The output limit the gateway sets on an LLM call that gives none (clamped to what the budget affords).
    default_max_output_tokens: int = Field(default=4096, ge=1)
    #: How long cached agents, policies, allowlists and prices may serve while PostgreSQL is down.
    cache_max_staleness_seconds: int = Field(default=300, ge=1)
    cache_refresh_seconds: float = Field(default=5, gt=0)
    tls: TlsConfig = TlsConfig()

    def local_url(self, port: int | None = None) -> str:
        """Where a client on this host reaches this gateway (``port``: another of its ports, e.g. the
        metrics port): its listen address, a wildcard one turned into loopback."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a listen address, turned into one to connect to
            host = "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        scheme = "https" if self.tls.cert_file else "http"
        return f"{scheme}://{host}:{self.port if port is None else port}"


class BudgetConfig(_Section):
    #: "local" (in process, embedded default) or "redis" (shared by every gateway replica).
    backend: Literal["local", "redis"] = "local"


class BusConfig(_Section):
    #: "postgres" (the event-log table, embedded default) or "kafka".
    kind: Literal["postgres", "kafka"] = "postgres"
    #: Durable local spool for events while the bus is unreachable.
    spool_dir: Path | None = None


class IntegrityConfig(_Section):
    """Sealing the ledger into signed Merkle batches (caracald.integrity)."""

    #: Signing keys: ``<data dir>/keys`` when embedded, ``/etc/caracal/keys`` otherwise.
    key_dir: Path | None = None
    #: Events per batch; a batch also closes when its oldest event waited ``batch_max_age_seconds``.
    batch_size: int = Field(default=1000, ge=1, le=1_000_000)
    batch_max_age_seconds: float = Field(default=300, gt=0)
    key_algorithm: Literal["ed25519", "ecdsa-p256"] = "ed25519"

    def resolved_key_dir(self, *, embedded: bool, data_dir: Path) -> Path:
        if self.key_dir is not None:
            return self.key_dir.expanduser()
        return data_dir / "keys" if embedded else Path("/etc/caracal/keys")


class PlatformConfig(_Section):
    """Where the daemons run, for ``caracal services`` and the procedures that stop and start them.

    ``local``: Caracal's own supervisor on this machine (pid files and logs under the data folder, one replica
    per component); ``systemd``: the ``caracal-<component>.service`` units; ``kubernetes``: the
    ``caracal-<component>`` deployments in ``namespace`` (through ``kubectl``, with ``kubectl_context``).
    """

    kind: Literal["local", "systemd", "kubernetes"] = "local"
    namespace: str = "caracal"
    kubectl_context: str | None = None
    #: Longest wait for one ``systemctl`` or ``kubectl`` call.
    command_timeout_seconds: float = Field(default=60, gt=0)
    #: Longest wait for a component to stop or roll out (pods gone, rollout complete).
    wait_timeout_seconds: float = Field(default=300, gt=0)
    #: local: seconds between SIGTERM and SIGKILL when stopping a component.
    stop_timeout_seconds: float = Field(default=30, gt=0)
    #: local: a component's command instead of ``caracald <component>`` (a wrapper script, tests).
    commands: dict[str, list[str]] = Field(default_factory=dict)
    #: Base URLs of the gateway replicas (``http://gw-1:8443``), whose ``/health`` ``caracal status`` reads.
    gateway_urls: list[str] = Field(default_factory=list)


class BackupConfig(_Section):
    """``caracal backup``: where backups live and how long ``backup prune`` keeps them."""

    #: Default: ``<data dir>/backups`` when embedded, ``/var/backups/caracal`` otherwise.
    dir: Path | None = None
    keep_days: int = Field(default=30, ge=1)
    #: Folder holding pg_dump and pg_restore; default: the embedded PostgreSQL's (version 18, which can dump
    #: and restore older servers too).
    pg_bin_dir: Path | None = None
    #: Longest a dump, a restore or a Kafka export or import may take.
    timeout_seconds: float = Field(default=6 * 3600, gt=0)

    def resolved_dir(self, *, embedded: bool, data_dir: Path) -> Path:
        if self.dir is not None:
            return self.dir.expanduser()
        return data_dir.expanduser() / "backups" if embedded else Path("/var/backups/caracal")


class CaracalConfig(_Section):
    database: DatabaseConfig = DatabaseConfig()
    embedded: EmbeddedConfig = EmbeddedConfig()
    kafka: KafkaConfig = KafkaConfig()
    redis: RedisConfig = RedisConfig()
    gateway: GatewayConfig = GatewayConfig()
    budget: BudgetConfig = BudgetConfig()
    bus: BusConfig = BusConfig()
    integrity: IntegrityConfig = IntegrityConfig()
    platform: PlatformConfig = PlatformConfig()
    backup: BackupConfig = BackupConfig()
    #: Where the settings came from (a file path, or "defaults"); shown by ``config show``.
    source: str = Field(default="defaults", exclude=True)

    @property
    def embedded_mode(self) -> bool:
        return self.database.url is None

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, with every secret replaced by a marker."""
        redacted: dict[str, Any] = _redact(self.model_dump(mode="json"))
        return redacted


def _is_secret_field(key: str) -> bool:
    return key in {"url", "read_replica_url", "sasl_password", "api_key"}


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


#: ``x_file`` keys whose file holds the secret ``x`` (other ``*_file`` keys, such as TLS files, are paths).
_SECRET_FILE_KEYS = frozenset({"url_file", "read_replica_url_file", "sasl_password_file", "api_key_file"})


def _resolve_secret_files(node: Any) -> None:
    """Replace ``x_file`` entries, at any depth, by the secret they point to (unless ``x`` is set)."""
    if not isinstance(node, dict):
        return
    for key in [k for k in node if k in _SECRET_FILE_KEYS]:
        target = key.removesuffix("_file")
        path = node.get(key)
        if path and not node.get(target):
            node[target] = _read_secret(Path(path), f"{target} secret")
    for value in node.values():
        _resolve_secret_files(value)


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
