"""``caracal dlq``: the dead letter queue -- list, inspect, retry (redrive) and purge.

Dead letters are what a consumer could not apply: undecodable records, events PostgreSQL refuses (an
unknown agent), records that kept failing. They sit in ``dlq_events`` (and on ``caracal.dlq``) until an
operator redrives or purges them. ``--event-id`` takes the dead letter's id (``Event ID`` in ``dlq list``)
or the metering event's id.
"""

from __future__ import annotations

import base64
from enum import StrEnum
from typing import Any

import typer

from caracal_ops.cli.context import CliState, state
from caracal_ops.cli.output import FORMAT_OPTION, OutputFormat, emit_block, emit_json, timestamp
from caracal_ops.cli.procedures import DRY_RUN_OPTION, YES_OPTION, run_plan
from caracal_ops.procedures import dlq as procedures
from caracald.core.timeparse import parse_timestamp
from caracald.store import dlq as dlq_store
from caracald.store.dlq import DeadLetter, DeadLetterStatus

app = typer.Typer(
    help="The dead letter queue: list, inspect, retry and purge failed events.", no_args_is_help=True
)


class StatusFilter(StrEnum):
    PENDING = "pending"
    REDRIVEN = "redriven"
    PURGED = "purged"
    ALL = "all"


EVENT_IDS = typer.Option(
    [],
    "--event-id",
    help="A dead letter's id (see `caracal dlq list`) or a metering event's id; repeat for several.",
    show_default=False,
)


def env(cli: CliState) -> procedures.DlqEnv:
    return procedures.DlqEnv(config=cli.config, database_url=lambda: cli.db.url, actor=cli.who)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _text_or_base64(value: bytes | None) -> dict[str, str] | None:
    if value is None:
        return None
    try:
        return {"text": value.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(value).decode()}


def _shown(value: bytes | None) -> str:
    if value is None:
        return "-"
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(value).decode()


def _record(letter: DeadLetter, *, full: bool = False) -> dict[str, Any]:
    record: dict[str, Any] = {
        "event_id": letter.dlq_id,
        "metering_event_id": letter.event_id,
        "source_topic": letter.source_topic,
        "source_partition": letter.source_partition,
        "source_offset": letter.source_offset,
        "consumer_group": letter.consumer_group,
        "error_type": letter.error_type,
        "error_message": letter.error_message,
        "retry_count": letter.retry_count,
        "failed_at": letter.failed_at,
        "status": letter.status,
        "resolved_at": letter.resolved_at,
        "resolved_by": letter.resolved_by,
    }
    if full:
        record["key"] = _text_or_base64(letter.key)
        record["headers"] = [
            {"name": name, **(_text_or_base64(value) or {})} for name, value in letter.headers
        ]
        record["payload"] = _text_or_base64(letter.payload)
    return record


@app.command("list")
def list_letters(
    ctx: typer.Context,
    start_time: str | None = typer.Option(None, "--start-time", help="Failed at or after (ISO 8601)."),
    end_time: str | None = typer.Option(None, "--end-time", help="Failed before (ISO 8601)."),
    error_type: str | None = typer.Option(None, "--error-type", help="Only this error type."),
    topic: str | None = typer.Option(None, "--topic", help="Only dead letters from this source topic."),
    consumer_group: str | None = typer.Option(
        None, "--consumer-group", help="Only those of this consumer group."
    ),
    status: StatusFilter = typer.Option(StatusFilter.PENDING, "--status", case_sensitive=False),
    limit: int = typer.Option(100, "--limit", min=1, help="Show at most this many (oldest first)."),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Dead letters, oldest first (pending ones unless --status says otherwise)."""
    filters: dict[str, Any] = {
        "status": None if status is StatusFilter.ALL else DeadLetterStatus(status.value),
        "error_type": error_type,
        "since": parse_timestamp(start_time, what="start time") if start_time else None,
        "until": parse_timestamp(end_time, what="end time") if end_time else None,
        "consumer_group": consumer_group,
        "topic": topic,
    }
    with state(ctx).db.read() as conn:
        total = dlq_store.count(conn, **filters)
        letters = dlq_store.list_letters(conn, **filters, limit=limit)
    if fmt is OutputFormat.JSON:
        emit_json({"total": total, "events": [_record(d) for d in letters]})
        return
    typer.echo("Dead Letter Queue Events:")
    typer.echo(f"  Total: {total:,}")
    for letter in letters:
        typer.echo("  ")
        typer.echo(f"  Event ID: {letter.dlq_id}")
        typer.echo(f"  Source Topic: {letter.source_topic}")
        typer.echo(f"  Error Type: {letter.error_type}")
        typer.echo(f"  Error Message: {_one_line(letter.error_message)}")
        typer.echo(f"  Retry Count: {letter.retry_count}")
        typer.echo(f"  Failed At: {timestamp(letter.failed_at)}")
    if total > len(letters):
        typer.echo(f"(showing the oldest {len(letters)} of {total:,}; see --limit and the filters)", err=True)


@app.command("get")
def get(
    ctx: typer.Context,
    event_id: list[str] = typer.Option(
        ..., "--event-id", help="A dead letter's id, or a metering event's id."
    ),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Everything about a dead letter: where it came from, why it failed, its key, headers and payload."""
    letters = procedures.find(env(state(ctx)), event_id)
    if fmt is OutputFormat.JSON:
        records = [_record(d, full=True) for d in letters]
        emit_json(records[0] if len(records) == 1 else records)
        return
    for n, letter in enumerate(letters):
        if n:
            typer.echo("")
        emit_block(
            "Dead Letter Queue Event",
            [
                ("Event ID", letter.dlq_id),
                ("Metering Event ID", letter.event_id or "-"),
                ("Source Topic", letter.source_topic),
                ("Source Partition", letter.source_partition),
                ("Source Offset", letter.source_offset),
                ("Consumer Group", letter.consumer_group),
                ("Error Type", letter.error_type),
                ("Error Message", _one_line(letter.error_message)),
                ("Retry Count", letter.retry_count),
                ("Failed At", timestamp(letter.failed_at)),
                ("Status", letter.status.value),
                ("Resolved At", timestamp(letter.resolved_at)),
                ("Resolved By", letter.resolved_by or "-"),
                ("Key", _shown(letter.key)),
            ],
        )
        typer.echo("  Headers:")
        if not letter.headers:
            typer.echo("    (none)")
        for name, value in letter.headers:
            typer.echo(f"    {name}: {_shown(value)}")
        typer.echo(f"  Payload: {_shown(letter.payload)}")


@app.command("retry")
def retry(
    ctx: typer.Context,
    event_id: list[str] = EVENT_IDS,
    all_pending: bool = typer.Option(False, "--all-pending", help="Every pending dead letter."),
    dry_run: bool = DRY_RUN_OPTION,
) -> None:
    """Redrive dead letters: re-produce each original record to its source topic, then mark it redriven.

    Idempotent: a dead letter already redriven (or purged) is left alone, and the consumers apply a record
    at most once, so redriving one that was applied meanwhile changes nothing.
    """
    plan = procedures.plan_retry(env(state(ctx)), event_ids=event_id, all_pending=all_pending)
    report = run_plan(ctx, plan, dry_run=dry_run)
    if report is not None:
        done = report.result.get("redriven", [])
        typer.echo(
            f"Redriven: {len(done)} dead letter(s)" + (f" ({', '.join(map(str, done))})" if done else "")
        )


@app.command("purge")
def purge(
    ctx: typer.Context,
    event_id: list[str] = EVENT_IDS,
    before: str | None = typer.Option(
        None, "--before", help="Every pending dead letter that failed before this time (ISO 8601)."
    ),
    yes: bool = YES_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
) -> None:
    """Mark dead letters purged (they are kept for the record, never redriven); asks for a typed
    confirmation unless --yes. Audited."""
    cutoff = parse_timestamp(before, what="--before") if before else None
    plan = procedures.plan_purge(env(state(ctx)), event_ids=event_id, before=cutoff)
    report = run_plan(ctx, plan, execute_it=True, dry_run=dry_run, yes=yes)
    if report is not None:
        typer.echo(f"Purged: {len(report.result.get('purged', []))} dead letter(s)")
