"""Dialogs: help (generated from the keymap), the ``:`` jump prompt, an action's form, its plan with a typed
confirmation, and its run with a progress bar."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.widgets import Input, Label, ProgressBar, Static

from caracal_tui import keymap
from caracal_tui.actions import ActionSpec
from caracal_tui.format import describe
from caracal_tui.messages import ActionDone, ActionProgress
from caracal_tui.sources import ActionPlan, ProgressKind
from caracal_tui.widgets.inputs import TextInput

if TYPE_CHECKING:
    from caracal_tui.app import CaracalApp

_DIALOG_CSS = """
{name} {{
    align: center middle;
    background: $background 60%;
}}
{name} > Vertical {{
    width: 76;
    max-width: 96%;
    height: auto;
    max-height: 96%;
    border: round $primary;
    background: $surface;
    padding: 0 1;
}}
{name} .title {{
    text-style: bold;
    width: 1fr;
    margin-bottom: 1;
}}
{name} .hint {{
    color: $text-muted;
}}
{name} .error {{
    color: $text-error;
    text-style: bold;
}}
"""


def _css(name: str, extra: str = "") -> str:
    return _DIALOG_CSS.format(name=name) + extra


class HelpScreen(ModalScreen[None]):
    """Every key of the current view and the global ones, from :mod:`caracal_tui.keymap`."""

    DEFAULT_CSS = _css("HelpScreen", "HelpScreen VerticalScroll { height: auto; max-height: 18; }")
    BINDINGS: ClassVar = [
        Binding("escape,q,question_mark", "dismiss", "Close", show=False),
    ]

    def __init__(self, scope: str, view_title: str, *, readonly: bool) -> None:
        super().__init__()
        self._scope = scope
        self._title = view_title
        self._readonly = readonly

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"Keys: {self._title}", classes="title")
            with VerticalScroll():
                yield Static(self._table())
            note = "read-only: actions that change something are hidden · " if self._readonly else ""
            yield Label(f"{note}esc closes · ctrl+p: every command", classes="hint")

    def _table(self) -> Table:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True, min_width=8)
        table.add_column()
        table.add_column(style="bold", no_wrap=True, min_width=8)
        table.add_column()
        cells: list[tuple[Text | str, Text | str]] = []
        for section, keys in keymap.help_sections(self._scope, readonly=self._readonly):
            if cells and len(cells) % 2:
                cells.append(("", ""))
            cells.append((Text(section, style="underline"), ""))
            cells.append(("", ""))
            cells.extend(keys)
        if len(cells) % 2:
            cells.append(("", ""))
        for left, right in zip(cells[0::2], cells[1::2], strict=True):
            table.add_row(left[0], left[1], right[0], right[1])
        return table

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(None)


class JumpScreen(ModalScreen[str | None]):
    """``:`` then a view's name (or alias, or digit): ``:agents``, ``:dlq``, ``:2``."""

    DEFAULT_CSS = _css(
        "JumpScreen",
        "JumpScreen { align: center top; } JumpScreen > Vertical { margin-top: 2; width: 60; }",
    )
    BINDINGS: ClassVar = [Binding("escape", "cancel", "Cancel", show=False)]
    AUTO_FOCUS = "#jump"

    def compose(self) -> ComposeResult:
        names = [v.id for v in keymap.VIEWS]
        with Vertical():
            yield TextInput(
                placeholder="view: " + ", ".join(names), suggester=SuggestFromList(names), id="jump"
            )
            listing = "  ".join(f"{v.key} {v.id}" for v in keymap.VIEWS)
            yield Label(listing, classes="hint", id="jump-hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        view = keymap.find_view(event.value)
        if view is None:
            self.query_one("#jump-hint", Label).update(
                Text(
                    f"no view {event.value.strip()!r}: " + ", ".join(v.id for v in keymap.VIEWS),
                    style="bold red",
                )
            )
            return
        self.dismiss(view.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


class FormScreen(ModalScreen[dict[str, str] | None]):
    """The values an action needs (a reason, a new limit); ``enter`` on the last field continues."""

    AUTO_FOCUS = "Input"
    DEFAULT_CSS = _css("FormScreen", "FormScreen Input { margin-bottom: 1; background: $boost; }")
    BINDINGS: ClassVar = [Binding("escape", "cancel", "Cancel", show=False)]

    def __init__(self, spec: ActionSpec, target_label: str, defaults: dict[str, str] | None = None) -> None:
        super().__init__()
        self._spec = spec
        self._target = target_label
        self._defaults = defaults or {}

    def compose(self) -> ComposeResult:
        title = self._spec.title.capitalize() + (f": {self._target}" if self._target else "")
        with Vertical():
            yield Label(title, classes="title")
            yield Label(self._spec.description, classes="hint")
            for field in self._spec.fields:
                yield Label(field.label + (" *" if field.required else ""))
                yield TextInput(
                    value=self._defaults.get(field.name, ""),
                    placeholder=field.placeholder,
                    id=f"field-{field.name}",
                    compact=True,
                )
            yield Label("", classes="error", id="form-error")
            yield Label("enter: next / continue · esc: cancel", classes="hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        inputs = list(self.query(Input))
        index = inputs.index(event.input)
        if index + 1 < len(inputs):
            inputs[index + 1].focus()
            return
        values = {
            field.name: self.query_one(f"#field-{field.name}", Input).value.strip()
            for field in self._spec.fields
        }
        missing = [f.label for f in self._spec.fields if f.required and not values[f.name]]
        if missing:
            self.query_one("#form-error", Label).update(f"required: {', '.join(missing)}")
            return
        self.dismiss(values)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    """An action's plan, step by step, and the word to type to run it."""

    AUTO_FOCUS = "#confirm-word"
    DEFAULT_CSS = _css(
        "ConfirmScreen",
        """
        ConfirmScreen #plan { height: auto; max-height: 14; }
        ConfirmScreen Input { background: $boost; margin: 1 0 0 0; }
        ConfirmScreen > Vertical { border: round $warning; }
        """,
    )
    BINDINGS: ClassVar = [Binding("escape", "cancel", "Cancel", show=False)]

    def __init__(self, plan: ActionPlan) -> None:
        super().__init__()
        self.plan = plan

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"Plan: {self.plan.title}", classes="title")
            with VerticalScroll(id="plan"):
                yield Static(self._steps())
            yield Label(
                Text.assemble("Type ", (self.plan.confirm_word, "bold reverse"), " to run it, esc to cancel:")
            )
            yield TextInput(placeholder="the word, then enter", id="confirm-word", compact=True)
            yield Label("", classes="error", id="confirm-error")

    def _steps(self) -> Text:
        text = Text()
        width = len(str(len(self.plan.steps)))
        for index, step in enumerate(self.plan.steps, 1):
            text.append(f"{index:>{width}}. {step.description}")
            if step.destructive:
                text.append("  [destructive]", style="bold red")
            text.append("\n")
        if not self.plan.steps:
            text.append("(nothing to do)\n")
        for note in self.plan.notes:
            text.append(f"Note: {note}\n", style="italic")
        text.rstrip()
        return text

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.value.strip() == self.plan.confirm_word:
            self.dismiss(True)
            return
        self.query_one("#confirm-error", Label).update(
            f"type exactly '{self.plan.confirm_word}' to run it (or esc to cancel)"
        )

    def action_cancel(self) -> None:
        self.dismiss(False)


class RunScreen(ModalScreen[bool]):
    """Runs a confirmed plan: a progress bar, each step as it starts and ends, then the outcome. A failure is
    shown here, with the state it left; the dashboard stays usable."""

    DEFAULT_CSS = _css(
        "RunScreen",
        """
        RunScreen #log { height: auto; max-height: 12; }
        RunScreen ProgressBar { margin-bottom: 1; }
        RunScreen #outcome { margin-top: 1; }
        """,
    )
    BINDINGS: ClassVar = [Binding("escape,enter", "close", "Close", show=False)]

    def __init__(self, plan: ActionPlan) -> None:
        super().__init__()
        self.plan = plan
        self.finished = False
        self.ok: bool | None = None
        self._lines: list[Text] = []
        self._total = max(len(plan.steps), 1) * 100

    @property
    def caracal(self) -> CaracalApp:
        from caracal_tui.app import CaracalApp

        app = self.app
        assert isinstance(app, CaracalApp)
        return app

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"Running: {self.plan.title}", classes="title", id="run-title")
            yield ProgressBar(total=self._total, show_eta=False, id="progress")
            with VerticalScroll(id="log"):
                yield Static("", id="steps")
            yield Label("working…", id="outcome")

    def on_mount(self) -> None:
        self.run_worker(self._run(), exclusive=True, group="action-run")

    async def _run(self) -> None:
        token = self.plan.token
        source = self.caracal.source

        def progress(event: object) -> None:
            from caracal_tui.sources import Progress

            if isinstance(event, Progress):
                self.post_message(ActionProgress(token, event))

        try:
            result = await asyncio.to_thread(source.run, self.plan, progress)
        except Exception as exc:
            self.post_message(ActionDone(token, self.plan, None, describe(exc)))
        else:
            self.post_message(ActionDone(token, self.plan, result, None))

    def on_action_progress(self, message: ActionProgress) -> None:
        message.stop()
        event = message.progress
        bar = self.query_one(ProgressBar)
        base = (event.step - 1) * 100
        if event.kind is ProgressKind.STARTED:
            self._lines.append(Text(f"▸ {event.step}/{event.total} {event.description}"))
            bar.update(progress=base)
        elif event.kind is ProgressKind.PROGRESS and event.done is not None:
            share = event.done / event.of if event.of else 0.0
            bar.update(progress=base + min(share, 1.0) * 100)
            detail = f" {event.detail}" if event.detail else ""
            of = f" of {event.of:,}" if event.of is not None else ""
            self._lines[-1:] = [
                Text(f"▸ {event.step}/{event.total} {event.description}: {event.done:,}{of}{detail}")
            ]
        elif event.kind is ProgressKind.FINISHED:
            detail = f": {event.detail}" if event.detail else ""
            self._lines[-1:] = [
                Text(f"✔ {event.step}/{event.total} {event.description}{detail}", style="green")
            ]
            bar.update(progress=event.step * 100)
        elif event.kind is ProgressKind.FAILED:
            self._lines[-1:] = [
                Text(f"✖ {event.step}/{event.total} {event.description}: {event.detail}", style="bold red")
            ]
        elif event.kind is ProgressKind.WARNING:
            self._lines.append(Text(f"▲ {event.detail}", style="yellow"))
        self.query_one("#steps", Static).update(Text("\n").join(self._lines))

    def on_action_done(self, message: ActionDone) -> None:
        message.stop()
        self.finished = True
        outcome = self.query_one("#outcome", Label)
        if message.error is None and message.result is not None and message.result.ok:
            self.ok = True
            self.query_one(ProgressBar).update(progress=self._total)
            text = Text.assemble(("✔ done: ", "bold green"), message.result.summary)
            for line in message.result.details:
                text.append(f"\n{line}")
        else:
            self.ok = False
            error = message.error or (message.result.summary if message.result else "failed")
            text = Text.assemble(("✖ FAILED: ", "bold red"), error)
        text.append("\nenter or esc closes", style="dim")
        outcome.update(text)
        self.caracal.action_completed(self.plan, ok=bool(self.ok), error=message.error)

    def action_close(self) -> None:
        if self.finished:
            self.dismiss(bool(self.ok))
        else:
            self.notify("still running: it cannot be interrupted from here", severity="warning")
