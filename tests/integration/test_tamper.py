"""Tampering with a sealed ledger, every way the runbook fears, and ``caracal merkle verify-range`` naming
the batch and the event each time.

One sealed ledger (2,500 events in batches of 1,000, 1,000 and 500) is built once per module as a template
database; each test gets its own copy, tampers with it as a superuser would (``session_replication_role =
replica`` switches the guard triggers off), and runs the CLI.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from caracald.core.audit import AuditEventType
from caracald.core.ledger import LedgerEvent, LedgerEventType
from caracald.core.money import Money
from caracald.core.signing import Checkpoint, generate_key, sign_checkpoint
from caracald.integrity import encoding, helper_sessions, keys, sealer, verifier
from caracald.store import ledger as ledger_store
from caracald.store.database import Database
from tests.clitools import block
from tests.harness.postgres import PostgresService
from tests.integration.conftest import Cli

START = datetime(2024, 1, 1, tzinfo=UTC)
EVENTS = 2500
TARGET_SEQ = 1500  # in the second batch


@dataclass(frozen=True)
class Sealed:
    template: str
    key_dir: Path
    batch_ids: list[uuid.UUID]
    agents: list[uuid.UUID]
    #: Each batch's time span (its first and last event's ``occurred_at``): the period an operator verifies.
    periods: list[tuple[datetime, datetime]]


def make_events(agents: list[uuid.UUID], count: int, start: datetime = START) -> list[LedgerEvent]:
    kinds = list(LedgerEventType)
    out = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        currency = ("USD", "EUR", "JPY", "BHD")[i % 4]
        out.append(
            LedgerEvent(
                idempotency_key=uuid.uuid4(),
                event_type=kind,
                agent_id=agents[i % len(agents)],
                occurred_at=start + timedelta(seconds=i, microseconds=i % 997),
                cost=Money(Decimal(i % 1000) / Decimal(7000), currency),
                resource=f"https://api.example.com/v1/chat/{i}?q=ü",
                request_id=uuid.uuid4() if i % 3 else None,
                model="gpt-4o" if i % 2 else None,
                input_tokens=i * 3 if i % 2 else None,
                output_tokens=i * 2 if i % 2 else None,
                cached_input_tokens=i if i % 5 == 0 else None,
                metadata={"i": i, "tags": ["a", "é"], "hold": "0.05", "ratio": 1.5} if i % 2 else {},
            )
        )
    return out


def new_agent(conn: Any, name: str) -> uuid.UUID:
    agent = uuid.uuid4()
    now = datetime.now(UTC)
    conn.execute(
        "INSERT INTO agents (agent_id, name, owner, status, created_at, updated_at)"
        " VALUES (%s, %s, 'owner@example.com', 'active', %s, %s)",
        (agent, f"{name}-{agent.hex[:6]}", now, now),
    )
    return agent


@pytest.fixture(scope="module")
def sealed(
    postgres_service: PostgresService, migrated_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sealed]:
    name = f"sealed_{uuid.uuid4().hex[:12]}"
    url = postgres_service.create_database(name, template=migrated_template)
    key_dir = tmp_path_factory.mktemp("merkle") / "keys"
    with Database(url) as db:
        keys.generate(db, key_dir, actor="tester", at=datetime.now(UTC))
        with db.transaction() as conn:
            agents = [new_agent(conn, "agent"), new_agent(conn, "agent")]
            ledger_store.insert_events(conn, make_events(agents, EVENTS))
        key = keys.load_signing_key(key_dir)
        with db.transaction() as conn:
            result = sealer.seal_pending(conn, key, max_age=timedelta(0))
    assert [b.event_count for b in result.batches] == [1000, 1000, 500]
    with psycopg.connect(url) as conn:
        periods = conn.execute(
            "SELECT min_occurred_at, max_occurred_at FROM merkle_batches ORDER BY first_seq"
        ).fetchall()
    yield Sealed(name, key_dir, [b.batch_id for b in result.batches], agents, [(a, b) for a, b in periods])
    postgres_service.drop_database(name)


@dataclass
class Ledger:
    url: str
    cli: Cli
    sealed: Sealed
    #: Whether verifications read the rows through helper sessions, one batch per statement.
    helpers: bool = False

    def sql(self, statement: str, params: Any = None) -> list[dict[str, Any]]:
        """Run SQL as a superuser with the guard triggers switched off (a tamperer's session)."""
        with psycopg.connect(self.url, autocommit=True, row_factory=dict_row) as conn:
            conn.execute("SET session_replication_role = replica")
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def event_at(self, seq: int) -> int:
        return int(self.sql("SELECT event_id FROM ledger_events WHERE seq = %s", (seq,))[0]["event_id"])

    def verify_range(self, *extra: str) -> tuple[int, dict[str, str], str]:
        result = self.cli(
            "merkle", "verify-range", "--start-time", "2024-01-01T00:00:00Z", "--end-time", "now", *extra
        )
        return result.exit_code, block(result.stdout), result.stdout + result.stderr

    def verify_period(self, index: int) -> tuple[int, dict[str, str], str]:
        """``verify-range`` over the time span batch ``index`` had before any tampering."""
        start, end = self.sealed.periods[index]
        result = self.cli(
            "merkle", "verify-range", "--start-time", start.isoformat(), "--end-time", end.isoformat()
        )
        return result.exit_code, block(result.stdout), result.stdout + result.stderr

    @property
    def batches(self) -> list[uuid.UUID]:
        return self.sealed.batch_ids


@pytest.fixture(params=["one-session", "helper-sessions"])
def ledger(
    postgres_service: PostgresService,
    sealed: Sealed,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Ledger]:
    """A fresh copy of the sealed ledger. Every tampering is looked for twice: with the rows read on the
    verifier's own connection, and read by helper sessions a batch per statement (as a ledger of 100,000
    events or more is)."""
    if request.param == "helper-sessions":
        monkeypatch.setattr(verifier, "HELPERS_FROM_EVENTS", 0)
        monkeypatch.setattr(verifier, "HELPER_CHUNK_EVENTS", 1)
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = postgres_service.create_database(name, template=sealed.template)
    cli = Cli(url, env={"CARACAL__INTEGRITY__KEY_DIR": str(sealed.key_dir)})
    yield Ledger(url, cli, sealed, helpers=request.param == "helper-sessions")
    postgres_service.drop_database(name)


def assert_detected(
    ledger: Ledger, batch: uuid.UUID | None, event: int | str | None, *words: str
) -> dict[str, str]:
    code, fields, text = ledger.verify_range()
    assert code == 1, text
    assert fields["Integrity"] == "FAILED", text
    assert fields["Tamper Detected"] == "Yes", text
    if batch is not None:
        assert fields["First Bad Batch"] == str(batch), text
    if event is not None:
        assert str(event) in fields["First Bad Event"], text
    for word in words:
        assert word in fields["Problem"], text
    return fields


def assert_failed(outcome: tuple[int, dict[str, str], str], *words: str) -> dict[str, str]:
    """A ``verify-*`` outcome (exit code, fields, text): FAILED, its problem naming ``words``."""
    code, fields, text = outcome
    assert code == 1, text
    assert fields["Integrity"] == "FAILED", text
    assert fields["Tamper Detected"] == "Yes", text
    for word in words:
        assert word in fields["Problem"], text
    return fields


# --------------------------------------------------------------------------- intact


def test_intact_ledger_verifies(ledger: Ledger) -> None:
    code, fields, text = ledger.verify_range()
    assert code == 0, text
    assert text.startswith("Verification Result:")
    assert fields["Integrity"] == "PASSED"
    assert fields["Tamper Detected"] == "No"
    assert fields["Signature"] == "Valid"
    assert fields["Event Count"] == "2,500"
    assert fields["Batches Checked"] == "3"
    assert fields["Merkle Root"].startswith("0x") and len(fields["Merkle Root"]) == 66


@pytest.fixture
def row_by_row(monkeypatch: pytest.MonkeyPatch) -> list[uuid.UUID]:
    """The batches sent to the row-by-row check (those whose packed rows did not pass), in order."""
    sent: list[uuid.UUID] = []
    check_batch = verifier._Walk.check_batch

    def spy(walk: Any, batch: Any, *args: Any) -> Any:
        sent.append(batch.batch_id)
        return check_batch(walk, batch, *args)

    monkeypatch.setattr(verifier._Walk, "check_batch", spy)
    return sent


def test_an_intact_ledger_is_verified_from_its_packed_rows(
    ledger: Ledger, row_by_row: list[uuid.UUID]
) -> None:
    """Intact batches pass on their packed rows alone; anything wrong sends them to the row-by-row check,
    which names the event."""
    trusted = [keys.load_signing_key(ledger.sealed.key_dir).public()]
    with psycopg.connect(ledger.url) as conn:
        report = verifier.verify_all(conn, trusted)
    assert report.ok, report.first_problem
    assert report.events_checked == EVENTS
    assert row_by_row == []

    event = ledger.event_at(TARGET_SEQ)
    ledger.sql("UPDATE ledger_events SET input_tokens = input_tokens + 1 WHERE event_id = %s", (event,))
    with psycopg.connect(ledger.url) as conn:
        report = verifier.verify_all(conn, trusted)
    first = report.first_problem
    assert first is not None and first.kind == "column_mismatch" and first.event_id == event
    # the statement that held it: one batch per statement on helpers, all three on one session
    assert row_by_row == ([ledger.batches[TARGET_SEQ // 1000]] if ledger.helpers else ledger.batches)


def test_guard_triggers_refuse_changes_to_sealed_rows(ledger: Ledger) -> None:
    with psycopg.connect(ledger.url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.IntegrityConstraintViolation, match="sealed"):
            conn.execute("UPDATE ledger_events SET cost = cost + 1 WHERE seq = %s", (TARGET_SEQ,))
        with pytest.raises(psycopg.errors.IntegrityConstraintViolation, match="sealed"):
            conn.execute("DELETE FROM ledger_events WHERE seq = %s", (TARGET_SEQ,))
        with pytest.raises(psycopg.errors.IntegrityConstraintViolation, match="immutable"):
            conn.execute("UPDATE merkle_batches SET root_hash = %s", (bytes(32),))
        with pytest.raises(psycopg.errors.IntegrityConstraintViolation, match="immutable"):
            conn.execute("DELETE FROM merkle_batches")
        with pytest.raises(psycopg.errors.IntegrityConstraintViolation, match="retired"):
            conn.execute("DELETE FROM merkle_keys")
        # ALTER TABLE ... DISABLE TRIGGER is what it takes; then the verifier finds the change
        conn.execute("ALTER TABLE ledger_events DISABLE TRIGGER ledger_events_sealed_update")
        conn.execute("UPDATE ledger_events SET cost = cost + 1 WHERE seq = %s", (TARGET_SEQ,))
        conn.execute("ALTER TABLE ledger_events ENABLE TRIGGER ledger_events_sealed_update")
    assert_detected(ledger, ledger.batches[1], ledger.event_at(TARGET_SEQ), "cost")


# --------------------------------------------------------------------------- one column of one row

COLUMN_TAMPERING: dict[str, str] = {
    "cost": "cost = cost + 0.00000001",
    "agent_id": "agent_id = (SELECT agent_id FROM agents WHERE agent_id <> ledger_events.agent_id LIMIT 1)",
    "occurred_at": "occurred_at = occurred_at + interval '1 microsecond'",
    "resource": "resource = overlay(resource placing 'X' from 9 for 1)",
    "model": "model = 'gpt-4O'",
    "input_tokens": "input_tokens = input_tokens + 1",
    "output_tokens": "output_tokens = NULL",
    "cached_input_tokens": "cached_input_tokens = 7",
    "currency": "currency = 'GBP'",
    "metadata": "metadata = jsonb_set(metadata, '{hold}', '\"0.06\"')",
    "event_type": "event_type = CASE WHEN event_type = 'denial' THEN 'settlement' ELSE 'denial' END",
    "idempotency_key": "idempotency_key = gen_random_uuid()",
    "request_id": "request_id = gen_random_uuid()",
}


@pytest.mark.parametrize("column", sorted(COLUMN_TAMPERING))
def test_a_changed_column_is_found(ledger: Ledger, column: str) -> None:
    event = ledger.event_at(TARGET_SEQ)  # an event with every nullable column but one set
    ledger.sql(f"UPDATE ledger_events SET {COLUMN_TAMPERING[column]} WHERE event_id = %s", (event,))
    fields = assert_detected(ledger, ledger.batches[1], event, column)
    assert fields["Signature"] == "Valid"
    # the event and its batch fail on their own too; the batches around them pass
    assert ledger.cli("merkle", "verify-event", "--event-id", str(event)).exit_code == 1
    assert ledger.cli("merkle", "verify-batch", "--batch-id", str(ledger.batches[1])).exit_code == 1
    ledger.cli.ok("merkle", "verify-batch", "--batch-id", str(ledger.batches[0]))
    ledger.cli.ok("merkle", "verify-batch", "--batch-id", str(ledger.batches[2]))


@pytest.mark.parametrize("offset", [0, 1, 9, 30, 60, -1])
def test_a_flipped_byte_in_the_canonical_bytes_is_found(ledger: Ledger, offset: int) -> None:
    event = ledger.event_at(TARGET_SEQ)
    ledger.sql(
        "UPDATE ledger_events SET canonical = set_byte(canonical, p, get_byte(canonical, p) # 1)"
        " FROM (SELECT CASE WHEN %(o)s < 0 THEN length(canonical) + %(o)s ELSE %(o)s END AS p"
        "       FROM ledger_events WHERE event_id = %(e)s) pos WHERE event_id = %(e)s",
        {"o": offset, "e": event},
    )
    assert_detected(ledger, ledger.batches[1], event, "canonical")


def test_columns_and_canonical_changed_together_are_found_by_the_signed_leaf(ledger: Ledger) -> None:
    event = ledger.event_at(TARGET_SEQ)
    with psycopg.connect(ledger.url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("SET session_replication_role = replica")
        row = conn.execute(
            "SELECT *, metadata::text AS meta FROM ledger_events WHERE event_id = %s", (event,)
        ).fetchone()
        assert row is not None
        row["metadata"] = encoding.parse_metadata(row["meta"])
        forged = encoding.encode(
            encoding.from_columns({**row, "cost": row["cost"] + 100, "currency": row["currency"].strip()})
        )
        conn.execute(
            "UPDATE ledger_events SET cost = cost + 100, canonical = %s WHERE event_id = %s", (forged, event)
        )
    fields = assert_detected(ledger, ledger.batches[1], event, "signed leaf")
    assert fields["First Bad Event"].startswith(str(event))
    result = ledger.cli("merkle", "verify-event", "--event-id", str(event))
    assert result.exit_code == 1
    assert "signed leaf" in block(result.stdout)["Problem"]


def test_altered_block_hashes_are_found(ledger: Ledger) -> None:
    b = ledger.batches[1]  # leaves 1000..1999: its first whole block is leaves 1024..1055
    ledger.sql(
        "UPDATE merkle_batches SET block_hashes = sha256(block_hashes) || substring(block_hashes from 33)"
        " WHERE batch_id = %s",
        (b,),
    )
    result = ledger.cli("merkle", "verify-event", "--event-id", str(ledger.event_at(1001)))
    assert result.exit_code == 1
    fields = block(result.stdout)
    assert fields["First Bad Batch"] == str(b)
    assert "block hashes" in fields["Problem"]
    # an event inside the altered block proves without that block's root
    ledger.cli.ok("merkle", "verify-event", "--event-id", str(ledger.event_at(1031)))
    assert_detected(ledger, b, None, "block hashes")


def test_a_row_moved_to_another_batch_is_found(ledger: Ledger) -> None:
    event = ledger.event_at(TARGET_SEQ)
    ledger.sql("UPDATE ledger_events SET merkle_root_id = %s WHERE event_id = %s", (ledger.batches[0], event))
    assert_detected(ledger, ledger.batches[1], event, "names batch")


# --------------------------------------------------------------------------- rows deleted, inserted, swapped


def test_a_deleted_row_is_found(ledger: Ledger) -> None:
    ledger.sql("DELETE FROM ledger_events WHERE seq = %s", (TARGET_SEQ,))
    fields = assert_detected(ledger, ledger.batches[1], f"seq {TARGET_SEQ}", "missing")
    assert "(missing)" in fields["First Bad Event"]


def test_the_last_row_of_the_ledger_deleted_is_found(ledger: Ledger) -> None:
    ledger.sql("DELETE FROM ledger_events WHERE seq = %s", (EVENTS,))
    assert_detected(ledger, ledger.batches[2], f"seq {EVENTS}", "missing")


def test_a_whole_batch_of_rows_deleted_is_found(ledger: Ledger) -> None:
    ledger.sql("DELETE FROM ledger_events WHERE merkle_root_id = %s", (ledger.batches[1],))
    assert_detected(ledger, ledger.batches[1], "seq 1001", "missing")


def test_a_row_inserted_into_a_batch_is_found(ledger: Ledger) -> None:
    # a second row at seq 1500: forged with a consistent canonical encoding of its own
    ledger.sql("ALTER TABLE ledger_events DROP CONSTRAINT ledger_events_seq_key")
    agent = ledger.sealed.agents[0]
    rows = ledger.sql(
        "INSERT INTO ledger_events (idempotency_key, event_type, agent_id, occurred_at, cost, currency, seq,"
        " merkle_root_id, canonical) VALUES (gen_random_uuid(), 'settlement', %s, %s, 1, 'USD', %s, %s, '\\x01')"
        " RETURNING *, metadata::text AS meta",
        (agent, START + timedelta(seconds=1499, microseconds=5), TARGET_SEQ, ledger.batches[1]),
    )
    row = {**rows[0], "metadata": {}, "currency": "USD"}
    forged = encoding.encode(encoding.from_columns(row))
    ledger.sql("UPDATE ledger_events SET canonical = %s WHERE event_id = %s", (forged, row["event_id"]))
    fields = assert_detected(ledger, ledger.batches[1], None)
    assert (
        str(row["event_id"]) in fields["First Bad Event"] or f"seq {TARGET_SEQ}" in fields["First Bad Event"]
    )


def test_a_row_inserted_past_the_last_batch_is_found(ledger: Ledger) -> None:
    agent = ledger.sealed.agents[0]
    rows = ledger.sql(
        "INSERT INTO ledger_events (idempotency_key, event_type, agent_id, occurred_at, cost, currency, seq,"
        " merkle_root_id, canonical) VALUES (gen_random_uuid(), 'settlement', %s, %s, 5, 'USD', %s, %s, '\\x01')"
        " RETURNING event_id",
        (agent, START + timedelta(days=1), EVENTS + 1, ledger.batches[2]),
    )
    event = rows[0]["event_id"]
    fields = assert_detected(ledger, ledger.batches[2], event, "no batch")
    assert fields["First Bad Event"].startswith(str(event))


def test_a_row_slipped_in_unsealed_with_an_old_date_is_found(ledger: Ledger) -> None:
    agent = ledger.sealed.agents[0]
    rows = ledger.sql(
        "INSERT INTO ledger_events (idempotency_key, event_type, agent_id, occurred_at, recorded_at, cost,"
        " currency) VALUES (gen_random_uuid(), 'settlement', %s, %s, %s, 5, 'USD') RETURNING event_id",
        (agent, START + timedelta(seconds=10), START + timedelta(seconds=11)),
    )
    event = rows[0]["event_id"]
    fields = assert_detected(ledger, None, event, "no batch")
    assert fields["First Bad Event"] == str(event)


def test_a_fresh_unsealed_event_is_pending_not_tampering(ledger: Ledger) -> None:
    with Database(ledger.url) as db, db.transaction() as conn:
        ledger_store.insert_events(
            conn, make_events(ledger.sealed.agents, 3, start=START + timedelta(days=2))
        )
    code, fields, text = ledger.verify_range()
    assert code == 0, text
    assert fields["Unsealed Events"].startswith("3 ")


def _swap(ledger: Ledger, column: str, a: int, b: int) -> None:
    ledger.sql(
        f"UPDATE ledger_events SET {column} = CASE event_id WHEN %(a)s THEN y.v ELSE x.v END"
        f" FROM (SELECT {column} AS v FROM ledger_events WHERE event_id = %(a)s) x,"
        f"      (SELECT {column} AS v FROM ledger_events WHERE event_id = %(b)s) y"
        " WHERE event_id IN (%(a)s, %(b)s)",
        {"a": a, "b": b},
    )


def test_two_rows_swapped_by_seq_are_found(ledger: Ledger) -> None:
    first, second = ledger.event_at(TARGET_SEQ), ledger.event_at(TARGET_SEQ + 1)
    ledger.sql("ALTER TABLE ledger_events DROP CONSTRAINT ledger_events_seq_key")
    _swap(ledger, "seq", first, second)
    fields = assert_detected(ledger, ledger.batches[1], None, "seq")
    assert fields["First Bad Event"].startswith((str(first), str(second)))


def test_two_rows_swapped_with_their_canonical_bytes_are_found(ledger: Ledger) -> None:
    first, second = ledger.event_at(TARGET_SEQ), ledger.event_at(TARGET_SEQ + 1)
    ledger.sql("ALTER TABLE ledger_events DROP CONSTRAINT ledger_events_seq_key")
    for column in ("seq", "canonical"):
        _swap(ledger, column, first, second)
    fields = assert_detected(ledger, ledger.batches[1], None)
    assert fields["First Bad Event"].startswith((str(first), str(second)))


def test_two_rows_swapped_by_event_id_are_found(ledger: Ledger) -> None:
    first, second = ledger.event_at(TARGET_SEQ), ledger.event_at(TARGET_SEQ + 1)
    ledger.sql("ALTER TABLE ledger_events ALTER COLUMN event_id SET GENERATED BY DEFAULT")
    ledger.sql("UPDATE ledger_events SET event_id = -1 WHERE event_id = %s", (first,))
    ledger.sql("UPDATE ledger_events SET event_id = %s WHERE event_id = %s", (first, second))
    ledger.sql("UPDATE ledger_events SET event_id = %s WHERE event_id = -1", (second,))
    assert_detected(ledger, ledger.batches[1], None, "event_id")


# --------------------------------------------------------------------------- batches and signatures


def _forge_batch(ledger: Ledger, signer: Callable[[Checkpoint], str]) -> None:
    """Replace batch 2 by one over tampered rows with a recomputed root, signed by ``signer``."""
    from caracald.core import merkle

    b = ledger.batches[1]
    ledger.sql("UPDATE ledger_events SET cost = cost + 1000 WHERE seq = %s", (TARGET_SEQ,))
    rows = ledger.sql(
        "SELECT *, metadata::text AS meta FROM ledger_events WHERE merkle_root_id = %s ORDER BY seq", (b,)
    )
    canonicals = []
    for row in rows:
        record = encoding.from_columns(
            {**row, "metadata": encoding.parse_metadata(row["meta"]), "currency": row["currency"].strip()}
        )
        canonicals.append(encoding.encode(record))
        ledger.sql(
            "UPDATE ledger_events SET canonical = %s WHERE event_id = %s", (canonicals[-1], row["event_id"])
        )
    old = ledger.sql("SELECT * FROM merkle_batches WHERE batch_id = %s", (b,))[0]
    leaves = merkle.leaf_hashes(canonicals)
    frontier = [bytes(old["start_frontier"][i : i + 32]) for i in range(0, len(old["start_frontier"]), 32)]
    tree = merkle.TreeBuilder.from_state(old["previous_tree_size"], frontier)
    tree.extend(leaves)
    root = tree.root()
    origin = ledger.sql("SELECT origin FROM merkle_state")[0]["origin"]
    note = signer(Checkpoint(origin, old["tree_size"], root, datetime.now(UTC), str(b)))
    ledger.sql("DELETE FROM merkle_batches WHERE batch_id = %s", (b,))
    old.update(root_hash=root, leaf_hashes=b"".join(leaves), checkpoint=note)
    columns = ", ".join(old)
    ledger.sql(
        f"INSERT INTO merkle_batches ({columns}) VALUES ({', '.join(['%s'] * len(old))})", list(old.values())
    )


def test_a_batch_replaced_and_signed_by_an_unknown_key_is_found(ledger: Ledger) -> None:
    intruder = generate_key("caracal-ledger-intruder")
    _forge_batch(ledger, lambda cp: sign_checkpoint(cp, intruder))
    fields = assert_detected(ledger, ledger.batches[1], None, "no trusted key")
    assert fields["Signature"] == "Invalid"


def test_a_batch_replaced_with_an_unsigned_checkpoint_is_found(ledger: Ledger) -> None:
    _forge_batch(ledger, lambda cp: cp.body().decode() + "\n")
    fields = assert_detected(ledger, ledger.batches[1], None, "signature")
    assert fields["Signature"] == "Invalid"


def test_a_batch_replaced_with_a_copied_signature_is_found(ledger: Ledger) -> None:
    old_note = ledger.sql("SELECT checkpoint FROM merkle_batches WHERE batch_id = %s", (ledger.batches[1],))[
        0
    ]
    signatures = old_note["checkpoint"].split("\n\n", 1)[1]
    _forge_batch(ledger, lambda cp: cp.body().decode() + "\n" + signatures)
    fields = assert_detected(ledger, ledger.batches[1], None, "signature invalid")
    assert fields["Signature"] == "Invalid"


def test_a_replaced_signature_is_found(ledger: Ledger) -> None:
    b = ledger.batches[2]
    note = ledger.sql("SELECT checkpoint FROM merkle_batches WHERE batch_id = %s", (b,))[0]["checkpoint"]
    body, signature_line = note.split("\n\n", 1)
    name, encoded = signature_line.strip().removeprefix("— ").split(" ")
    import base64

    raw = bytearray(base64.b64decode(encoded))
    raw[10] ^= 0xFF
    forged = f"{body}\n\n— {name} {base64.b64encode(bytes(raw)).decode()}\n"
    ledger.sql("UPDATE merkle_batches SET checkpoint = %s WHERE batch_id = %s", (forged, b))
    fields = assert_detected(ledger, b, None, "signature invalid")
    assert fields["Signature"] == "Invalid"


def test_a_root_hash_changed_in_the_row_is_found(ledger: Ledger) -> None:
    b = ledger.batches[0]
    ledger.sql("UPDATE merkle_batches SET root_hash = sha256(root_hash) WHERE batch_id = %s", (b,))
    assert_detected(ledger, b, None, "signed root")


def test_a_deleted_batch_row_is_found(ledger: Ledger) -> None:
    ledger.sql("DELETE FROM merkle_batches WHERE batch_id = %s", (ledger.batches[1],))
    assert_detected(ledger, None, "1001", "no batch")


# --------------------------------------------------------------------------- batch rows the verifier must not skip


@pytest.mark.parametrize(
    ("index", "column", "bit"),
    [(0, "first_seq", 40), (1, "first_seq", 40), (2, "first_seq", 40), (2, "last_seq", 11)],
)
def test_a_flipped_seq_range_hides_no_batch(ledger: Ledger, index: int, column: str, bit: int) -> None:
    """A batch row's seq columns are not signed: one bit flipped in them must not take the batch, and an
    event changed in it, out of what verify-range reads (over the whole ledger or over the batch's period)."""
    b = ledger.batches[index]
    ledger.sql("ALTER TABLE merkle_batches DROP CONSTRAINT merkle_batches_check")
    ledger.sql("ALTER TABLE merkle_batches DROP CONSTRAINT merkle_batches_check1")
    ledger.sql(
        f"UPDATE merkle_batches SET {column} = {column} # (1::bigint << {bit}) WHERE batch_id = %s", (b,)
    )
    seq = 1000 * index + 10
    ledger.sql("UPDATE ledger_events SET cost = cost + 1000 WHERE seq = %s", (seq,))
    for outcome in (ledger.verify_range(), ledger.verify_period(index)):
        # the batch is reported, and its rows are read where its checkpoints put them: the change is named
        fields = assert_failed(outcome, "cost")
        assert fields["First Bad Batch"] == str(b), outcome[2]
        assert fields["First Bad Event"] == f"{ledger.event_at(seq)} (seq {seq})", outcome[2]


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("with_events", [False, True], ids=["row", "row-and-events"])
def test_a_deleted_batch_is_found_by_its_period(ledger: Ledger, index: int, with_events: bool) -> None:
    """Verifying the period of a batch that is gone (its row, or its row and its events) fails: the chain
    of the batches around it has a hole."""
    b = ledger.batches[index]
    if with_events:
        ledger.sql("DELETE FROM ledger_events WHERE merkle_root_id = %s", (b,))
    ledger.sql("DELETE FROM merkle_batches WHERE batch_id = %s", (b,))
    for outcome in (ledger.verify_range(), ledger.verify_period(index)):
        fields = assert_failed(outcome, "no batch")
        assert fields["First Bad Batch"] == str(ledger.batches[index + 1]), outcome[2]


def test_an_empty_period_is_verified_by_the_batches_around_it(ledger: Ledger) -> None:
    """A period without events passes when the chain runs unbroken across it."""
    end = ledger.sealed.periods[1][1]
    result = ledger.cli(
        "merkle",
        "verify-range",
        "--start-time",
        (end + timedelta(milliseconds=1)).isoformat(),
        "--end-time",
        (end + timedelta(milliseconds=2)).isoformat(),
    )
    assert result.exit_code == 0, result
    fields = block(result.stdout)
    assert fields["Integrity"] == "PASSED"
    assert fields["Batches Checked"] == "2"  # the batches before and after it, which chain


@pytest.mark.parametrize("seq", [0, -7])
def test_a_row_inserted_before_the_first_seq_is_found(ledger: Ledger, seq: int) -> None:
    ledger.sql("ALTER TABLE ledger_events DROP CONSTRAINT ledger_events_seq_check")
    agent = ledger.sealed.agents[0]
    rows = ledger.sql(
        "INSERT INTO ledger_events (idempotency_key, event_type, agent_id, occurred_at, cost, currency, seq,"
        " merkle_root_id, canonical) VALUES (gen_random_uuid(), 'settlement', %s, %s, 5, 'USD', %s, %s, '\\x01')"
        " RETURNING event_id",
        (agent, START + timedelta(seconds=5, microseconds=1), seq, ledger.batches[0]),
    )
    event = rows[0]["event_id"]
    for outcome in (ledger.verify_range(), ledger.verify_period(0)):
        fields = assert_failed(outcome, "no batch")
        assert fields["First Bad Event"].startswith(str(event)), outcome[2]


@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_altered_leaf_hashes_are_found(ledger: Ledger, how: str) -> None:
    """The recorded leaf hashes are what proves one event (verify-event, prove): verify-range and
    verify-batch check them against the events' leaves."""
    b = ledger.batches[1]
    if how == "flipped":
        change = "set_byte(leaf_hashes, 5 * 32 + 3, get_byte(leaf_hashes, 5 * 32 + 3) # 1)"
    else:
        ledger.sql("ALTER TABLE merkle_batches DROP CONSTRAINT merkle_batches_check2")
        change = "substring(leaf_hashes FROM 1 FOR length(leaf_hashes) - 32)"
    ledger.sql(f"UPDATE merkle_batches SET leaf_hashes = {change} WHERE batch_id = %s", (b,))
    for outcome in (ledger.verify_range(), ledger.verify_period(1)):
        fields = assert_failed(outcome, "leaf hashes")
        assert fields["First Bad Batch"] == str(b), outcome[2]
    result = ledger.cli("merkle", "verify-batch", "--batch-id", str(b))
    fields = assert_failed((result.exit_code, block(result.stdout), result.stdout), "leaf hashes")
    assert fields["First Bad Batch"] == str(b)
    ledger.cli.ok("merkle", "verify-batch", "--batch-id", str(ledger.batches[0]))
    # what the stored leaves prove fails: an event whose audit path takes the altered leaf
    neighbour = 1005 if how == "flipped" else 1999
    assert ledger.cli("merkle", "verify-event", "--event-id", str(ledger.event_at(neighbour))).exit_code == 1


def test_a_deleted_tree_state_is_reported_not_raised(ledger: Ledger) -> None:
    ledger.sql("DELETE FROM merkle_state")
    for outcome in (ledger.verify_range(), ledger.verify_period(0), ledger.verify_period(2)):
        assert_failed(outcome, "merkle_state")
    for command in (
        ("verify-batch", "--batch-id", str(ledger.batches[1])),
        ("verify-event", "--event-id", str(ledger.event_at(TARGET_SEQ))),
    ):
        result = ledger.cli("merkle", *command)
        assert_failed((result.exit_code, block(result.stdout), result.stdout + result.stderr), "merkle_state")


def test_a_tampered_tree_state_is_found_and_sealing_refuses(ledger: Ledger) -> None:
    ledger.sql("UPDATE merkle_state SET tree_size = 2499, frontier = substring(frontier from 1 for 32 * 7)")
    assert_detected(ledger, ledger.batches[2], None, "merkle_state")
    with Database(ledger.url) as db, db.transaction() as conn:
        ledger_store.insert_events(
            conn, make_events(ledger.sealed.agents, 3, start=START + timedelta(days=2))
        )
    result = ledger.cli("merkle", "seal")
    assert result.exit_code == 1
    assert "refusing to seal" in result.stderr


# --------------------------------------------------------------------------- rollback and rewrite


def _roll_back_last_batch(ledger: Ledger) -> None:
    last = ledger.sql("SELECT * FROM merkle_batches WHERE batch_id = %s", (ledger.batches[2],))[0]
    ledger.sql("DELETE FROM ledger_events WHERE merkle_root_id = %s", (last["batch_id"],))
    ledger.sql("DELETE FROM merkle_batches WHERE batch_id = %s", (last["batch_id"],))
    ledger.sql(
        "UPDATE merkle_state SET tree_size = %s, frontier = %s, last_batch_id = %s",
        (last["previous_tree_size"], last["start_frontier"], ledger.batches[1]),
    )


def test_a_rollback_behind_a_trusted_checkpoint_is_found(ledger: Ledger, tmp_path: Path) -> None:
    trusted = tmp_path / "trusted.checkpoint"
    ledger.cli.ok("merkle", "checkpoint", "--output", str(trusted))
    _roll_back_last_batch(ledger)
    # on its own the shorter ledger is consistent ...
    code, _, text = ledger.verify_range()
    assert code == 0, text
    # ... but not against what the verifier remembered
    code, fields, text = ledger.verify_range("--trusted-checkpoint", str(trusted))
    assert code == 1, text
    assert fields["First Bad Batch"] == str(ledger.batches[2])
    assert fields["First Bad Event"] == "seq 2001 (missing)"
    assert "rolled back" in fields["Problem"]


def test_a_rewrite_behind_a_trusted_checkpoint_is_found(ledger: Ledger, tmp_path: Path) -> None:
    trusted = tmp_path / "trusted.checkpoint"
    ledger.cli.ok("merkle", "checkpoint", "--output", str(trusted))
    _roll_back_last_batch(ledger)
    with Database(ledger.url) as db, db.transaction() as conn:
        ledger_store.insert_events(
            conn, make_events(ledger.sealed.agents, 500, start=START + timedelta(days=3))
        )
    ledger.cli.ok("merkle", "seal")
    code, fields, text = ledger.verify_range("--trusted-checkpoint", str(trusted))
    assert code == 1, text
    assert "rewritten" in fields["Problem"]
    # an older trusted checkpoint, of a batch still there, is extended by the rewritten ledger
    older = tmp_path / "older.checkpoint"
    note = ledger.sql("SELECT checkpoint FROM merkle_batches WHERE batch_id = %s", (ledger.batches[0],))
    older.write_text(note[0]["checkpoint"])
    code, _, text = ledger.verify_range("--trusted-checkpoint", str(older))
    assert code == 0, text


def test_a_trusted_checkpoint_that_the_ledger_extends_passes(ledger: Ledger, tmp_path: Path) -> None:
    trusted = tmp_path / "trusted.checkpoint"
    note = ledger.sql("SELECT checkpoint FROM merkle_batches WHERE batch_id = %s", (ledger.batches[0],))
    trusted.write_text(note[0]["checkpoint"])
    code, _, text = ledger.verify_range("--trusted-checkpoint", str(trusted))
    assert code == 0, text


def test_failures_are_recorded_for_list_batches_and_audited_nowhere_else(ledger: Ledger) -> None:
    ledger.sql("UPDATE ledger_events SET cost = cost + 1 WHERE seq = %s", (TARGET_SEQ,))
    ledger.verify_range()
    rows = ledger.sql("SELECT batch_id, verification_status FROM merkle_batches ORDER BY first_seq")
    assert [r["verification_status"] for r in rows] == ["passed", "failed", "passed"]
    audit = ledger.sql(
        "SELECT action FROM audit_log WHERE event_type = %s", (str(AuditEventType.CREDENTIAL),)
    )
    assert [a["action"] for a in audit] == ["merkle.generate_key"]


# --------------------------------------------------------------------------- helper sessions


@pytest.fixture
def copy(postgres_service: PostgresService, sealed: Sealed) -> Iterator[Ledger]:
    """A fresh copy of the sealed ledger, verified with helper sessions, one batch per statement."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = postgres_service.create_database(name, template=sealed.template)
    cli = Cli(url, env={"CARACAL__INTEGRITY__KEY_DIR": str(sealed.key_dir)})
    yield Ledger(url, cli, sealed, helpers=True)
    postgres_service.drop_database(name)


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Helper sessions for any ledger, one batch per statement; the number of statements given to helpers
    in each ``HelperSessions.open``'s life, recorded."""
    monkeypatch.setattr(verifier, "HELPERS_FROM_EVENTS", 0)
    monkeypatch.setattr(verifier, "HELPER_CHUNK_EVENTS", 1)
    counts: list[int] = []
    submit = helper_sessions.HelperSessions.submit

    def counted(self: helper_sessions.HelperSessions, *args: Any) -> helper_sessions.Prefetched:
        counts[-1] += 1
        return submit(self, *args)

    opened = helper_sessions.HelperSessions.open.__func__  # type: ignore[attr-defined]

    def open_counted(
        cls: type[helper_sessions.HelperSessions], *args: Any
    ) -> helper_sessions.HelperSessions | None:
        counts.append(0)
        return opened(cls, *args)  # type: ignore[no-any-return]

    monkeypatch.setattr(helper_sessions.HelperSessions, "submit", counted)
    monkeypatch.setattr(helper_sessions.HelperSessions, "open", classmethod(open_counted))
    return counts


def trusted_keys(ledger: Ledger) -> list[Any]:
    return [keys.load_signing_key(ledger.sealed.key_dir).public()]


def test_helper_sessions_read_the_verifiers_snapshot(
    copy: Ledger, statements: list[int], row_by_row: list[uuid.UUID]
) -> None:
    """Rows changed after the verification's snapshot was taken are not seen by its helpers either: every
    batch passes on its packed rows, read by helpers, as the ledger was. The next verification sees them."""
    with psycopg.connect(copy.url) as conn:
        verifier._snapshot(conn)
        conn.execute("SELECT count(*) FROM ledger_events").fetchone()  # the snapshot is taken here
        copy.sql("UPDATE ledger_events SET cost = cost + 1 WHERE seq = %s", (TARGET_SEQ,))
        report = verifier.verify_all(conn, trusted_keys(copy))
        assert report.ok, report.first_problem
        assert report.events_checked == EVENTS
        assert statements == [3]  # one per batch, all read by helpers
        assert row_by_row == []  # (the verifier's own session would have seen the ledger as it was)
        conn.rollback()
        report = verifier.verify_all(conn, trusted_keys(copy))
    first = report.first_problem
    assert first is not None and first.kind == "column_mismatch" and first.seq == TARGET_SEQ
    assert statements == [3, 3]
    assert row_by_row == [copy.batches[1]]


def test_the_cli_verifies_through_helper_sessions(copy: Ledger, statements: list[int]) -> None:
    code, fields, text = copy.verify_range()
    assert code == 0, text
    assert fields["Event Count"] == "2,500"
    assert statements == [3]


def test_a_read_committed_verification_reads_on_its_own_session(copy: Ledger, statements: list[int]) -> None:
    """Statements of a READ COMMITTED transaction each see the ledger anew: no helper can share that view."""
    with psycopg.connect(copy.url) as conn:
        conn.execute("SELECT 1")
        report = verifier.verify_all(conn, trusted_keys(copy))
    assert report.ok, report.first_problem
    assert statements == [0]


def test_without_helper_sessions_the_verification_goes_on_alone(
    copy: Ledger, statements: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the server takes no more connections the verifier reads on its own one, and still finds what
    was changed."""
    copy.sql("UPDATE ledger_events SET cost = cost + 1 WHERE seq = %s", (TARGET_SEQ,))
    with psycopg.connect(copy.url) as conn:

        def refused(*args: Any, **kwargs: Any) -> Any:
            raise psycopg.OperationalError("FATAL: sorry, too many clients already")

        monkeypatch.setattr(helper_sessions.psycopg, "connect", refused)
        report = verifier.verify_all(conn, trusted_keys(copy))
    first = report.first_problem
    assert first is not None and first.kind == "column_mismatch" and first.seq == TARGET_SEQ
    assert statements == [0]
