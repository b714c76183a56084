"""``caracal backup``: create, list, verify, restore and prune backups of PostgreSQL and Kafka."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import typer

from caracal_ops.cli.context import CliState, state
from caracal_ops.cli.output import FORMAT_OPTION, OutputFormat, emit_block, emit_json, emit_table, timestamp
from caracal_ops.cli.procedures import DRY_RUN_OPTION, EXECUTE_OPTION, YES_OPTION, run_plan
from caracal_ops.cli.services import daemon_env
from caracal_ops.platform import platform_for
from caracal_ops.procedures import backup as backups
from caracal_ops.procedures.backup import BackupEnv, BackupInfo, human_size

app = typer.Typer(
    help="Backups of PostgreSQL (pg_dump) and of the Kafka topics: create, list, verify, restore, prune.",
    no_args_is_help=True,
)

BACKUP_ID = typer.Option(
    ..., "--backup-id", help="The backup's id (see caracal backup list).", show_default=False
)


class BackupType(StrEnum):
    POSTGRESQL = "postgresql"
    KAFKA = "kafka"


def backup_env(cli: CliState) -> BackupEnv:
    return BackupEnv(
        config=cli.config,
        actor=cli.who,
        database_url=lambda: cli.db.url,
        platform=lambda: platform_for(cli.config, env=daemon_env(cli)),
    )


def _record(info: BackupInfo) -> dict[str, Any]:
    manifest = info.manifest
    record: dict[str, Any] = {
        "backup_id": info.backup_id,
        "type": info.type,
        "tag": info.tag,
        "created_at": info.created_at,
        "size": info.size,
        "status": info.status,
        "path": str(info.path),
        "verified_at": info.verified_at,
        "problem": info.problem,
    }
    if manifest is not None:
        record["created_by"] = manifest.created_by
        record["files"] = [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in manifest.files]
        record[manifest.type] = manifest.details
    return record


def _show(info: BackupInfo, title: str, fmt: OutputFormat) -> None:
    if fmt is OutputFormat.JSON:
        emit_json(_record(info))
        return
    manifest = info.manifest
    fields: list[tuple[str, Any]] = [
        ("Backup ID", info.backup_id),
        ("Type", info.type),
        ("Tag", info.tag or "-"),
        ("Created", timestamp(info.created_at)),
        ("Size", human_size(info.size)),
        ("Status", info.status),
        ("Path", info.path),
    ]
    if manifest is not None:
        fields.append(("Created By", manifest.created_by))
        fields += [(f"SHA-256 ({f.name})", f.sha256) for f in manifest.files]
        if manifest.type == "postgresql":
            fields += [
                ("Database", manifest.details.get("database")),
                ("Server Version", f"PostgreSQL {manifest.details.get('server_version')}"),
                ("Schema Version", manifest.details.get("schema_version")),
                ("Tables", len(manifest.details.get("tables", []))),
            ]
        else:
            fields += [
                (f"Topic {t['name']}", f"{t['records']:,} records in {len(t['partitions'])} partitions")
                for t in manifest.details.get("topics", [])
            ]
    emit_block(title, fields)


@app.command("create")
def create(
    ctx: typer.Context,
    kind: BackupType = typer.Option(..., "--type", help="What to back up.", case_sensitive=False),
    tag: str | None = typer.Option(None, "--tag", help="A label, e.g. corruption-evidence."),
    topic: list[str] = typer.Option(
        [],
        "--topic",
        help="Kafka: only these topics (default: caracal.metering.events, caracal.audit.events and "
        "caracal.dlq).",
    ),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Create a backup: pg_dump of the database, or an export of the Kafka topics, plus a manifest."""
    cli = state(ctx)
    env = backup_env(cli)
    plan = backups.plan_create(env, kind=kind.value, tag=tag, topics=topic)
    report = run_plan(ctx, plan)
    assert report is not None
    _show(backups.find_backup(env.directory, report.result["backup_id"]), "Backup created", fmt)


@app.command("list")
def list_backups(
    ctx: typer.Context,
    kind: BackupType | None = typer.Option(None, "--type", help="Only this type.", case_sensitive=False),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """List the backups, newest first."""
    env = backup_env(state(ctx))
    found = backups.list_backups(env.directory, kind=kind.value if kind else None)
    if fmt is OutputFormat.JSON:
        emit_json([_record(b) for b in found])
        return
    emit_table(
        ["backup id", "type", "tag", "created", "size", "status"],
        [
            (b.backup_id, b.type, b.tag or "-", timestamp(b.created_at), human_size(b.size), b.status)
            for b in found
        ],
        empty=f"No backups in {env.directory}. Create one with: caracal backup create --type postgresql",
    )


@app.command("verify")
def verify(ctx: typer.Context, backup_id: str = BACKUP_ID, fmt: OutputFormat = FORMAT_OPTION) -> None:
    """Check a backup's SHA-256 checksums and contents; exits 1 when it is damaged.

    PostgreSQL: pg_restore --list reads the dump. Kafka: a full read of the
    export checks the record count of every partition.
    """
    env = backup_env(state(ctx))
    run_plan(ctx, backups.plan_verify(env, backup_id))
    _show(backups.find_backup(env.directory, backup_id), "Backup verified", fmt)


@app.command("restore")
def restore(
    ctx: typer.Context,
    backup_id: str = BACKUP_ID,
    execute: bool = EXECUTE_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    topic: list[str] = typer.Option([], "--topic", help="Kafka: only these topics of the backup."),
    safety_backup: bool = typer.Option(
        True,
        "--safety-backup/--no-safety-backup",
        help="PostgreSQL: back up the database as it is before replacing it.",
    ),
    new_timestamps: bool = typer.Option(
        False,
        "--new-timestamps",
        help="Kafka: give the records the current time (the original goes in a header), so that the "
        "topic's retention does not delete old records at once.",
    ),
) -> None:
    """Restore a backup (prints the plan unless --execute).

    PostgreSQL: stop the consumers (and, with the PostgreSQL bus, the gateway),
    back up the database as it is, pg_restore --clean --if-exists in one
    transaction, health-check, then start again what was stopped.

    Kafka: produce the records back into their topics and partitions, with
    their keys, headers and timestamps; their offsets are new.
    """
    env = backup_env(state(ctx))
    plan = backups.plan_restore(
        env, backup_id, topics=topic, safety_backup=safety_backup, new_timestamps=new_timestamps
    )
    report = run_plan(ctx, plan, execute_it=execute, dry_run=dry_run, yes=yes)
    if report is None:
        return
    typer.echo(f"Backup {backup_id} restored.")
    if report.result.get("safety_backup"):
        typer.echo(f"The database as it was before is in backup {report.result['safety_backup']}.")


@app.command("prune")
def prune(
    ctx: typer.Context,
    keep_days: int | None = typer.Option(
        None, "--keep-days", min=0, help="Keep backups younger than this (default: backup.keep_days, 30)."
    ),
    kind: BackupType | None = typer.Option(None, "--type", help="Only this type.", case_sensitive=False),
    execute: bool = EXECUTE_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
) -> None:
    """Delete old backups (prints the plan unless --execute).

    The newest complete backup of each type stays, whatever its age.
    """
    env = backup_env(state(ctx))
    plan = backups.plan_prune(env, keep_days=keep_days, kind=kind.value if kind else None)
    report = run_plan(ctx, plan, execute_it=execute, dry_run=dry_run, yes=yes)
    if report is not None:
        deleted = report.result.get("deleted", [])
        typer.echo(f"Deleted {len(deleted)} backup(s).")
