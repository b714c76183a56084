"""Backups of the PostgreSQL store and of the Kafka topics: create, list, verify, restore, prune.

Each backup is a folder ``<backup.dir>/<backup id>/`` holding its files and ``manifest.json``: the type,
tag, who made it and when, and each file's SHA-256 and size, plus

* PostgreSQL: ``database.dump`` (``pg_dump --format=custom``), the server and schema versions and the
  tables it holds;
* Kafka: ``<topic>.jsonl`` per topic (see :mod:`caracal_ops.procedures.kafka_export`), and per partition
  the low and high watermarks at the start and the records exported.

A backup is written into ``.<id>.partial`` and renamed when complete, so a folder with a manifest is
always a whole backup. ``verification.json`` keeps the last verification's verdict. Folders and files are
private to the user (0700/0600): a dump holds every agent and credential hash.

Every procedure here returns a :class:`~caracal_ops.procedures.framework.Plan`; restore and prune are
destructive (dry run by default, typed confirmation), create and verify are not.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg.rows import tuple_row

from caracal_ops import kafka_admin
from caracal_ops.platform.base import CONSUMERS, Platform
from caracal_ops.platform.commands import CommandError
from caracal_ops.procedures import kafka_export, pg_tools
from caracal_ops.procedures.framework import Plan, StepContext, StepFailed, plain, utcnow
from caracald import __version__
from caracald.admin.database import health_check
from caracald.core.errors import NotFoundError, ValidationError
from caracald.runtime.config import CaracalConfig
from caracald.store.database import Database
from caracald.store.migrate import latest_version, migrate, schema_version

BackupType = Literal["postgresql", "kafka"]
BACKUP_TYPES: tuple[BackupType, ...] = ("postgresql", "kafka")
MANIFEST = "manifest.json"
VERIFICATION = "verification.json"
DUMP_FILE = "database.dump"
FORMAT_VERSION = 1
_PARTIAL = ".partial"


# -- where and how ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupEnv:
    """What the backup procedures need, resolved lazily (a dry run of a Kafka restore never starts the
    embedded PostgreSQL, a listing never touches a platform)."""

    config: CaracalConfig
    actor: str
    database_url: Callable[[], str]
    platform: Callable[[], Platform]
    now: Callable[[], datetime] = utcnow

    @property
    def directory(self) -> Path:
        return self.config.backup.resolved_dir(
            embedded=self.config.embedded_mode, data_dir=self.config.embedded.data_dir
        )

    @property
    def bin_dir(self) -> Path:
        return pg_tools.bin_dir(self.config.backup.pg_bin_dir)

    @property
    def timeout(self) -> float:
        return self.config.backup.timeout_seconds


# -- manifests ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileEntry:
    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    backup_id: str
    type: BackupType
    created_at: datetime
    completed_at: datetime
    created_by: str
    host: str
    caracal_version: str
    tag: str | None
    files: tuple[FileEntry, ...]
    #: postgresql: server_version, schema_version, database, pg_dump_version, tables;
    #: kafka: topics [{name, partitions [{partition, low, high, records, ...}], replication_factor}], records.
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        body = {
            "format": FORMAT_VERSION,
            "backup_id": self.backup_id,
            "type": self.type,
            "tag": self.tag,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "created_by": self.created_by,
            "host": self.host,
            "caracal_version": self.caracal_version,
            "files": [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in self.files],
            self.type: self.details,
        }
        return json.dumps(plain(body), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str = "manifest") -> Manifest:
        try:
            data = json.loads(text)
            kind = data["type"]
            if kind not in BACKUP_TYPES:
                raise ValueError(f"unknown backup type {kind!r}")
            return cls(
                backup_id=str(data["backup_id"]),
                type=kind,
                created_at=_parse_time(data["created_at"]),
                completed_at=_parse_time(data.get("completed_at") or data["created_at"]),
                created_by=str(data.get("created_by", "")),
                host=str(data.get("host", "")),
                caracal_version=str(data.get("caracal_version", "")),
                tag=data.get("tag"),
                files=tuple(
                    FileEntry(str(f["name"]), str(f["sha256"]), int(f["size"])) for f in data["files"]
                ),
                details=dict(data.get(kind) or {}),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValidationError(f"{where} is not a valid backup manifest: {exc}") from None


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress(size)
    return digest.hexdigest(), size


def new_backup_id(kind: BackupType, at: datetime) -> str:
    return f"{kind}-{at.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# -- the backup folder ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupInfo:
    backup_id: str
    type: str
    tag: str | None
    created_at: datetime
    size: int
    #: complete, verified, verify-failed, damaged (a file missing or of the wrong size) or incomplete
    status: str
    path: Path
    manifest: Manifest | None
    problem: str | None = None
    verified_at: datetime | None = None


def _partial_id(name: str) -> str | None:
    if name.startswith(".") and name.endswith(_PARTIAL):
        return name[1 : -len(_PARTIAL)]
    return None


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)


def read_verification(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((path / VERIFICATION).read_text())
    except (OSError, ValueError):
        return None
    return data


def _info(path: Path) -> BackupInfo | None:
    partial = _partial_id(path.name)
    if partial is not None:
        kind = partial.split("-", 1)[0]
        return BackupInfo(partial, kind, None, _mtime(path), _folder_size(path), "incomplete", path, None)
    if path.name.startswith("."):
        return None
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        kind = path.name.split("-", 1)[0]
        return BackupInfo(
            path.name, kind, None, _mtime(path), _folder_size(path), "incomplete", path, None, "no manifest"
        )
    try:
        manifest = Manifest.from_json(manifest_path.read_text(), where=str(manifest_path))
    except ValidationError as exc:
        return BackupInfo(
            path.name, "?", None, _mtime(path), _folder_size(path), "damaged", path, None, problem=exc.message
        )
    status = "complete"
    problem = None
    for entry in manifest.files:
        file = path / entry.name
        if not file.exists():
            status, problem = "damaged", f"{entry.name} is missing"
            break
        if file.stat().st_size != entry.size:
            status, problem = "damaged", f"{entry.name} is {file.stat().st_size} bytes, not {entry.size}"
            break
    verified_at = None
    if status == "complete" and (verdict := read_verification(path)) is not None:
        verified_at = _parse_time(verdict["verified_at"]) if verdict.get("verified_at") else None
        if verdict.get("ok"):
            status = "verified"
        else:
            status, problem = "verify-failed", verdict.get("error")
    return BackupInfo(
        manifest.backup_id,
        manifest.type,
        manifest.tag,
        manifest.created_at,
        manifest.size,
        status,
        path,
        manifest,
        problem,
        verified_at,
    )


def list_backups(directory: Path, *, kind: str | None = None) -> list[BackupInfo]:
    """Every backup in ``directory`` (incomplete ones too), newest first."""
    if not directory.is_dir():
        return []
    found = [info for child in directory.iterdir() if child.is_dir() and (info := _info(child)) is not None]
    if kind is not None:
        found = [b for b in found if b.type == kind]
    return sorted(found, key=lambda b: (b.created_at, b.backup_id), reverse=True)


def find_backup(directory: Path, backup_id: str) -> BackupInfo:
    path = directory / backup_id
    if "/" in backup_id or backup_id.startswith(".") or not path.is_dir():
        raise NotFoundError(f"backup {backup_id} not found in {directory} (see caracal backup list)")
    info = _info(path)
    if info is None or info.manifest is None:
        raise ValidationError(
            f"backup {backup_id} is {info.status if info else 'unreadable'}"
            + (f" ({info.problem})" if info and info.problem else "")
            + ": it cannot be used"
        )
    return info


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _start_backup(env: BackupEnv, kind: BackupType) -> tuple[str, datetime, Path]:
    created = env.now()
    backup_id = new_backup_id(kind, created)
    work = _private_dir(env.directory) / f".{backup_id}{_PARTIAL}"
    work.mkdir(mode=0o700)
    return backup_id, created, work


def _seal(env: BackupEnv, work: Path, manifest: Manifest) -> Path:
    target = work / MANIFEST
    with open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        handle.write(manifest.to_json())
        handle.flush()
        os.fsync(handle.fileno())
    final = env.directory / manifest.backup_id
    work.rename(final)
    return final


def _write_verdict(path: Path, *, ok: bool, actor: str, error: str | None = None) -> None:
    verdict = {"verified_at": utcnow(), "ok": ok, "by": actor, "error": error}
    (path / VERIFICATION).write_text(json.dumps(plain(verdict), indent=2) + "\n")


def _private_file(path: Path) -> Any:
    return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8")


# -- PostgreSQL dump ----------------------------------------------------------------------------------


def _server_facts(url: str) -> dict[str, Any]:
    with psycopg.connect(url, connect_timeout=10, row_factory=tuple_row) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        tables = conn.execute(
            """
            SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname NOT LIKE 'pg_toast%%'
            """
        ).fetchone()
        return {
            "server_version": str(version[0]) if version else "unknown",
            "schema_version": schema_version(conn),
            "table_count": int(tables[0]) if tables else 0,
        }


def dump_postgresql(
    env: BackupEnv, *, tag: str | None, progress: Callable[[int, int | None, str], None] | None = None
) -> Manifest:
    """pg_dump the configured database into a new backup; returns its manifest."""
    url = env.database_url()
    backup_id, created, work = _start_backup(env, "postgresql")
    try:
        facts = _server_facts(url)
        total = facts["table_count"]
        dumped: list[str] = []

        def on_table(name: str) -> None:
            dumped.append(name)
            if progress is not None:
                progress(len(dumped), max(total, len(dumped)), f"tables (dumping {name})")

        pg_tools.dump(env.bin_dir, url, work / DUMP_FILE, timeout=env.timeout, on_table=on_table)
        os.chmod(work / DUMP_FILE, 0o600)
        if progress is not None:
            progress(len(dumped), len(dumped), "tables dumped; computing the checksum")
        entries = pg_tools.toc(env.bin_dir, work / DUMP_FILE)
        digest, size = sha256_file(work / DUMP_FILE)
        manifest = Manifest(
            backup_id=backup_id,
            type="postgresql",
            created_at=created,
            completed_at=env.now(),
            created_by=env.actor,
            host=socket.gethostname(),
            caracal_version=__version__,
            tag=tag,
            files=(FileEntry(DUMP_FILE, digest, size),),
            details={
                "format": "custom",
                "database": pg_tools.database_name(url),
                "server_version": facts["server_version"],
                "schema_version": facts["schema_version"],
                "pg_dump_version": pg_tools.version(env.bin_dir),
                "tables": sorted(f"{e.schema}.{e.name}" for e in entries if e.kind == "TABLE DATA"),
            },
        )
        _seal(env, work, manifest)
        return manifest
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


# -- create -------------------------------------------------------------------------------------------


def plan_create(
    env: BackupEnv, *, kind: BackupType, tag: str | None = None, topics: Sequence[str] = ()
) -> Plan:
    """``caracal backup create``: a PostgreSQL dump, or an export of Kafka topics."""
    if tag is not None and (not tag.strip() or len(tag) > 200 or "\n" in tag):
        raise ValidationError("a tag is one line of at most 200 characters")
    if kind == "postgresql":
        if topics:
            raise ValidationError("--topic only applies to --type kafka")
        return _plan_create_postgresql(env, tag)
    if kind == "kafka":
        return _plan_create_kafka(env, tag, topics)
    raise ValidationError(f"unknown backup type {kind!r}: use postgresql or kafka")


def _plan_create_postgresql(env: BackupEnv, tag: str | None) -> Plan:
    plan = Plan(
        "backup.create",
        f"Back up the PostgreSQL database to {env.directory}",
        params={"type": "postgresql", "tag": tag, "directory": env.directory},
    )

    def dump(step: StepContext) -> str:
        manifest = dump_postgresql(env, tag=tag, progress=step.progress)
        step.result.update(backup_id=manifest.backup_id, path=env.directory / manifest.backup_id)
        return f"{manifest.backup_id}: {human_size(manifest.size)}, {len(manifest.details['tables'])} tables"

    plan.add(
        "dump",
        "Dump the database with pg_dump --format=custom, then record its SHA-256 in the manifest",
        dump,
        long_running=True,
        on_failure="no backup was written (the partial dump was removed)",
    )
    return plan


def _plan_create_kafka(env: BackupEnv, tag: str | None, topics: Sequence[str]) -> Plan:
    kafka_admin.client_settings(env.config.kafka)  # no Kafka configured: say so before anything runs
    explicit = bool(topics)
    wanted = list(dict.fromkeys(topics)) if topics else list(kafka_admin.CARACAL_TOPICS)
    plan = Plan(
        "backup.create",
        f"Back up the Kafka topics {', '.join(wanted)} to {env.directory}",
        params={"type": "kafka", "tag": tag, "topics": wanted, "directory": env.directory},
    )

    def cleanup(step: StepContext) -> str | None:
        work = step.data.get("work")
        if work is not None and Path(work).exists():
            shutil.rmtree(work, ignore_errors=True)
            return "no backup was written (the partial export was removed)"
        return None

    plan.on_failure(cleanup)

    def layout(step: StepContext) -> str:
        found: dict[str, kafka_admin.TopicInfo] = {}
        for topic in wanted:
            try:
                found[topic] = kafka_admin.describe_topic(env.config.kafka, topic)
            except NotFoundError:
                if explicit:
                    raise
                step.warn(f"topic {topic} does not exist: not backed up")
        if not found:
            raise NotFoundError(f"none of the topics {', '.join(wanted)} exists")
        backup_id, created, work = _start_backup(env, "kafka")
        step.data.update(layout=found, backup_id=backup_id, created=created, work=work, exports={})
        records = sum(info.messages for info in found.values())
        return f"{len(found)} topic(s), at most {records:,} records up to the current high watermarks"

    plan.add(
        "watermarks", "Read the topics' partitions and their high watermarks (the end of the backup)", layout
    )

    for topic in wanted:

        def export(step: StepContext, topic: str = topic) -> str:
            info: kafka_admin.TopicInfo | None = step.data["layout"].get(topic)
            if info is None:
                return "skipped: the topic does not exist"
            ranges = {p.partition: (p.low, p.high) for p in info.partitions}
            total = info.messages
            step.progress(0, total, "records")
            with _private_file(Path(step.data["work"]) / f"{topic}.jsonl") as out:
                try:
                    exported = kafka_export.export_topic(
                        env.config.kafka,
                        topic,
                        ranges,
                        out,
                        progress=lambda n: step.progress(n, total, "records"),
                        deadline=None,
                    )
                except kafka_export.ExportError as exc:
                    raise StepFailed(str(exc)) from None
            step.data["exports"][topic] = (info, exported)
            return f"{exported.records:,} records from {len(ranges)} partition(s)"

        plan.add(
            f"export-{topic}",
            f"Export {topic}: every partition from its start to that watermark, with keys, headers, "
            "offsets and timestamps (no consumer group, no commits)",
            export,
            long_running=True,
        )

    def seal(step: StepContext) -> str:
        work = Path(step.data["work"])
        files = []
        topics_detail = []
        for topic, (info, exported) in step.data["exports"].items():
            name = f"{topic}.jsonl"
            digest, size = sha256_file(work / name)
            files.append(FileEntry(name, digest, size))
            topics_detail.append(
                {
                    "name": topic,
                    "file": name,
                    "replication_factor": info.replication_factor,
                    "config": info.config,
                    "records": exported.records,
                    "partitions": [exported.partitions[p].as_dict() for p in sorted(exported.partitions)],
                }
            )
        manifest = Manifest(
            backup_id=step.data["backup_id"],
            type="kafka",
            created_at=step.data["created"],
            completed_at=env.now(),
            created_by=env.actor,
            host=socket.gethostname(),
            caracal_version=__version__,
            tag=tag,
            files=tuple(files),
            details={
                "bootstrap_servers": env.config.kafka.bootstrap_servers,
                "topics": topics_detail,
                "records": sum(t["records"] for t in topics_detail),
            },
        )
        _seal(env, work, manifest)
        step.data["work"] = None
        step.result.update(backup_id=manifest.backup_id, path=env.directory / manifest.backup_id)
        return f"{manifest.backup_id}: {manifest.details['records']:,} records, {human_size(manifest.size)}"

    plan.add("seal", "Record each export's SHA-256, size and per-partition counts in the manifest", seal)
    return plan


# -- verify -------------------------------------------------------------------------------------------


def check_checksums(path: Path, manifest: Manifest, step: StepContext | None = None) -> str:
    """Every file's size and SHA-256 against the manifest; raises StepFailed naming the first bad one."""
    total = manifest.size
    done = 0
    for entry in manifest.files:
        file = path / entry.name
        if not file.exists():
            raise StepFailed(f"{entry.name} is missing from {path}", state="nothing was changed")
        base = done

        def moved(n: int, base: int = base) -> None:
            if step is not None:
                step.progress(base + n, total, "bytes")

        digest, size = sha256_file(file, moved)
        if size != entry.size:
            raise StepFailed(
                f"{entry.name}: checksum mismatch: it is {size} bytes, the manifest says {entry.size}",
                state="nothing was changed",
            )
        if digest != entry.sha256:
            raise StepFailed(
                f"{entry.name}: SHA-256 checksum mismatch: the file hashes to {digest}, "
                f"the manifest says {entry.sha256}; the backup is corrupt",
                state="nothing was changed",
            )
        done += size
    return f"{len(manifest.files)} file(s), {human_size(total)}: SHA-256 matches the manifest"


def _check_dump_contents(env: BackupEnv, path: Path, manifest: Manifest) -> str:
    try:
        entries = pg_tools.toc(env.bin_dir, path / DUMP_FILE)
    except CommandError as exc:
        raise StepFailed(f"pg_restore --list cannot read {DUMP_FILE}: {exc.message}") from None
    listed = {f"{e.schema}.{e.name}" for e in entries if e.kind == "TABLE DATA"}
    missing = sorted(set(manifest.details.get("tables", [])) - listed)
    if missing:
        raise StepFailed(f"{DUMP_FILE} lacks the data of {', '.join(missing)}")
    return f"pg_restore --list reads {len(entries)} entries, the data of {len(listed)} tables"


def _check_export_contents(path: Path, manifest: Manifest, step: StepContext) -> str:
    expected_total = int(manifest.details.get("records", 0))
    seen_total = 0
    for topic in manifest.details.get("topics", []):
        ranges = {int(p["partition"]): p for p in topic["partitions"]}
        counts = dict.fromkeys(ranges, 0)
        last: dict[int, int] = {}
        for record in kafka_export.read_export(path / topic["file"]):
            where = f"{topic['file']}: partition {record.partition} offset {record.offset}"
            window = ranges.get(record.partition)
            if window is None:
                raise StepFailed(f"{where}: the manifest has no such partition")
            if not window["low"] <= record.offset < window["high"]:
                raise StepFailed(f"{where}: outside the exported range [{window['low']}, {window['high']})")
            if record.offset <= last.get(record.partition, -1):
                raise StepFailed(f"{where}: offsets out of order or repeated")
            last[record.partition] = record.offset
            counts[record.partition] += 1
            seen_total += 1
            if seen_total % 10_000 == 0:
                step.progress(seen_total, expected_total, "records")
        for partition, window in sorted(ranges.items()):
            if counts[partition] != int(window["records"]):
                raise StepFailed(
                    f"{topic['file']}: partition {partition} holds {counts[partition]} records, "
                    f"the manifest says {window['records']}"
                )
    step.progress(seen_total, expected_total, "records")
    return f"{seen_total:,} records read; the count of every partition matches the manifest"


def plan_verify(env: BackupEnv, backup_id: str) -> Plan:
    """``caracal backup verify``: checksums, then the contents (pg_restore --list, or a full read)."""
    info = find_backup(env.directory, backup_id)
    manifest = info.manifest
    assert manifest is not None
    plan = Plan(
        "backup.verify",
        f"Verify {manifest.type} backup {backup_id}",
        params={"backup_id": backup_id, "type": manifest.type},
    )

    def record_failure(step: StepContext) -> str | None:
        _write_verdict(info.path, ok=False, actor=env.actor, error=step.data.get("error", step.step.key))
        return "the backup is marked verify-failed"

    plan.on_failure(record_failure)

    def checksums(step: StepContext) -> str:
        try:
            return check_checksums(info.path, manifest, step)
        except StepFailed as exc:
            step.data["error"] = exc.cause
            raise

    plan.add(
        "checksums",
        "Compare each file's size and SHA-256 checksum with the manifest",
        checksums,
        on_failure="nothing was changed",
    )

    def contents(step: StepContext) -> str:
        try:
            if manifest.type == "postgresql":
                summary = _check_dump_contents(env, info.path, manifest)
            else:
                summary = _check_export_contents(info.path, manifest, step)
        except (StepFailed, ValidationError) as exc:
            step.data["error"] = str(exc)
            raise
        _write_verdict(info.path, ok=True, actor=env.actor)
        step.result.update(backup_id=backup_id, verified=True)
        return summary

    plan.add(
        "contents",
        "Read the dump's table of contents (pg_restore --list)"
        if manifest.type == "postgresql"
        else "Read the whole export and check the record count of every partition",
        contents,
        long_running=manifest.type == "kafka",
    )
    return plan


# -- restore ------------------------------------------------------------------------------------------


def plan_restore(
    env: BackupEnv,
    backup_id: str,
    *,
    topics: Sequence[str] = (),
    safety_backup: bool = True,
    new_timestamps: bool = False,
) -> Plan:
    """``caracal backup restore``: a PostgreSQL dump into the configured database, or Kafka records back
    into their topics."""
    info = find_backup(env.directory, backup_id)
    manifest = info.manifest
    assert manifest is not None
    if manifest.type == "postgresql":
        if topics:
            raise ValidationError("--topic only applies to Kafka backups")
        if new_timestamps:
            raise ValidationError("--new-timestamps only applies to Kafka backups")
        return _plan_restore_postgresql(env, info, manifest, safety_backup=safety_backup)
    return _plan_restore_kafka(env, info, manifest, topics, new_timestamps=new_timestamps)


def _target_facts(url: str) -> tuple[int, set[str]]:
    """(schema version, tables of the public schema) of the database a restore replaces."""
    with psycopg.connect(url, connect_timeout=10, row_factory=tuple_row) as conn:
        rows = conn.execute(
            """
            SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p') AND n.nspname = 'public'
            """
        ).fetchall()
        return schema_version(conn), {str(r[0]) for r in rows}


def _components_to_stop(env: BackupEnv) -> list[str]:
    # with the PostgreSQL bus the gateway writes the ledger itself; with Kafka it only reads, and keeps
    # serving from its cache while the database is replaced
    stop = ["gateway"] if env.config.bus.kind == "postgres" else []
    return stop + list(CONSUMERS)


def _plan_restore_postgresql(
    env: BackupEnv, info: BackupInfo, manifest: Manifest, *, safety_backup: bool
) -> Plan:
    url = env.database_url()
    where = pg_tools.describe_target(url)
    backup_schema = int(manifest.details.get("schema_version", 0))
    latest = latest_version()
    if backup_schema > latest:
        raise ValidationError(
            f"backup {manifest.backup_id} has schema version {backup_schema}, this Caracal knows only "
            f"{latest}: restore it with the Caracal version that made it ({manifest.caracal_version})"
        )
    dump_tables = set(manifest.details.get("tables", []))
    target_schema, target_tables = _target_facts(url)
    # an older backup lacks what later migrations made (tables, functions, triggers): pg_restore --clean
    # drops only what the dump has, so the schema is emptied first and migrated again after the restore
    reset_schema = backup_schema < target_schema
    needs_migration = backup_schema < latest
    extra = sorted(target_tables - dump_tables)
    platform = env.platform()
    wanted = _components_to_stop(env)
    available = [c for c in wanted if c in platform.components()]
    created = f"{manifest.created_at.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
    plan = Plan(
        "backup.restore",
        f"Restore PostgreSQL backup {manifest.backup_id} (created {created}"
        + (f", tag {manifest.tag!r}" if manifest.tag else "")
        + f") into {where}",
        params={
            "backup_id": manifest.backup_id,
            "type": "postgresql",
            "target": where,
            "platform": platform.kind,
            "safety_backup": safety_backup,
            "backup_schema_version": backup_schema,
            "database_schema_version": target_schema,
        },
        confirm_word=pg_tools.database_name(url) or "restore",
    )
    plan.note(f"everything written to {where} since {created} is replaced by the backup's contents")
    if env.config.bus.kind == "kafka":
        plan.note(
            f"ledger events the consumers applied after {created} are not in the backup: replay them from "
            "Kafka from that time once the consumers run again"
        )

    def verify(step: StepContext) -> str:
        summary = check_checksums(info.path, manifest, step)
        _check_dump_contents(env, info.path, manifest)
        return summary

    plan.add(
        "verify",
        "Check the backup's SHA-256 checksum and table of contents",
        verify,
        on_failure="nothing was changed",
    )

    def stop(step: StepContext) -> str:
        stopped: list[str] = []
        step.data["stopped"] = stopped
        for component in available:
            if not platform.status(component).running:
                continue
            platform.stop(component)
            stopped.append(component)
            step.leave(
                "stopped",
                f"{', '.join(stopped)} still stopped: run `caracal services up` to start them again",
            )
        return f"stopped {', '.join(stopped)}" if stopped else "nothing was running"

    plan.add(
        "stop",
        f"Stop {', '.join(wanted)} on the {platform.kind} platform (those running start again at the end)",
        stop,
    )

    if safety_backup:

        def safety(step: StepContext) -> str:
            made = dump_postgresql(env, tag=f"pre-restore:{manifest.backup_id}", progress=step.progress)
            step.data["safety_backup"] = made.backup_id
            step.result["safety_backup"] = made.backup_id
            return f"{made.backup_id} ({human_size(made.size)}): restore it to undo this restore"

        plan.add(
            "safety-backup",
            f"Back up the database as it is now (tag pre-restore:{manifest.backup_id}), "
            "so that this restore can be undone",
            safety,
            long_running=True,
            on_failure="the database is unchanged (the partial safety dump was removed)",
        )

    def undo_hint(step: StepContext) -> str:
        made = step.data.get("safety_backup")
        return f"the database before the restore is in backup {made}" if made else ""

    if reset_schema:

        def reset(step: StepContext) -> str:
            with psycopg.connect(url, connect_timeout=10) as conn, conn.transaction():
                conn.execute("DROP SCHEMA public CASCADE")
                conn.execute("CREATE SCHEMA public")
            step.leave("reset", f"the database is empty ({undo_hint(step) or 'no safety backup was taken'})")
            return "the public schema is empty"

        plan.add(
            "reset-schema",
            f"Empty the database's public schema: it is at schema version {target_schema}, the backup at "
            f"{backup_schema}, and pg_restore --clean drops only what the backup has",
            reset,
            destructive=True,
        )
    elif extra:
        plan.note(f"tables the backup does not have stay as they are: {', '.join(extra)}")

    def restore(step: StepContext) -> str:
        total = len(dump_tables)
        restored: list[str] = []

        def on_table(name: str) -> None:
            restored.append(name)
            step.progress(len(restored), max(total, len(restored)), f"tables (loading {name})")

        step.progress(0, total, "tables")
        try:
            pg_tools.restore(env.bin_dir, url, info.path / DUMP_FILE, timeout=env.timeout, on_table=on_table)
        except CommandError as exc:
            at = f"; it got to {len(restored)} of {total} tables" if restored else ""
            what = "nothing was restored" if reset_schema else "the database is unchanged"
            raise StepFailed(
                f"pg_restore failed: {pg_tools.first_error(exc)}",
                state=f"{what} (the restore runs in one transaction, rolled back{at})",
            ) from None
        if not needs_migration:
            step.audit_log_replaced()  # else once the schema is current again
        step.resolve("reset")
        return f"restored {len(restored)} tables"

    plan.add(
        "restore",
        f"Restore the dump into {where} with pg_restore --clean --if-exists, in one transaction",
        restore,
        destructive=True,
        long_running=True,
    )

    if needs_migration:

        def migrate_up(step: StepContext) -> str:
            report = migrate(url)
            step.audit_log_replaced()
            return f"applied {len(report.applied)} migration(s): schema version {report.current_version}"

        plan.add(
            "migrate",
            f"Apply the schema migrations after the backup's version {backup_schema}, up to {latest}",
            migrate_up,
            on_failure=f"the database holds the backup at schema version {backup_schema}: "
            "run `caracal db migrate`",
        )

    def health(step: StepContext) -> str:
        with Database(url) as db:
            report = health_check(db)
        if not report.healthy:
            raise StepFailed(
                "the restored database is unhealthy: " + "; ".join(report.problems),
                state="the backup was restored",
            )
        return (
            f"healthy: PostgreSQL {report.server_version}, schema version {report.schema_version}, "
            f"{report.latency_ms:.1f} ms"
        )

    plan.add("health-check", "Check the database as `caracal db health-check` does", health)

    def start(step: StepContext) -> str:
        stopped = step.data.get("stopped", [])
        started = []
        for component in stopped:
            platform.start(component)
            started.append(component)
        step.resolve("stopped")
        return f"started {', '.join(started)}" if started else "nothing to start"

    plan.add("start", "Start again what step 2 stopped", start)
    plan.on_failure(lambda step: undo_hint(step) or None)
    return plan


def _plan_restore_kafka(
    env: BackupEnv, info: BackupInfo, manifest: Manifest, topics: Sequence[str], *, new_timestamps: bool
) -> Plan:
    in_backup = {t["name"]: t for t in manifest.details.get("topics", [])}
    chosen = list(dict.fromkeys(topics)) if topics else list(in_backup)
    unknown = [t for t in chosen if t not in in_backup]
    if unknown:
        raise ValidationError(
            f"backup {manifest.backup_id} has no topic {', '.join(unknown)} (it has {', '.join(in_backup)})"
        )
    created = f"{manifest.created_at.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
    plan = Plan(
        "backup.restore",
        f"Restore Kafka backup {manifest.backup_id} (created {created}) into {', '.join(chosen)}",
        params={
            "backup_id": manifest.backup_id,
            "type": "kafka",
            "topics": chosen,
            "new_timestamps": new_timestamps,
        },
        confirm_word="restore",
    )
    plan.note(
        "records get new offsets (after whatever the topics hold); consumer groups' committed offsets are "
        "not in the backup: reset them if the consumers must read the restored records again"
    )
    if new_timestamps:
        plan.note(
            "records get the current time as their timestamp; the original one is in the header "
            f"{kafka_export.ORIGINAL_TIMESTAMP_HEADER}"
        )
    else:
        plan.note(
            "records keep their original timestamps: a topic whose retention is shorter than their age "
            "deletes them at its next retention check (use --new-timestamps to restore old records)"
        )
    missing: list[tuple[str, int, int]] = []
    for name in chosen:
        needed = len(in_backup[name]["partitions"])
        try:
            current = kafka_admin.describe_topic(env.config.kafka, name)
        except NotFoundError:
            missing.append((name, needed, int(in_backup[name].get("replication_factor") or 1)))
            continue
        if len(current.partitions) < needed:
            raise ValidationError(
                f"topic {name} has {len(current.partitions)} partitions, the backup has {needed}: add "
                "partitions first, so that every record goes back to its partition"
            )
        if current.messages:
            plan.note(
                f"topic {name} already holds {current.messages:,} records: the restored records are added "
                "after them (consumers then see both; the ledger's idempotency keys absorb duplicates)"
            )

    def verify(step: StepContext) -> str:
        return check_checksums(info.path, manifest, step)

    plan.add("verify", "Check the export files' SHA-256 checksums", verify, on_failure="nothing was changed")

    if missing:

        def create_topics(step: StepContext) -> str:
            brokers = len(kafka_admin.list_brokers(env.config.kafka))
            for name, partitions, replication in missing:
                kafka_admin.create_topics(
                    env.config.kafka,
                    names=(name,),
                    partitions=partitions,
                    replication_factor=max(1, min(replication, brokers)),
                )
            return f"created {', '.join(m[0] for m in missing)}"

        plan.add(
            "create-topics",
            "Create the missing topics "
            + ", ".join(f"{name} ({partitions} partitions)" for name, partitions, _ in missing),
            create_topics,
        )

    for name in chosen:
        topic = in_backup[name]
        count = int(topic.get("records", 0))

        def produce(
            step: StepContext, name: str = name, topic: dict[str, Any] = topic, count: int = count
        ) -> str:
            step.progress(0, count, "records")
            delivery = kafka_export.produce_records(
                env.config.kafka,
                name,
                kafka_export.read_export(info.path / topic["file"]),
                progress=lambda n: step.progress(n, count, "records"),
                new_timestamps=new_timestamps,
            )
            if delivery.failed:
                raise StepFailed(
                    f"{delivery.failed} record(s) not acknowledged ({delivery.first_error})",
                    state=f"{delivery.delivered:,} of {count:,} records were produced into {name}; running "
                    "the restore again produces all of them again",
                )
            step.result.setdefault("produced", {})[name] = delivery.delivered
            return f"produced {delivery.delivered:,} records into {name}"

        plan.add(
            f"produce-{name}",
            f"Produce the {count:,} records of {name} back into it: same partitions, keys, headers"
            + (", new timestamps" if new_timestamps else " and timestamps")
            + "; new offsets",
            produce,
            destructive=True,
            long_running=True,
        )
    return plan


# -- prune --------------------------------------------------------------------------------------------


def plan_prune(
    env: BackupEnv,
    *,
    keep_days: int | None = None,
    kind: str | None = None,
    keep_latest: bool = True,
) -> Plan:
    """``caracal backup prune``: delete the backups older than ``keep_days`` (default ``backup.keep_days``).

    The newest complete backup of each type is kept whatever its age (``keep_latest``), so a stalled
    backup timer never leaves zero backups; incomplete leftovers of failed runs go once they are old.
    """
    days = keep_days if keep_days is not None else env.config.backup.keep_days
    if days < 0:
        raise ValidationError("--keep-days must be 0 or more")
    cutoff = env.now() - timedelta(days=days)
    backups = list_backups(env.directory, kind=kind)
    protected: set[str] = set()
    if keep_latest:
        for backup_type in BACKUP_TYPES:
            whole = [b for b in backups if b.type == backup_type and b.status in ("complete", "verified")]
            if whole:
                protected.add(whole[0].backup_id)
    doomed = [b for b in reversed(backups) if b.created_at < cutoff and b.backup_id not in protected]
    plan = Plan(
        "backup.prune",
        f"Delete the backups in {env.directory} older than {days} days "
        f"(created before {cutoff.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ})",
        params={"keep_days": days, "type": kind, "directory": env.directory},
    )
    for backup_id in sorted(protected):
        kept = next(b for b in backups if b.backup_id == backup_id)
        if kept.created_at < cutoff:
            plan.note(
                f"{backup_id} is older but kept: the newest complete {kept.type} backup is never pruned"
            )

    for backup in doomed:

        def delete(step: StepContext, backup: BackupInfo = backup) -> str:
            shutil.rmtree(backup.path)
            step.result.setdefault("deleted", []).append(backup.backup_id)
            return f"deleted {backup.path}"

        plan.add(
            f"delete-{backup.backup_id}",
            f"Delete {backup.backup_id} ({backup.status}, created "
            f"{backup.created_at.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}, {human_size(backup.size)}"
            + (f", tag {backup.tag!r}" if backup.tag else "")
            + ")",
            delete,
            destructive=True,
        )
    return plan
