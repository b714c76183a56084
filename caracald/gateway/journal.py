"""The gateway's write-ahead journal of charges: no settlement or expiry is lost to a killed process.

A charge changes two places: the budget counters (Redis) and the ledger (through the bus). A gateway killed
between the two (``kill -9``, the OOM killer, a node lost) would leave the counters charged and the ledger
without the event: the hold shows as open for ever, and the ledger under-counts the spend. So each charge is
written here first, as an *intent*, and marked *resolved* once its event is on the bus:

* ``reserve``: the reservation event of an admitted hold, written before the call goes out (so the call need
  not wait for the bus to acknowledge it);
* ``settle``: the settlement event as it will be sent (its cost is the actual cost);
* ``expire``: the request id of a hold whose time to live ran out, written before the backend's expiry.

At start (and periodically, for intents older than a grace period) the gateway runs every unresolved intent
again (:meth:`caracald.gateway.billing.Billing.recover`): the backend's settlement and expiry are idempotent
by request id and answer what they decided, and the ledger is idempotent by event id, so running an intent a
second time is harmless.

The file is append-only JSON lines (``{"k": "settle", "r": <request id>, "p": <event>}``,
``{"k": "done", "r": ..., "of": "settle"}``) written with one ``write`` each: that survives the death of the
process (the kernel holds the data), not of the machine (no ``fsync``: the bus's own spool is the durable
store of events that could not be sent). An intent is written at once; resolutions made while an event loop
runs wait to go out with the next intent (before it), or at most ``RESOLVE_WITHIN`` seconds: a busy
gateway writes no line of its own for them, and a resolution lost to a kill in between only runs its charge
again, which is harmless. A torn last line is skipped. When the file grows, it is rewritten
with the unresolved intents only. One process owns a journal (an exclusive ``flock`` on ``<file>.lock``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import msgspec

from caracald.core.errors import CaracalError

log = logging.getLogger(__name__)

Kind = Literal["reserve", "settle", "expire"]
KINDS: Final = ("reserve", "settle", "expire")
#: Rewrite the file (unresolved intents only) after this many lines.
COMPACT_AFTER_LINES: Final = 100_000
#: How long resolutions may wait for an intent to go out with.
RESOLVE_WITHIN: Final = 0.05

_encode: Final = msgspec.json.Encoder().encode


def _line(record: dict[str, str]) -> bytes:
    return _encode(record) + b"\n"


class JournalBusyError(CaracalError):
    """Another process owns the journal."""


@dataclass(frozen=True, slots=True)
class Intent:
    kind: Kind
    request_id: uuid.UUID
    payload: str = ""  # the encoded event, for ``reserve`` and ``settle``
    written: float = 0.0  # time.monotonic() when written (0: found in the file at start)


class ChargeJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise JournalBusyError(
                f"{path} is in use by another process: give each gateway its own bus.spool_dir"
            ) from None
        self._pending: dict[tuple[str, uuid.UUID], Intent] = {}
        for intent, resolved in self._read():
            key = (intent.kind, intent.request_id)
            if resolved:
                self._pending.pop(key, None)
            else:
                self._pending[key] = intent
        self._lines = 0
        self._fd = -1
        #: "done" lines not written yet, and whether a write of them is scheduled on the running loop.
        self._resolved: list[bytes] = []
        self._flush_scheduled = False
        self._rewrite()
        if self._pending:
            log.warning("%d charge(s) in %s left unresolved by the last run: replaying them", len(self), path)

    def __len__(self) -> int:
        return len(self._pending)

    # -- writing ------------------------------------------------------------------------------------------

    def intend(self, kind: Kind, request_id: uuid.UUID, payload: str = "") -> None:
        """Write an intent at once (``OSError`` when it cannot be: a full disk, a closed journal)."""
        if self._fd < 0:
            raise OSError(errno.EBADF, f"{self.path} is closed")
        intent = Intent(kind, request_id, payload, time.monotonic())
        self._pending[(kind, request_id)] = intent
        record: dict[str, str] = {"k": kind, "r": str(request_id)}
        if payload:
            record["p"] = payload
        self._write(_line(record))

    def resolve(self, kind: Kind, request_id: uuid.UUID) -> None:
        if self._pending.pop((kind, request_id), None) is None:
            return
        self._resolved.append(_line({"k": "done", "of": kind, "r": str(request_id)}))
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_later(RESOLVE_WITHIN, self.flush)

    def flush(self) -> None:
        """Write the resolutions not written yet."""
        self._flush_scheduled = False
        if self._resolved:
            self._write(b"")
        if self._lines >= COMPACT_AFTER_LINES:
            self._rewrite()

    def _write(self, line: bytes) -> None:
        """Write ``line`` (an intent, or nothing), after the resolutions waiting to be written."""
        if self._fd < 0:  # closed: nothing more is recorded
            return
        lines = [*self._resolved, line] if line else self._resolved
        self._resolved = []
        os.write(self._fd, b"".join(lines))
        self._lines += len(lines)

    # -- reading ------------------------------------------------------------------------------------------

    def pending(self, older_than: float = 0.0) -> list[Intent]:
        """Unresolved intents written at least ``older_than`` seconds ago (all those found at start)."""
        cutoff = time.monotonic() - older_than
        return [intent for intent in self._pending.values() if intent.written <= cutoff]

    def _read(self) -> Iterator[tuple[Intent, bool]]:
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                resolved = record["k"] == "done"
                kind = record["of"] if resolved else record["k"]
                if kind not in KINDS:
                    raise ValueError(f"unknown kind {kind!r}")
                yield Intent(kind, uuid.UUID(record["r"]), record.get("p", "")), resolved
            except (ValueError, KeyError, TypeError) as exc:  # a torn last line, or damage: skip it
                log.warning("%s line %d skipped: %s", self.path, number, exc)

    def _rewrite(self) -> None:
        """The file again, with the unresolved intents only (written to a new file, then renamed over it)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("wb") as out:
            for intent in self._pending.values():
                record = {"k": intent.kind, "r": str(intent.request_id)}
                if intent.payload:
                    record["p"] = intent.payload
                out.write(_line(record))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lines = len(self._pending)
        self._resolved.clear()  # the file now holds only what is unresolved

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                self._rewrite()
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1
