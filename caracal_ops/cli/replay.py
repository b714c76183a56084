"""``caracal replay``: read events again from a point in time (after a restore), and follow the progress."""

from __future__ import annotations

import typer

from caracal_ops.cli.context import CliState, state
from caracal_ops.cli.output import FORMAT_OPTION, OutputFormat, emit_json, emit_table, timestamp
from caracal_ops.cli.procedures import DRY_RUN_OPTION, EXECUTE_OPTION, YES_OPTION, run_plan
from caracal_ops.procedures import replay as procedures
from caracald.core.timeparse import parse_timestamp

app = typer.Typer(
    help="Replay events to a consumer group from a timestamp or a snapshot; follow its progress.",
    no_args_is_help=True,
)


def env(cli: CliState) -> procedures.ReplayEnv:
    return procedures.ReplayEnv(config=cli.config, database_url=lambda: cli.db.url, actor=cli.who)


def _offset(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _progress(p: procedures.PartitionProgress) -> str:
    if p.progress is None:
        return "-"
    span = (p.replay_until or 0) - (p.replay_from or 0)
    return f"{p.progress:.0%} ({p.replayed or 0:,} of {span:,})"


@app.command("start")
def start(
    ctx: typer.Context,
    consumer_group: str = typer.Option(..., "--consumer-group", help="The group to rewind."),
    from_timestamp: str | None = typer.Option(
        None, "--from-timestamp", help="Replay what was produced at or after this time (ISO 8601)."
    ),
    from_snapshot: str | None = typer.Option(
        None, "--from-snapshot", help="Replay from a snapshot's time (see caracal snapshot list)."
    ),
    topic: str | None = typer.Option(None, "--topic", help="Topic (default: the group's own)."),
    force: bool = typer.Option(
        False, "--force", help="Even while the group has live members (event log only; Kafka refuses)."
    ),
    execute: bool = EXECUTE_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Move the group's committed offsets back (per partition: committed -> new, events to replay).

    Prints the plan and changes nothing without --execute. Refused while the group has live members
    unless --force. Replaying events already applied changes nothing: the consumers are idempotent.
    """
    at = parse_timestamp(from_timestamp, what="--from-timestamp") if from_timestamp else None
    plan, moves = procedures.plan_start(
        env(state(ctx)),
        group=consumer_group,
        topic=topic,
        from_timestamp=at,
        from_snapshot=from_snapshot,
        force=force,
    )
    if fmt is OutputFormat.JSON:
        emit_json({"plan": plan.as_dict(), "partitions": [m.as_dict() for m in moves], "executed": False})
        if not execute or dry_run:
            return
    else:
        emit_table(
            ["topic", "partition", "committed offset", "new offset", "end offset", "events to replay"],
            [
                (
                    m.topic,
                    m.partition,
                    _offset(m.committed),
                    _offset(m.new),
                    _offset(m.end),
                    f"{m.to_replay:,}",
                )
                for m in moves
            ],
            empty="No partitions.",
        )
        typer.echo("")
        if execute and not dry_run:
            for note in plan.notes:
                typer.echo(f"Note: {note}")
    report = run_plan(ctx, plan, execute_it=execute, dry_run=dry_run, yes=yes)
    if report is not None:
        typer.echo(
            f"Offsets moved: {consumer_group} reads {moves[0].topic if moves else topic} again "
            f"({sum(m.to_replay for m in moves):,} event(s)). Follow it with `caracal replay status "
            f"--consumer-group {consumer_group}`."
        )


@app.command("status")
def status(
    ctx: typer.Context,
    consumer_group: str | None = typer.Option(
        None, "--consumer-group", help="Only this group (default: Caracal's consumer groups)."
    ),
    topic: str | None = typer.Option(None, "--topic", help="Topic (default: the group's own)."),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Per partition: committed offset, end offset, lag, and how far the last replay has come."""
    groups = procedures.status(env(state(ctx)), consumer_group, topic)
    if fmt is OutputFormat.JSON:
        emit_json(
            [
                {
                    "consumer_group": g.group,
                    "topic": g.topic,
                    "lag": g.lag,
                    "progress": None if g.progress is None else round(g.progress, 4),
                    "last_replay": g.last_replay,
                    "partitions": [p.as_dict() for p in g.partitions],
                }
                for g in groups
            ]
        )
        return
    rows = []
    for g in groups:
        for p in g.partitions:
            rows.append(
                (
                    g.group,
                    p.topic,
                    p.partition,
                    _offset(p.committed),
                    _offset(p.end),
                    f"{p.lag:,}",
                    _progress(p),
                )
            )
    emit_table(
        ["group", "topic", "partition", "committed offset", "end offset", "lag", "replay progress"],
        rows,
        empty="No consumer groups.",
    )
    for g in groups:
        if g.last_replay:
            done = g.progress is not None and g.progress >= 1
            typer.echo(
                f"Last replay of {g.group}: from {g.last_replay['from']}, started "
                f"{timestamp(g.last_replay['at'])} by {g.last_replay['by']}; "
                + ("replayed." if done else "in progress.")
            )
