"""The command palette (``ctrl+p``): every entry is named ``group: action`` ("view: agents",
"agents: suspend agent", "operations: back up now"), so typing the group lists what it can do."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from textual.command import DiscoveryHit, Hit, Hits, Provider


@dataclass(frozen=True, slots=True)
class Entry:
    name: str  # "group: action"
    help: str
    callback: Callable[[], object]


class CaracalCommands(Provider):
    def _entries(self) -> list[Entry]:
        from caracal_tui.app import CaracalApp

        app = self.app
        if not isinstance(app, CaracalApp):
            return []
        return app.palette_entries(self.screen)

    async def discover(self) -> Hits:
        for entry in self._entries():
            yield DiscoveryHit(entry.name, entry.callback, help=entry.help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for entry in self._entries():
            score = matcher.match(entry.name)
            if score > 0:
                yield Hit(
                    score, matcher.highlight(entry.name), entry.callback, text=entry.name, help=entry.help
                )
