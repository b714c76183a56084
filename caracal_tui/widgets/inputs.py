"""The dashboard's text input: Textual's, with the cursor's blinking switched off when the app asks (tests
and screenshots must not depend on the instant the cursor is caught)."""

from __future__ import annotations

from textual.widgets import Input


class TextInput(Input):
    def on_mount(self) -> None:
        if not getattr(self.app, "blink", True):
            self.cursor_blink = False
