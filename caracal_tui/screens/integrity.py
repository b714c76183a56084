"""Integrity: the ledger's sealed Merkle batches; verify one batch or a time range, and see the outcome with
the first bad batch and event when there is one."""

from __future__ import annotations

import uuid
from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Static

from caracal_tui import keymap
from caracal_tui.format import count, parse_when, short_id, stamp, verification_text
from caracal_tui.screens.base import ViewScreen
from caracal_tui.sources import ActionRequest, BatchRow, IntegritySnapshot, NotAvailable, VerificationResult
from caracal_tui.widgets.bars import StatusLine
from caracal_tui.widgets.table import SnapshotTable


def _matches(batch: BatchRow, text: str) -> bool:
    if not text:
        return True
    haystack = f"{batch.batch_id} {batch.key_id} {batch.verification or 'not verified'}".lower()
    return all(part in haystack for part in text.lower().split())


def verification_panel(result: VerificationResult) -> Table:
    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    verdict = (
        Text("✔ PASSED", style="bold green")
        if result.ok
        else Text("✖ FAILED: tampering detected", style="bold white on red")
    )
    table.add_row("Integrity", verdict)
    table.add_row("Verified", result.label)
    checked = f"{count(result.batches_checked)} batches, {count(result.events_checked)} events"
    table.add_row("Checked", f"{checked} in {result.seconds * 1000:.0f} ms")
    table.add_row("Signature", "valid" if result.signatures_valid else Text("INVALID", style="bold red"))
    if result.merkle_root_hex:
        table.add_row("Root", f"0x{result.merkle_root_hex[:32]}…")
    if result.unsealed_events:
        table.add_row("Unsealed", f"{count(result.unsealed_events)} events waiting for their batch")
    if not result.ok:
        table.add_row("First bad batch", str(result.first_bad_batch or "-"))
        table.add_row("First bad event", result.first_bad_event or "-")
        table.add_row("Problem", Text(result.problem or "-", style="red"))
        if result.problems > 1:
            table.add_row("Problems", count(result.problems))
    return table


class IntegrityScreen(ViewScreen):
    VIEW = "integrity"
    SCOPE = "integrity"
    TITLE_TEXT = "Integrity"
    FILTERABLE = True
    BINDINGS: ClassVar = keymap.bindings("integrity")

    DEFAULT_CSS = """
    IntegrityScreen #result {
        height: auto;
        max-height: 12;
        border-top: solid $primary-lighten-1;
        padding: 0 1;
    }
    """

    def __init__(self) -> None:
        super().__init__()
        self.snapshot: IntegritySnapshot | None = None
        self.result: VerificationResult | None = None

    def compose_body(self) -> ComposeResult:
        yield StatusLine("loading…", id="status")
        yield SnapshotTable(id="batches")
        yield Static(
            Text("v verifies the selected batch · g verifies a time range", style="dim"), id="result"
        )

    @property
    def table(self) -> SnapshotTable:
        return self.query_one("#batches", SnapshotTable)

    def setup_columns(self, wide: bool) -> None:
        self.table.set_columns(
            [
                ("batch", "Batch", 38 if wide else 9),
                ("seqs", "Seq", 23 if wide else 15),
                ("events", "Events", 7),
                ("sealed", "Sealed", 11),
                ("key", "Key", 9),
                ("verified", "Verified", 15),
            ]
            + ([("at", "Checked", 11)] if wide else [])
        )

    def redraw(self) -> None:
        if self.snapshot is not None:
            self.show_integrity(self.snapshot)

    def reload(self) -> None:
        self.loader.load("integrity", self.source.integrity)

    def _batches(self) -> tuple[BatchRow, ...]:
        if self.snapshot is None or isinstance(self.snapshot.batches, NotAvailable):
            return ()
        return self.snapshot.batches

    def show_integrity(self, snapshot: IntegritySnapshot) -> None:
        self.snapshot = snapshot
        status = self.query_one("#status", StatusLine)
        if isinstance(snapshot.batches, NotAvailable):
            status.show(Text(f"not available: {snapshot.batches.reason}", style="dim italic"))
            self.table.show_rows([])
            self.mark_updated()
            return
        wide = self.wide
        shown = [b for b in snapshot.batches if _matches(b, self.filter_text)]
        self.table.show_rows(
            [
                (
                    str(b.batch_id),
                    (
                        str(b.batch_id) if wide else short_id(b.batch_id),
                        f"{b.first_seq:,}–{b.last_seq:,}",
                        count(b.event_count),
                        stamp(b.created_at),
                        b.key_id,
                        verification_text(b.verification),
                    )
                    + ((stamp(b.verified_at),) if wide else ()),
                )
                for b in shown
            ]
        )
        text = Text()
        text.append(f"{count(snapshot.total_batches)} batches", style="bold")
        failed = sum(1 for b in snapshot.batches if b.verification == "failed")
        if failed:
            text.append(f" · {failed} FAILED", style="bold red")
        text.append(f" · {count(snapshot.pending_events)} events waiting · key {snapshot.signing_key}")
        status.show(text)
        self.mark_updated()

    def selected(self) -> BatchRow | None:
        key = self.table.selected_key
        return next((b for b in self._batches() if str(b.batch_id) == key), None)

    def action_target(self, action: str) -> tuple[str, str] | None:
        if action != "integrity.verify-batch":
            return None
        batch = self.selected()
        return None if batch is None else (str(batch.batch_id), f"batch {short_id(batch.batch_id)}")

    def run_read_action(self, request: ActionRequest) -> None:
        """Verification reads only: it runs at once, its outcome shows under the list."""
        self.query_one("#result", Static).update(Text("verifying…", style="italic"))
        if request.action == "integrity.verify-batch":
            batch_id = uuid.UUID(request.target)
            self.loader.load("verification", lambda: self.source.verify_batch(batch_id))
            return
        now = self.source.now()
        try:
            start = parse_when(request.param("start"), now, what="start time")
            end = parse_when(request.param("end") or "now", now, what="end time")
        except Exception as exc:
            self.failed_verification(str(exc))
            return
        self.loader.load("verification", lambda: self.source.verify_range(start, end))

    def show_verification(self, result: VerificationResult) -> None:
        self.result = result
        self.query_one("#result", Static).update(verification_panel(result))
        self.reload()  # the live source records each batch's outcome

    def failed_verification(self, error: str) -> None:
        self.query_one("#result", Static).update(Text(f"✖ could not verify: {error}", style="bold red"))

    def apply_filter(self, text: str) -> None:
        if self.snapshot is not None:
            self.show_integrity(self.snapshot)

    def focus_main(self) -> None:
        self.table.focus()
