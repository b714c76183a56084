"""Overview: each component's health, the gateway's traffic, consumer lag, dead letters and the ledger's
last Merkle batch; degraded mode and deny-all in the banner above, in red."""

from __future__ import annotations

from datetime import datetime

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Grid
from textual.widgets import Static

from caracal_tui.format import age, ago, badge, count, rate, short_id, stamp, verification_text
from caracal_tui.messages import OverviewUpdated
from caracal_tui.screens.base import ViewScreen
from caracal_tui.sources import DlqSummary, MerkleSummary, NotAvailable, Overview, Traffic
from caracal_tui.widgets.bars import StatusLine


def _not_available(part: NotAvailable) -> Text:
    return Text(f"not available: {part.reason}", style="dim italic")


class Panel(Static):
    DEFAULT_CSS = """
    Panel {
        border: round $primary-lighten-1;
        border-title-style: bold;
        padding: 0 1;
        height: 1fr;
        overflow-y: auto;
    }
    """

    def __init__(self, title: str, *, id: str) -> None:
        super().__init__("loading…", id=id)
        self.border_title = title


class OverviewScreen(ViewScreen):
    VIEW = "overview"
    SCOPE = "overview"
    TITLE_TEXT = "Overview"

    DEFAULT_CSS = """
    OverviewScreen Grid {
        grid-size: 2 2;
        grid-columns: 1fr 36;
        grid-rows: 1fr 1fr;
        height: 1fr;
    }
    """

    def compose_body(self) -> ComposeResult:
        yield StatusLine("loading…", id="status")
        with Grid():
            yield Panel("Components", id="components")
            yield Panel("Gateway", id="traffic")
            yield Panel("Consumer lag", id="lag")
            yield Panel("DLQ · Merkle", id="integrity")

    def reload(self) -> None:
        self.loader.load("overview", self.source.overview)

    def show_overview(self, overview: Overview) -> None:
        now = overview.taken_at
        self.query_one("#status", StatusLine).show(
            Text.assemble((overview.deployment, "bold"), " · ", overview.target)
        )
        self.query_one("#components", Static).update(self._components(overview))
        self.query_one("#traffic", Static).update(self._traffic(overview.traffic))
        self.query_one("#lag", Static).update(self._lag(overview))
        self.query_one("#integrity", Static).update(self._integrity(overview.dlq, overview.merkle, now))
        self.mark_updated()
        self.caracal.post_message(OverviewUpdated(overview))

    def _components(self, overview: Overview) -> RenderableType:
        table = Table.grid(padding=(0, 1), expand=True)
        widths = [
            max((len(badge(c.health)) for c in overview.components), default=4),
            max((len(c.name) for c in overview.components), default=5),
            max((len(c.state) for c in overview.components), default=5),
        ]
        table.add_column(no_wrap=True, width=widths[0])
        table.add_column(no_wrap=True, style="bold", width=widths[1])
        table.add_column(no_wrap=True, width=widths[2])
        table.add_column(overflow="ellipsis", no_wrap=True, ratio=1, style="dim")
        for component in overview.components:
            table.add_row(badge(component.health), component.name, component.state, component.detail)
        return table

    def _traffic(self, traffic: Traffic | NotAvailable) -> RenderableType:
        if isinstance(traffic, NotAvailable):
            return _not_available(traffic)
        table = Table.grid(padding=(0, 1))
        table.add_column(style="bold", no_wrap=True)
        table.add_column(no_wrap=True)
        table.add_row("status", traffic.status)
        table.add_row("requests", rate(traffic.requests_per_s))
        ratio = traffic.deny_ratio
        denials = Text(rate(traffic.denials_per_s))
        if ratio is not None:
            denials.append(f" ({ratio * 100:.0f}%)", style="bold red" if ratio >= 0.2 else "")
        table.add_row("denials", denials)
        table.add_row("holds", "-" if traffic.holds_in_flight is None else count(traffic.holds_in_flight))
        return table

    def _lag(self, overview: Overview) -> RenderableType:
        if isinstance(overview.lag, NotAvailable):
            return _not_available(overview.lag)
        if not overview.lag:
            return Text("no consumer group has committed yet", style="dim")
        table = Table.grid(padding=(0, 1), expand=True)
        table.add_column(no_wrap=True, overflow="ellipsis", ratio=2)
        table.add_column(no_wrap=True, overflow="ellipsis", ratio=2, style="dim")
        table.add_column(no_wrap=True, justify="right")
        for lag in overview.lag:
            style = "bold red" if lag.lag >= 10_000 else ("yellow" if lag.lag >= 1000 else "")
            shown = f"≥{count(lag.lag)}" if lag.capped else count(lag.lag)
            table.add_row(lag.group, lag.topic.removeprefix("caracal."), Text(shown, style=style))
        return table

    def _integrity(
        self, dlq: DlqSummary | NotAvailable, merkle: MerkleSummary | NotAvailable, now: datetime
    ) -> RenderableType:
        table = Table.grid(padding=(0, 1), expand=True)
        table.add_column(style="bold", no_wrap=True, min_width=8)
        table.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
        if isinstance(dlq, NotAvailable):
            table.add_row("DLQ", _not_available(dlq))
        else:
            text = Text(count(dlq.pending), style="bold yellow" if dlq.pending else "green")
            text.append(" pending")
            if dlq.oldest is not None:
                text.append(f" · oldest {age(dlq.oldest, now)}")
            table.add_row("DLQ", text)
        if isinstance(merkle, NotAvailable):
            table.add_row("merkle", _not_available(merkle))
            return table
        latest = merkle.latest
        if latest is None:
            table.add_row("batch", Text("none sealed yet", style="dim"))
        else:
            table.add_row("batch", f"{short_id(latest.batch_id)} · {count(latest.event_count)} events")
            table.add_row("sealed", f"{stamp(latest.created_at)} ({ago(latest.created_at, now)})")
            table.add_row("verified", verification_text(latest.verification))
        waiting = Text(count(merkle.pending_events))
        waiting.append(" events")
        if merkle.oldest_pending is not None:
            waiting.append(f" · oldest {age(merkle.oldest_pending, now)}")
        table.add_row("waiting", waiting)
        table.add_row("batches", count(merkle.batches))
        return table
