"""The gateway's write-ahead journal of charges, as a file: what a restarted process finds in it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from caracald.gateway import journal as journal_module
from caracald.gateway.journal import RESOLVE_WITHIN, ChargeJournal, JournalBusyError

KILLED_WRITER = """
import os, signal, sys, uuid
from pathlib import Path
from caracald.gateway.journal import ChargeJournal
journal = ChargeJournal(Path(sys.argv[1]))
settled, expired, done = (uuid.UUID(a) for a in sys.argv[2:5])
journal.intend("settle", settled, '{"event": 1}')
journal.intend("expire", expired)
journal.intend("settle", done, "{}")
journal.resolve("settle", done)
os.kill(os.getpid(), signal.SIGKILL)  # dies without closing anything
"""


def test_unresolved_intents_survive_a_killed_process_and_resolved_ones_do_not(tmp_path: Path) -> None:
    path = tmp_path / "charges.journal"
    settled, expired, done = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(path), str(settled), str(expired), str(done)], check=False
    )
    assert killed.returncode == -signal.SIGKILL
    journal = ChargeJournal(path)
    found = {(i.kind, i.request_id, i.payload) for i in journal.pending()}
    assert found == {("settle", settled, '{"event": 1}'), ("expire", expired, "")}
    assert all(i.written == 0 for i in journal.pending())  # found at start: due at once
    journal.close()


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "charges.journal"
    kept = uuid.uuid4()
    path.write_bytes(f'{{"k":"expire","r":"{kept}"}}\n{{"k":"settle","r":"12'.encode())
    journal = ChargeJournal(path)
    assert [(i.kind, i.request_id) for i in journal.pending()] == [("expire", kept)]
    journal.close()


def test_a_recent_intent_is_not_pending_before_its_grace(tmp_path: Path) -> None:
    journal = ChargeJournal(tmp_path / "charges.journal")
    journal.intend("settle", uuid.uuid4(), "{}")
    assert journal.pending(older_than=30) == []
    assert len(journal.pending()) == 1
    journal.close()


def test_resolving_twice_or_unknown_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "charges.journal"
    journal = ChargeJournal(path)
    request = uuid.uuid4()
    journal.intend("expire", request)
    journal.resolve("expire", request)
    size = path.stat().st_size
    journal.resolve("expire", request)
    journal.resolve("settle", uuid.uuid4())
    assert path.stat().st_size == size
    journal.close()


def test_the_file_is_compacted_to_its_unresolved_intents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "COMPACT_AFTER_LINES", 50)
    path = tmp_path / "charges.journal"
    journal = ChargeJournal(path)
    keep = uuid.uuid4()
    journal.intend("settle", keep, "{}")
    for _ in range(100):
        request = uuid.uuid4()
        journal.intend("expire", request)
        journal.resolve("expire", request)
    assert len(path.read_bytes().splitlines()) < 50
    journal.close()
    assert path.read_bytes().splitlines() == [f'{{"k":"settle","r":"{keep}","p":"{{}}"}}'.encode()]


def test_one_process_owns_a_journal(tmp_path: Path) -> None:
    path = tmp_path / "charges.journal"
    owner = ChargeJournal(path)
    with pytest.raises(JournalBusyError, match=r"give each gateway its own bus\.spool_dir"):
        ChargeJournal(path)
    owner.close()
    ChargeJournal(path).close()  # free again once closed


async def test_resolutions_on_a_running_loop_go_out_with_the_next_intent_or_soon_after(
    tmp_path: Path,
) -> None:
    path = tmp_path / "charges.journal"
    journal = ChargeJournal(path)
    requests = [uuid.uuid4() for _ in range(5)]
    for request in requests:
        journal.intend("expire", request)
    size = path.stat().st_size
    for request in requests[:3]:
        journal.resolve("expire", request)
    await asyncio.sleep(0)
    assert path.stat().st_size == size  # not yet: they wait for an intent to go with
    await asyncio.sleep(RESOLVE_WITHIN * 2)
    lines = path.read_bytes().splitlines()
    assert lines[-3:] == [f'{{"k":"done","of":"expire","r":"{r}"}}'.encode() for r in requests[:3]]
    # a resolution still waiting goes to the file before the next intent, in order
    journal.resolve("expire", requests[3])
    later = uuid.uuid4()
    journal.intend("settle", later, "{}")
    assert path.read_bytes().splitlines()[-2:] == [
        f'{{"k":"done","of":"expire","r":"{requests[3]}"}}'.encode(),
        f'{{"k":"settle","r":"{later}","p":"{{}}"}}'.encode(),
    ]
    journal.close()
    reopened = ChargeJournal(path)
    assert {(i.kind, i.request_id) for i in reopened.pending()} == {
        ("expire", requests[4]),
        ("settle", later),
    }
    reopened.close()
