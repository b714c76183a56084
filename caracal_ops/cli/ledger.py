"""``caracal ledger``: what agents spent."""

from __future__ import annotations

from datetime import datetime, time, timedelta

import typer

from caracal_ops.cli.context import state
from caracal_ops.cli.output import FORMAT_OPTION, OutputFormat, emit_block, emit_json
from caracald.admin import ledger as ledger_admin
from caracald.admin.common import now
from caracald.core.agents import parse_uuid
from caracald.core.errors import ValidationError
from caracald.core.money import format_average
from caracald.core.timeparse import parse_timestamp
from caracald.core.windows import WindowSpec, window_bounds

app = typer.Typer(help="Query the spending ledger.", no_args_is_help=True)

#: The smallest step PostgreSQL's timestamps resolve: makes a user's inclusive end time half-open.
_RESOLUTION = timedelta(microseconds=1)


def _range_text(start: datetime, end: datetime) -> str:
    """``2024-01-01 to 2024-01-31`` for whole days, full timestamps otherwise."""
    last = end - _RESOLUTION
    if start.time() == time(0) and last.time() >= time(23, 59, 59):
        return f"{start.date()} to {last.date()}"
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    return f"{start.strftime(fmt)} to {end.strftime(fmt)}"


@app.command("query")
def query(
    ctx: typer.Context,
    agent_id: str = typer.Option(..., "--agent-id"),
    start_time: str | None = typer.Option(None, "--start-time", help="Start (ISO 8601, inclusive)."),
    end_time: str | None = typer.Option(None, "--end-time", help="End (ISO 8601, inclusive; default now)."),
    time_window: str | None = typer.Option(
        None, "--time-window", help="The current hourly, daily, weekly or monthly window instead of a range."
    ),
    window_type: str = typer.Option(
        "calendar", "--window-type", help="calendar or rolling (with --time-window)."
    ),
    timezone: str | None = typer.Option(
        None, "--timezone", help="Time zone of the window (default: the agent's policy's, else UTC)."
    ),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Total spending, event count and average cost for a time range or the current window."""
    agent = parse_uuid(agent_id, what="agent id")
    db = state(ctx).db
    if time_window is not None:
        if start_time or end_time:
            raise ValidationError("give either --time-window or --start-time/--end-time, not both")
        zone = timezone or ledger_admin.default_timezone(db, agent, time_window)
        bounds = window_bounds(WindowSpec(time_window, window_type, zone), now())  # type: ignore[arg-type]
        start, end = bounds.start, bounds.end
    else:
        if start_time is None:
            raise ValidationError("give --start-time (and optionally --end-time), or --time-window")
        start = parse_timestamp(start_time, what="start time")
        end = parse_timestamp(end_time, what="end time") + _RESOLUTION if end_time else now()
        if end <= start:
            raise ValidationError("end time must not be before start time")
    summaries = ledger_admin.spending(db, agent, start, end)
    if fmt is OutputFormat.JSON:
        emit_json(
            [
                {
                    "agent_id": s.agent_id,
                    "start_time": s.start,
                    "end_time": s.end,
                    "currency": s.currency,
                    "total_spending": s.total_money.decimal_string(),
                    "event_count": s.event_count,
                }
                for s in summaries
            ]
        )
        return
    for summary in summaries:
        emit_block(
            "Spending Summary",
            [
                ("Agent ID", summary.agent_id),
                ("Time Range", _range_text(summary.start, summary.end)),
                ("Total Spending", summary.total_money.format()),
                ("Event Count", f"{summary.event_count:,}"),
                ("Average Cost per Event", format_average(summary.total_money, summary.event_count)),
            ],
        )
