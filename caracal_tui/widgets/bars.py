"""The lines around every view: the title bar, the alert banner and the status line."""

from __future__ import annotations

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from caracal_tui.sources import Alert, AlertLevel


class TopBar(Static):
    """``Caracal ▸ Agents and budgets`` on the left; the source, last update and READ-ONLY on the right."""

    DEFAULT_CSS = """
    TopBar {
        dock: top;
        height: 1;
        background: $primary-background;
        color: $text;
    }
    """

    title: reactive[str] = reactive("")
    source: reactive[str] = reactive("")
    updated: reactive[str] = reactive("")
    readonly: reactive[bool] = reactive(False)

    def render(self) -> RenderableType:
        left = Text()
        left.append(" Caracal", style="bold")
        left.append(" ▸ ")
        left.append(self.title, style="bold")
        # the title always shows whole; the source gives way when the terminal is narrow
        grid = Table.grid(expand=True)
        grid.add_column(justify="left", no_wrap=True, min_width=left.cell_len)
        grid.add_column(justify="right", no_wrap=True, overflow="ellipsis", ratio=1)
        right = Text()
        if self.readonly:
            right.append(" READ-ONLY ", style="bold reverse")
            right.append(" ")
        right.append(self.source, style="dim")
        if self.updated:
            right.append(f" · {self.updated} ")
        else:
            right.append(" ")
        grid.add_row(left, right)
        return grid


class AlertBanner(Static):
    """What an operator must not miss (degraded mode, deny-all, a failed verification), on every screen.

    Hidden when there is nothing to say."""

    DEFAULT_CSS = """
    AlertBanner {
        height: auto;
        display: none;
    }
    AlertBanner.-shown {
        display: block;
    }
    """

    def show_alerts(self, alerts: tuple[Alert, ...]) -> None:
        self.set_class(bool(alerts), "-shown")
        text = Text()
        for index, alert in enumerate(alerts):
            if index:
                text.append("\n")
            if alert.level is AlertLevel.CRITICAL:
                text.append(f" ✖ {alert.text} ", style="bold white on red")
            else:
                text.append(f" ▲ {alert.text} ", style="bold black on yellow")
        self.update(text)


class StatusLine(Static):
    """One line under a view's title: counts and totals, or why the last refresh failed."""

    DEFAULT_CSS = """
    StatusLine {
        height: 1;
        padding: 0 1;
    }
    StatusLine.-error {
        color: $text-error;
        text-style: bold;
    }
    """

    def show(self, text: str | Text) -> None:
        self.remove_class("-error")
        self.update(text, layout=False)  # one line whatever it says: no layout of the screen again

    def error(self, message: str) -> None:
        self.add_class("-error")
        self.update(Text(f"✖ {message}"), layout=False)
