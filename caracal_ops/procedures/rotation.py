"""Credential rotation: the PostgreSQL role's password and the Kafka SCRAM credentials.

Both follow the same order, so that no failure leaves the daemons with a secret that does not work:

1. a new random password is written to a temporary file beside the secret file (mode 0600);
2. the server is told (``ALTER ROLE ... PASSWORD`` with a SCRAM-SHA-256 verifier computed here, so the
   password itself never reaches the server's logs; ``alter_user_scram_credentials`` for Kafka);
3. the temporary file replaces the secret file (an atomic rename);
4. the running daemons are restarted through the platform, so that they read the new secret.

A failure at 2 removes the temporary file (the old password still works everywhere); a failure at 3 or 4
says where the new password is. The password is never printed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from caracal_ops.platform.base import ComponentState, Platform
from caracal_ops.procedures.audit import DatabaseAuditSink
from caracal_ops.procedures.framework import Plan, StepContext, StepFailed
from caracald.core.errors import CaracalError, ValidationError
from caracald.runtime.config import CaracalConfig

SCRAM_ITERATIONS = 4096
#: Components that hold a Kafka connection.
KAFKA_CLIENTS = ("gateway", "ledger-writer", "metrics-aggregator", "audit-logger")


class RotationError(CaracalError):
    reason = "rotation_failed"


def new_password(length: int = 32) -> str:
    """URL-safe random text (no character needs quoting in a URL or SASLprep)."""
    return secrets.token_urlsafe(length)


def scram_sha256_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> str:
    """PostgreSQL's stored form of a SCRAM-SHA-256 password (what ``rolpassword`` holds)."""
    salt = salt or secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    salt64, stored64, server64 = (base64.b64encode(x).decode() for x in (salt, stored_key, server_key))
    return f"SCRAM-SHA-256${iterations}:{salt64}${stored64}:{server64}"


def verifier_matches(verifier: str, password: str) -> bool:
    """Whether ``password`` is the one a stored SCRAM-SHA-256 verifier was made from."""
    try:
        method, rest = verifier.split("$", 1)
        params, _keys = rest.split("$", 1)
        iterations, salt = params.split(":", 1)
    except ValueError:
        return False
    if method != "SCRAM-SHA-256":
        return False
    again = scram_sha256_verifier(password, salt=base64.b64decode(salt), iterations=int(iterations))
    return hmac.compare_digest(again, verifier)


def _write_private_temp(target: Path, text: str) -> Path:
    """``text`` into a new file beside ``target`` with mode 0600 (synced): the rename to make it live."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = target.with_name(f".{target.name}.rotating-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return tmp


def _install(tmp: Path, target: Path) -> None:
    os.chmod(tmp, 0o600)
    tmp.replace(target)
    try:
        dir_fd = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _restart_running(platform: Platform, components: tuple[str, ...]) -> str:
    """Restart the components that run (a stopped one reads the new secret when it starts)."""
    done, idle = [], []
    for component in platform.components():
        if component not in components:
            continue
        if platform.status(component).state in (ComponentState.RUNNING, ComponentState.STARTING):
            platform.restart(component)
            done.append(component)
        else:
            idle.append(component)
    summary = f"restarted {', '.join(done)}" if done else "no daemon was running"
    if idle:
        summary += f" (not running: {', '.join(idle)}; they read the new secret when they start)"
    return summary


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = (
        f"{quote(unquote(parts.username or ''), safe='')}:{quote(password, safe='')}@{parts.hostname or ''}"
    )
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class FollowingAuditSink:
    """Audit records on a fresh connection each, with the URL of the moment: after the rotation, the new
    password (the old one no longer works)."""

    def __init__(self, url: Callable[[], str], actor: str) -> None:
        self._url = url
        self.actor = actor

    def record(
        self, *, action: str, at: datetime, subject_id: str, reason: str | None, details: dict[str, Any]
    ) -> None:
        DatabaseAuditSink(self._url, self.actor).record(
            action=action, at=at, subject_id=subject_id, reason=reason, details=details
        )


# -- PostgreSQL -------------------------------------------------------------------------------------------


@dataclass
class DbRotation:
    plan: Plan
    #: The database URL to use now (the new password once the rotation ran).
    current_url: Callable[[], str]


def plan_db_rotate_password(
    config: CaracalConfig,
    url: str,
    platform: Callable[[], Platform],
    *,
    role: str | None = None,
    restart: bool = True,
) -> DbRotation:
    """``caracal db rotate-password``: a new random password for the role Caracal connects as."""
    if config.embedded_mode:
        raise RotationError(
            "the embedded PostgreSQL takes local connections without a password: there is none to rotate"
        )
    secret_file = config.database.password_file
    if secret_file is None:
        raise RotationError(
            "database.password_file is not set: the new password would have nowhere to go "
            "(set it, and a database.url without a password)"
        )
    secret_file = secret_file.expanduser()
    user = unquote(urlsplit(url).username or "")
    target_role = role or user
    if not target_role:
        raise ValidationError("the database URL names no user: give --role")
    holder = {"url": url}
    plan = Plan(
        "db.rotate-password",
        f"Rotate the password of PostgreSQL role {target_role}",
        params={"role": target_role, "password_file": secret_file, "restart": restart},
        confirm_word="rotate",
    )

    def generate(step: StepContext) -> str:
        password = new_password()
        step.data["password"] = password
        step.data["tmp"] = _write_private_temp(secret_file, password)
        step.leave("tmp", f"an unused new password is in {step.data['tmp']} (delete it)")
        return f"new password written to {step.data['tmp']} (mode 0600)"

    def alter(step: StepContext) -> str:
        password = step.data["password"]
        try:
            with psycopg.connect(
                url, autocommit=True, connect_timeout=config.database.connect_timeout_seconds
            ) as conn:
                conn.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(target_role), sql.Literal(scram_sha256_verifier(password))
                    )
                )
        except psycopg.Error as exc:
            Path(step.data["tmp"]).unlink(missing_ok=True)
            step.resolve("tmp")
            message = (getattr(exc.diag, "message_primary", None) or str(exc)).strip()
            raise StepFailed(f"ALTER ROLE failed: {message}", state="the old password still works") from None
        if target_role == user:
            holder["url"] = with_password(url, password)
        step.resolve("tmp")
        step.leave(
            "secret",
            f"the role's password changed but {secret_file} still holds the old one: "
            f"the new one is in {step.data['tmp']}; move it there",
        )
        return f"ALTER ROLE {target_role} PASSWORD (SCRAM-SHA-256 verifier)"

    def install(step: StepContext) -> str:
        _install(Path(step.data["tmp"]), secret_file)
        step.resolve("secret")
        step.leave("restart", "the daemons still run with connections made with the old password")
        return f"{secret_file} replaced atomically (mode 0600)"

    def reload(step: StepContext) -> str:
        summary = _restart_running(platform(), KAFKA_CLIENTS)
        step.resolve("restart")
        return summary

    plan.add("generate", f"Generate a random password into a temporary file beside {secret_file}", generate)
    plan.add(
        "alter-role", f"ALTER ROLE {target_role} PASSWORD (a SCRAM-SHA-256 verifier)", alter, destructive=True
    )
    _install_and_reload(plan, config, secret_file, install, reload if restart else None)
    if not restart:
        plan.note("--no-restart: restart the daemons yourself (caracal services restart)")
    plan.note("open sessions keep working; new connections need the new password")
    return DbRotation(plan, lambda: holder["url"])


def _install_and_reload(
    plan: Plan,
    config: CaracalConfig,
    secret_file: Path,
    install: Callable[[StepContext], str],
    reload: Callable[[StepContext], str] | None,
) -> None:
    """The last steps of a password rotation: the secret file replaced, then (unless not wanted) the daemons
    restarted so they read it."""
    plan.add(
        "install",
        f"Replace {secret_file} with the new password (atomic rename, mode 0600)",
        install,
        destructive=True,
    )
    if reload is not None:
        plan.add(
            "reload",
            f"Restart the running daemons on the {config.platform.kind} platform so they use it",
            reload,
            destructive=True,
        )


# -- Kafka ------------------------------------------------------------------------------------------------


def plan_kafka_rotate_credentials(
    config: CaracalConfig,
    platform: Callable[[], Platform],
    *,
    user: str | None = None,
    restart: bool = True,
    admin_factory: Callable[[dict[str, Any]], Any] | None = None,
) -> Plan:
    """``caracal kafka rotate-credentials``: a new SCRAM password for the SASL user Caracal connects as."""
    from caracal_ops import kafka_admin

    kafka = config.kafka
    kafka_admin.client_settings(kafka)  # no Kafka configured: say so
    mechanism = (kafka.sasl_mechanism or "").upper()
    if not mechanism.startswith("SCRAM-"):
        raise RotationError(
            f"Kafka is configured without SASL/SCRAM (security_protocol {kafka.security_protocol}, "
            f"sasl_mechanism {kafka.sasl_mechanism or 'not set'}): there are no credentials to rotate; "
            "enable SCRAM on the brokers and set kafka.sasl_mechanism (SCRAM-SHA-256 or SCRAM-SHA-512) first"
        )
    if not kafka.security_protocol.startswith("SASL_"):
        raise RotationError(
            f"kafka.sasl_mechanism is {mechanism} but security_protocol is {kafka.security_protocol}"
        )
    secret_file = kafka.sasl_password_file
    if secret_file is None:
        raise RotationError("kafka.sasl_password_file is not set: the new password would have nowhere to go")
    secret_file = secret_file.expanduser()
    target_user = user or kafka.sasl_username
    if not target_user:
        raise ValidationError("kafka.sasl_username is not set: give --user")
    plan = Plan(
        "kafka.rotate-credentials",
        f"Rotate the Kafka {mechanism} credentials of {target_user}",
        params={
            "user": target_user,
            "mechanism": mechanism,
            "password_file": secret_file,
            "restart": restart,
        },
        confirm_word="rotate",
    )

    def generate(step: StepContext) -> str:
        password = new_password()
        step.data["password"] = password
        step.data["tmp"] = _write_private_temp(secret_file, password)
        step.leave("tmp", f"an unused new password is in {step.data['tmp']} (delete it)")
        return f"new password written to {step.data['tmp']} (mode 0600)"

    def alter(step: StepContext) -> str:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient
        from confluent_kafka.admin._scram import (
            ScramCredentialInfo,
            ScramMechanism,
            UserScramCredentialUpsertion,
        )

        which = ScramMechanism.SCRAM_SHA_512 if mechanism == "SCRAM-SHA-512" else ScramMechanism.SCRAM_SHA_256
        settings = {**kafka_admin.client_settings(kafka), "log_level": 0}
        admin = (admin_factory or AdminClient)(settings)
        upsert = UserScramCredentialUpsertion(
            target_user, ScramCredentialInfo(which, 8192), step.data["password"].encode()
        )
        try:
            for future in admin.alter_user_scram_credentials([upsert]).values():
                future.result(timeout=30)
        except (KafkaException, Exception) as exc:
            Path(step.data["tmp"]).unlink(missing_ok=True)
            step.resolve("tmp")
            raise StepFailed(
                f"alter_user_scram_credentials failed: {exc}", state="the old password still works"
            ) from None
        step.resolve("tmp")
        step.leave(
            "secret",
            f"the broker has the new password but {secret_file} still holds the old one: "
            f"the new one is in {step.data['tmp']}; move it there",
        )
        return f"{mechanism} credentials of {target_user} replaced on the brokers"

    def install(step: StepContext) -> str:
        _install(Path(step.data["tmp"]), secret_file)
        step.resolve("secret")
        return f"{secret_file} replaced atomically (mode 0600)"

    def reload(step: StepContext) -> str:
        return _restart_running(platform(), KAFKA_CLIENTS)

    plan.add("generate", f"Generate a random password into a temporary file beside {secret_file}", generate)
    plan.add(
        "alter-credentials",
        f"Upsert the {mechanism} credential of {target_user} on the brokers",
        alter,
        destructive=True,
    )
    _install_and_reload(plan, config, secret_file, install, reload if restart else None)
    plan.note("connections already authenticated stay open; new ones need the new password")
    return plan
