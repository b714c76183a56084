"""``caracal snapshot``: point-in-time records of the ledger's totals; list them; restore from one."""

from __future__ import annotations

from typing import Any

import typer

from caracal_ops.cli.budget import _redis_url
from caracal_ops.cli.context import state
from caracal_ops.cli.output import FORMAT_OPTION, OutputFormat, emit_block, emit_json, emit_table, timestamp
from caracal_ops.cli.procedures import DRY_RUN_OPTION, EXECUTE_OPTION, YES_OPTION, run_plan
from caracal_ops.procedures import snapshot as snapshots
from caracal_ops.procedures.backup import human_size
from caracal_ops.procedures.framework import Plan, StepContext

app = typer.Typer(
    help="Ledger snapshots: per-agent daily totals, the last event and the Merkle root at a moment.",
    no_args_is_help=True,
)


def _record(info: snapshots.SnapshotInfo) -> dict[str, Any]:
    return {
        "snapshot_id": info.snapshot_id,
        "timestamp": info.created_at,
        "created_by": info.created_by,
        "total_events": info.total_events,
        "last_event_id": info.last_event_id,
        "merkle_root": info.merkle_root,
        "tree_size": info.tree_size,
        "sha256": info.sha256,
        "size": info.size_bytes,
    }


@app.command("create")
def create(ctx: typer.Context, fmt: OutputFormat = FORMAT_OPTION) -> None:
    """Record the ledger's per-agent, per-currency daily totals, its last event and the latest signed
    Merkle checkpoint (audited)."""
    cli = state(ctx)
    plan = Plan("snapshot.create", "Create a ledger snapshot")

    def take(step: StepContext) -> str:
        info = snapshots.create_snapshot(cli.db, actor=cli.who, directory=snapshots.snapshot_dir(cli.config))
        step.result.update(snapshot_id=info.snapshot_id, sha256=info.sha256, total_events=info.total_events)
        return f"snapshot {info.snapshot_id}: {info.total_events} events up to event {info.last_event_id}"

    plan.add("snapshot", "Read the ledger's totals in one transaction and store them", take)
    report = run_plan(ctx, plan)
    assert report is not None
    info, _ = snapshots.find_snapshot(cli.db, report.result["snapshot_id"])
    if fmt is OutputFormat.JSON:
        emit_json(_record(info))
        return
    emit_block(
        "Snapshot created successfully",
        [
            ("Snapshot ID", info.snapshot_id),
            ("Timestamp", timestamp(info.created_at)),
            ("Total Events", f"{info.total_events:,}"),
            ("Merkle Root", info.merkle_root or "none (no sealed batch yet)"),
            ("Size", human_size(info.size_bytes)),
        ],
    )


@app.command("list")
def list_snapshots(
    ctx: typer.Context,
    limit: int = typer.Option(100, "--limit", min=1, max=100_000, help="At most this many, newest first."),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """List snapshots, newest first."""
    found = snapshots.list_snapshots(state(ctx).db, limit)
    if fmt is OutputFormat.JSON:
        emit_json([_record(i) for i in found])
        return
    emit_table(
        ["snapshot id", "timestamp", "total events", "last event", "merkle root", "size"],
        [
            (
                i.snapshot_id,
                timestamp(i.created_at),
                f"{i.total_events:,}",
                i.last_event_id,
                (i.merkle_root[:18] + "...") if i.merkle_root else "-",
                human_size(i.size_bytes),
            )
            for i in found
        ],
        empty="No snapshots.",
    )


@app.command("restore")
def restore(
    ctx: typer.Context,
    snapshot_id: str = typer.Option(..., "--snapshot-id", help="The snapshot (see caracal snapshot list)."),
    execute_it: bool = EXECUTE_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
) -> None:
    """Check a snapshot (SHA-256) and the ledger against it, then rebuild the spend totals and budget
    counters. On a reset database it first puts back the snapshot's agents, policies, prices and signing
    keys. Prints the plan only, unless --execute or --yes."""
    cli = state(ctx)
    env = snapshots.SnapshotEnv(config=cli.config, db=lambda: cli.db, redis_url=lambda: _redis_url(cli))
    plan = snapshots.plan_restore(env, snapshot_id)
    report = run_plan(ctx, plan, execute_it=execute_it or yes, dry_run=dry_run, yes=yes)
    if report is None:
        return
    for step in report.steps:
        if step.summary:
            typer.echo(step.summary)
    for warning in report.warnings:
        typer.echo(f"Warning: {warning}")
    typer.echo(f"Snapshot {snapshot_id} restored.")
