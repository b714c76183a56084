"""Emergency procedures: stop and resume writes, preserve evidence, restart everything, rotate everything.

``stop-writes`` turns the gateway's deny-all switch on first -- the ``gateway_switches`` row in PostgreSQL
and, in distributed mode, the Redis key every replica also polls -- so every replica refuses within a second,
then stops the gateway and the ledger writer on the configured platform (Kubernetes remembers the replica
counts, and ``resume-writes`` gives them back). ``resume-writes`` undoes it in reverse order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from caracal_ops.platform.base import CONSUMERS, ComponentState, Platform
from caracal_ops.procedures import status as checks
from caracal_ops.procedures.framework import AuditSink, Plan, StepContext, StepFailed, execute, plain, utcnow
from caracald.core.errors import ValidationError
from caracald.runtime.config import CaracalConfig
from caracald.store.database import Database

#: What stop-writes stops, in order (the gateway first: no new events).
WRITERS = ("gateway", "ledger-writer")
UNDO = "caracal emergency resume-writes"


@dataclass
class EmergencyEnv:
    config: CaracalConfig
    actor: str
    db: Callable[[], Database]
    platform: Callable[[], Platform]
    audit: Callable[[], AuditSink]
    now: Callable[[], datetime] = utcnow
    #: GET a URL (tests); default httpx.
    http_get: Callable[[str], tuple[int, dict[str, Any]]] | None = None
    sleep: Callable[[float], None] = time.sleep
    #: How long to wait for a component's health after a restart.
    health_timeout: float = 60.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def redis_url(self) -> str | None:
        return self.config.redis.url.get_secret_value() if self.config.redis.url is not None else None


def _redis_client(url: str) -> Any:
    from redis import Redis

    return Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)


def _set_redis_switch(url: str, on: bool, reason: str) -> None:
    from caracald.gateway.switches import REDIS_KEY

    client = _redis_client(url)
    try:
        if on:
            client.set(REDIS_KEY, reason or "1")
        else:
            client.delete(REDIS_KEY)
    finally:
        client.close()


def _set_pg_switch(env: EmergencyEnv, on: bool, reason: str) -> None:
    from caracald.store.gateway import DENY_ALL, set_switch

    with env.db().transaction() as conn:
        set_switch(conn, DENY_ALL, on, reason=reason, actor=env.actor, now=env.now())


def _available(platform: Platform, wanted: Sequence[str]) -> tuple[list[str], list[str]]:
    can = platform.components()
    return [c for c in wanted if c in can], [c for c in wanted if c not in can]


def _wait_gateways_deny(env: EmergencyEnv, want: bool, timeout: float = 5.0) -> str:
    urls = env.config.platform.gateway_urls
    if not urls:
        env.sleep(1.0)  # every replica polls the switch at least twice a second
        return "waited 1 s for every replica to poll the switch (no platform.gateway_urls to ask)"
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending:
        for url in list(pending):
            single = env.config.platform.model_copy(update={"gateway_urls": [url]})
            found = checks.check_gateways(env.config.model_copy(update={"platform": single}), env.http_get)[0]
            if found.data.get("deny_all") is want:
                pending.remove(url)
        if pending and time.monotonic() > deadline:
            confirmed = len(urls) - len(pending)
            return f"{confirmed} of {len(urls)} replicas confirm; not yet: {', '.join(pending)}"
        if pending:
            env.sleep(0.1)
    return f"all {len(urls)} replicas report deny_all={'on' if want else 'off'}"


# -- stop-writes / resume-writes --------------------------------------------------------------------------


def plan_stop_writes(env: EmergencyEnv, *, reason: str) -> Plan:
    distributed = env.redis_url is not None
    platform = env.platform()
    chosen, skipped = _available(platform, WRITERS)
    plan = Plan(
        "emergency.stop-writes",
        "Stop every write: deny-all at the gateway, then stop the gateway and the ledger writer",
        params={"reason": reason, "platform": platform.kind, "components": chosen, "redis": distributed},
        confirm_word="stop-writes",
    )
    if skipped:
        plan.note(f"not on the {platform.kind} platform here: {', '.join(skipped)}")
    plan.note(f"undo with: {UNDO}")

    def deny_pg(step: StepContext) -> str:
        _set_pg_switch(env, True, reason)
        step.leave("deny", f"the deny-all switch is ON: `{UNDO}` turns it off")
        return "deny-all switch ON in PostgreSQL (gateway_switches.deny_all)"

    def deny_redis(step: StepContext) -> str:
        assert env.redis_url is not None
        _set_redis_switch(env.redis_url, True, reason)
        return "deny-all switch ON in Redis (caracal:gateway:deny_all)"

    def confirm(step: StepContext) -> str:
        return _wait_gateways_deny(env, True)

    plan.add("deny-all", "Turn the gateway's deny-all switch on in PostgreSQL", deny_pg, destructive=True)
    if distributed:
        plan.add(
            "deny-all-redis",
            "Turn the deny-all switch on in Redis (distributed mode)",
            deny_redis,
            destructive=True,
        )
    plan.add("confirm", "Wait until the gateway replicas deny (they poll the switch every 0.5 s)", confirm)
    stopped: list[str] = []
    for component in chosen:

        def stop(step: StepContext, component: str = component) -> str:
            before = platform.status(component)
            summary = platform.stop(component)
            if before.state in (ComponentState.RUNNING, ComponentState.STARTING, ComponentState.FAILED):
                stopped.append(component)
            step.result["stopped"] = list(stopped)
            step.leave("stopped", f"stopped: {', '.join(stopped) or 'nothing'}; `{UNDO}` starts them again")
            return summary

        plan.add(
            f"stop-{component}",
            f"Stop {component} (scale to 0) on the {platform.kind} platform",
            stop,
            destructive=True,
        )
    return plan


def last_stopped(env: EmergencyEnv) -> list[str] | None:
    """What the last stop-writes stopped, from its audit record (None when there is none)."""
    with env.db().read() as conn:
        row = conn.execute(
            """
            SELECT details FROM audit_log
             WHERE event_type = 'ops_procedure'
               AND action IN ('emergency.stop-writes.finished', 'emergency.stop-writes.failed')
             ORDER BY audit_id DESC LIMIT 1
            """
        ).fetchone()
    if row is None:
        return None
    result = (row["details"] or {}).get("result") or {}
    found = result.get("stopped")
    return [str(c) for c in found] if isinstance(found, list) else None


def plan_resume_writes(env: EmergencyEnv, components: Sequence[str] = ()) -> Plan:
    distributed = env.redis_url is not None
    platform = env.platform()
    if components:
        wanted = list(components)
        source = "as asked"
    else:
        recorded = last_stopped(env)
        wanted = list(recorded) if recorded is not None else list(WRITERS)
        source = "what the last stop-writes stopped" if recorded is not None else "default"
    for name in wanted:
        if name not in WRITERS and name not in CONSUMERS:
            raise ValidationError(f"unknown component {name!r}")
    chosen, _ = _available(platform, [c for c in reversed(WRITERS) if c in wanted])
    plan = Plan(
        "emergency.resume-writes",
        "Resume writes: start the ledger writer and the gateway, then turn deny-all off",
        params={"platform": platform.kind, "components": chosen, "source": source, "redis": distributed},
        confirm_word="resume-writes",
    )
    plan.note(f"components to start: {', '.join(chosen) or 'none'} ({source})")
    for component in chosen:

        def start(step: StepContext, component: str = component) -> str:
            return platform.start(component)

        plan.add(
            f"start-{component}",
            f"Start {component} on the {platform.kind} platform",
            start,
            destructive=True,
        )

    def allow_redis(step: StepContext) -> str:
        assert env.redis_url is not None
        _set_redis_switch(env.redis_url, False, "")
        return "deny-all switch off in Redis"

    def allow_pg(step: StepContext) -> str:
        _set_pg_switch(env, False, "writes resumed")
        return "deny-all switch off in PostgreSQL"

    def confirm(step: StepContext) -> str:
        return _wait_gateways_deny(env, False)

    if distributed:
        plan.add("allow-redis", "Turn the deny-all switch off in Redis", allow_redis, destructive=True)
    plan.add("allow", "Turn the gateway's deny-all switch off in PostgreSQL", allow_pg, destructive=True)
    plan.add("confirm", "Wait until the gateway replicas serve again", confirm)
    return plan


# -- preserve-evidence ------------------------------------------------------------------------------------

_TAG = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_private(path: Path, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(data)


def plan_preserve_evidence(env: EmergencyEnv, *, tag: str, log_lines: int = 10_000) -> Plan:
    from caracal_ops.procedures import backup as backups

    if not _TAG.match(tag):
        raise ValidationError("a tag is 1 to 100 letters, digits, dots, dashes or underscores")
    config = env.config
    base = config.backup.resolved_dir(embedded=config.embedded_mode, data_dir=config.embedded.data_dir)
    stamp = env.now().strftime("%Y%m%dT%H%M%SZ")
    folder = base / "evidence" / f"{stamp}-{tag}"
    kafka = bool(config.kafka.bootstrap_servers)
    benv = backups.BackupEnv(
        config=config, actor=env.actor, database_url=lambda: env.db().url, platform=env.platform, now=env.now
    )
    plan = Plan(
        "emergency.preserve-evidence",
        f"Preserve evidence tagged {tag} in {folder}",
        params={"tag": tag, "folder": folder, "kafka": kafka},
    )
    manifest: dict[str, Any] = {
        "tag": tag,
        "created_by": env.actor,
        "created_at": env.now(),
        "backups": [],
        "logs": [],
        "problems": [],
    }

    def make_folder(step: StepContext) -> str:
        folder.mkdir(parents=True, exist_ok=False, mode=0o700)
        return str(folder)

    def backup(kind: Literal["postgresql", "kafka"]) -> Callable[[StepContext], str]:
        def run(step: StepContext) -> str:
            sub = backups.plan_create(benv, kind=kind, tag=tag)
            report = execute(sub, actor=env.actor, audit=env.audit(), audit_required=False)
            backup_id = report.result["backup_id"]
            manifest["backups"].append(
                {"type": kind, "backup_id": backup_id, "path": str(report.result.get("path"))}
            )
            step.result.setdefault("backups", []).append(backup_id)
            return f"{kind} backup {backup_id}"

        return run

    def logs(step: StepContext) -> str:
        platform = env.platform()
        saved = []
        for component in platform.components():
            try:
                text = platform.logs(component, log_lines)
            except Exception as exc:
                manifest["problems"].append(f"logs of {component}: {exc}")
                continue
            path = folder / f"{component}.log"
            _write_private(path, text)
            manifest["logs"].append({"component": component, "file": path.name})
            saved.append(component)
        return f"logs of {', '.join(saved) or 'no component'} ({platform.kind} platform)"

    def state(step: StepContext) -> str:
        report = checks.collect(config, env.db, env.platform, now=env.now(), http_get=env.http_get)
        _write_private(
            folder / "status.json",
            json.dumps(
                plain({"status": report.status, "checks": [c.__dict__ for c in report.checks]}), indent=2
            ),
        )
        return f"status: {report.status}"

    def seal(step: StepContext) -> str:
        files = sorted(p for p in folder.iterdir() if p.is_file())
        manifest["files"] = [{"name": p.name, "sha256": _sha256(p), "size": p.stat().st_size} for p in files]
        _write_private(folder / "manifest.json", json.dumps(plain(manifest), indent=2, sort_keys=True))
        step.result["folder"] = str(folder)
        return f"manifest.json: {len(files)} files, {len(manifest['backups'])} backups"

    plan.add("folder", f"Create {folder} (mode 0700)", make_folder)
    plan.add(
        "backup-postgresql", "Back up PostgreSQL (pg_dump, tagged)", backup("postgresql"), long_running=True
    )
    if kafka:
        plan.add("backup-kafka", "Export the Kafka topics (tagged)", backup("kafka"), long_running=True)
    else:
        plan.note("no Kafka configured: the events are in PostgreSQL's event log, inside the database backup")
    plan.add("logs", f"Collect the last {log_lines} log lines of every daemon through the platform", logs)
    plan.add("status", "Record the status of every component", state)
    plan.add("manifest", "Write manifest.json with the SHA-256 of every file", seal)
    return plan


# -- restart-all --------------------------------------------------------------------------------


def _wait(env: EmergencyEnv, what: str, probe: Callable[[], checks.Check]) -> str:
    deadline = time.monotonic() + env.health_timeout
    while True:
        found = probe()
        if found.status in (checks.OK, checks.WARNING, checks.SKIPPED):
            return f"{what}: {found.status} ({found.detail})"
        if time.monotonic() > deadline:
            raise StepFailed(
                f"{what} is not healthy after {env.health_timeout:g} s: {found.detail}",
                state="the components after it were not restarted",
            )
        env.sleep(1.0)


def plan_restart_all(env: EmergencyEnv) -> Plan:
    config = env.config
    platform = env.platform()
    daemons = [c for c in ("gateway", *CONSUMERS) if c in platform.components()]
    plan = Plan(
        "emergency.restart-all",
        "Restart in order: database, Kafka, Redis, gateway, consumers; each healthy before the next",
        params={"platform": platform.kind, "components": daemons},
        confirm_word="restart-all",
    )
    plan.note(
        f"PostgreSQL, Kafka and Redis are not managed by the {platform.kind} platform: their health is "
        "checked, not restarted (restart them with their own tooling first if they are down)"
    )

    def guard(name: str, fn: Callable[[], checks.Check]) -> Callable[[], checks.Check]:
        def probe() -> checks.Check:
            try:
                return fn()
            except Exception as exc:
                return checks.Check(
                    name,
                    checks.DOWN,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                )

        return probe

    def database(step: StepContext) -> str:
        return _wait(env, "PostgreSQL", guard("postgresql", lambda: checks.check_postgresql(env.db)))

    def kafka(step: StepContext) -> str:
        return _wait(env, "Kafka", guard("kafka", lambda: checks.check_kafka(config)))

    def redis(step: StepContext) -> str:
        return _wait(env, "Redis", guard("redis", lambda: checks.check_redis(config)))

    plan.add("database", "PostgreSQL: check health (not managed by the platform)", database)
    plan.add(
        "kafka",
        "Kafka: check the brokers" + ("" if config.kafka.bootstrap_servers else " (not configured)"),
        kafka,
    )
    plan.add("redis", "Redis: PING" + ("" if config.redis.url else " (not configured)"), redis)
    for component in daemons:

        def restart(step: StepContext, component: str = component) -> str:
            summary = platform.restart(component)

            def probe() -> checks.Check:
                found = platform.status(component)
                if found.state is not ComponentState.RUNNING:
                    return checks.Check(component, checks.DOWN, f"{found.state} {found.detail}")
                if component == "gateway" and config.platform.gateway_urls:
                    down = [c for c in checks.check_gateways(config, env.http_get) if c.status == checks.DOWN]
                    if down:
                        return checks.Check(
                            component, checks.DOWN, "; ".join(f"{c.component}: {c.detail}" for c in down)
                        )
                return checks.Check(component, checks.OK, found.detail)

            return f"{summary}; " + _wait(env, component, guard(component, probe))

        plan.add(
            f"restart-{component}",
            f"Restart {component}, then wait until it is healthy",
            restart,
            destructive=True,
        )
    return plan


# -- rotate-all --------------------------------------------------------------------------------


@dataclass
class RotateAll:
    plan: Plan
    current_url: Callable[[], str] | None


def plan_rotate_all(env: EmergencyEnv, *, url: str | None, key_dir: Path) -> RotateAll:
    from caracal_ops.procedures import rotation

    config = env.config
    plan = Plan(
        "emergency.rotate-all",
        "Rotate every credential: the database password, the Kafka credentials, the Merkle signing key",
        params={"platform": config.platform.kind, "key_dir": key_dir},
        confirm_word="rotate-all",
    )
    current: Callable[[], str] | None = None

    def merge(prefix: str, sub: Plan) -> None:
        for step in sub.steps:
            plan.add(
                f"{prefix}-{step.key}",
                f"{prefix}: {step.description}",
                step.action,
                destructive=step.destructive,
            )
        plan.notes.extend(f"{prefix}: {n}" for n in sub.notes)

    try:
        if url is None:
            raise rotation.RotationError("the embedded PostgreSQL has no password to rotate")
        db_rotation = rotation.plan_db_rotate_password(config, url, env.platform, restart=False)
    except (rotation.RotationError, ValidationError) as exc:
        plan.note(f"database password skipped: {exc.message}")
    else:
        merge("db", db_rotation.plan)
        current = db_rotation.current_url
    try:
        if not config.kafka.bootstrap_servers:
            raise rotation.RotationError("no Kafka configured")
        kafka_plan = rotation.plan_kafka_rotate_credentials(config, env.platform, restart=False)
    except (rotation.RotationError, ValidationError) as exc:
        plan.note(f"Kafka credentials skipped: {exc.message}")
    else:
        merge("kafka", kafka_plan)

    def merkle(step: StepContext) -> str:
        from caracald.integrity import keys
        from caracald.store.database import Database

        with Database(current() if current else env.db().url) as db:
            new = keys.rotate(db, key_dir, actor=env.actor, reason="emergency rotate-all")
        return f"signing key rotated: new public key {new.public_path}"

    def reload(step: StepContext) -> str:
        return rotation._restart_running(env.platform(), rotation.KAFKA_CLIENTS)

    plan.add(
        "merkle-rotate-keys",
        f"Merkle: rotate the signing key in {key_dir} (caracal merkle rotate-keys)",
        merkle,
        destructive=True,
    )
    plan.add(
        "reload",
        f"Restart the running daemons on the {config.platform.kind} platform",
        reload,
        destructive=True,
    )
    return RotateAll(plan, current)
