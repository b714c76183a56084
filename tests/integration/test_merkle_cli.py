"""``caracal merkle``: keys, sealing, the runbook's verification block, proofs checked offline, rotation."""

from __future__ import annotations

import json
import stat
import threading
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg.rows import dict_row

from caracald.core.ledger import LedgerEvent, LedgerEventType
from caracald.core.money import Money
from caracald.integrity import encoding, keys, sealer, verifier
from caracald.store import ledger as ledger_store
from caracald.store.database import Database
from tests.clitools import block
from tests.integration.conftest import Cli

START = datetime(2024, 3, 1, tzinfo=UTC)
OFFLINE_URL = "postgresql://nobody@127.0.0.1:1/nowhere?connect_timeout=1"


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def mcli(database_url: str, key_dir: Path) -> Cli:
    return Cli(database_url, env={"CARACAL__INTEGRITY__KEY_DIR": str(key_dir)})


@pytest.fixture
def offline(key_dir: Path) -> Cli:
    """The CLI with a database that does not exist: what runs here needs none."""
    return Cli(OFFLINE_URL, env={"CARACAL__INTEGRITY__KEY_DIR": str(key_dir)})


def agent(db: Database) -> uuid.UUID:
    agent_id = uuid.uuid4()
    now = datetime.now(UTC)
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO agents (agent_id, name, owner, status, created_at, updated_at)"
            " VALUES (%s, %s, 'o@example.com', 'active', %s, %s)",
            (agent_id, f"a-{agent_id.hex[:8]}", now, now),
        )
    return agent_id


def insert(db: Database, count: int, *, start: datetime = START, metadata: Any = None) -> uuid.UUID:
    agent_id = agent(db)
    events = [
        LedgerEvent(
            uuid.uuid4(),
            LedgerEventType.SETTLEMENT,
            agent_id,
            start + timedelta(seconds=i),
            Money(Decimal("0.037"), "USD"),
            resource="https://api.openai.com/v1/chat/completions",
            model="gpt-4o",
            input_tokens=100 + i,
            output_tokens=20,
            metadata=metadata if metadata is not None else {"n": i},
        )
        for i in range(count)
    ]
    with db.transaction() as conn:
        assert ledger_store.insert_events(conn, events) == count
    return agent_id


def event_ids(db: Database) -> list[int]:
    with db.read() as conn:
        return [r["event_id"] for r in conn.execute("SELECT event_id FROM ledger_events ORDER BY event_id")]


def batch_ids(db: Database) -> list[str]:
    with db.read() as conn:
        return [
            str(r["batch_id"]) for r in conn.execute("SELECT batch_id FROM merkle_batches ORDER BY first_seq")
        ]


@pytest.fixture
def sealed(mcli: Cli, db: Database) -> list[str]:
    """A key, and 2,500 events sealed into three batches."""
    mcli.ok("merkle", "generate-key")
    insert(db, 2500)
    out = mcli.ok("merkle", "seal")
    assert block(out.stdout)["Batches Created"] == "3"
    return batch_ids(db)


# --------------------------------------------------------------------------- keys


def test_generate_key_writes_a_private_file_only_its_owner_reads(
    mcli: Cli, db: Database, key_dir: Path
) -> None:
    out = mcli.ok("merkle", "generate-key")
    fields = block(out.stdout)
    assert out.stdout.startswith("Signing Key Generated:")
    name, key_id = fields["Key Name"], fields["Key ID"]
    private = key_dir / f"{name}.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    assert (key_dir / f"{name}.pub").read_text().strip() == fields["Public Key"]
    assert (key_dir / "active").read_text().strip() == name
    with db.read() as conn:
        rows = conn.execute("SELECT * FROM merkle_keys").fetchall()
        audit = conn.execute("SELECT action, details::text AS details FROM audit_log").fetchall()
        dump = " ".join(str(r) for r in rows) + " ".join(str(a) for a in audit)
    assert [(r["key_name"], r["key_id"], r["retired_at"]) for r in rows] == [(name, key_id, None)]
    assert [a["action"] for a in audit] == ["merkle.generate_key"]
    assert "PRIVATE" not in dump and "PRIVATE" not in out.stdout
    # a second key is a rotation, not a generation
    again = mcli("merkle", "generate-key")
    assert again.exit_code == 1
    assert "rotate-keys" in again.stderr


def test_a_private_key_others_can_read_is_refused(mcli: Cli, db: Database, key_dir: Path) -> None:
    name = block(mcli.ok("merkle", "generate-key").stdout)["Key Name"]
    insert(db, 3)
    (key_dir / f"{name}.key").chmod(0o644)
    result = mcli("merkle", "seal")
    assert result.exit_code == 2
    assert "chmod 600" in result.stderr


def test_export_public_key(mcli: Cli, offline: Cli, tmp_path: Path) -> None:
    public = block(mcli.ok("merkle", "generate-key").stdout)["Public Key"]
    assert offline.ok("merkle", "export-public-key").stdout.strip() == public
    target = tmp_path / "ledger.pub"
    offline.ok("merkle", "export-public-key", "--output", str(target))
    assert target.read_text().strip() == public


def test_ecdsa_keys_work_too(mcli: Cli, db: Database) -> None:
    fields = block(mcli.ok("merkle", "generate-key", "--algorithm", "ecdsa-p256").stdout)
    assert fields["Algorithm"] == "ecdsa-p256"
    insert(db, 10)
    mcli.ok("merkle", "seal")
    mcli.ok("merkle", "verify-range", "--start-time", "2024-01-01", "--end-time", "now")


# --------------------------------------------------------------------------- sealing and the runbook's block


def test_seal_then_verify_batch_range_and_event(mcli: Cli, db: Database, sealed: list[str]) -> None:
    first, second, third = sealed
    out = mcli.ok("merkle", "verify-batch", "--batch-id", second)
    assert out.stdout.startswith("Verification Result:\n")
    fields = block(out.stdout)
    assert fields["Batch ID"] == second
    assert fields["Event Count"] == "1,000"
    assert fields["Merkle Root"].startswith("0x") and len(fields["Merkle Root"]) == 66
    assert fields["Signature"] == "Valid"
    assert fields["Integrity"] == "PASSED"
    assert fields["Tamper Detected"] == "No"

    fields = block(
        mcli.ok(
            "merkle",
            "verify-range",
            "--start-time",
            "2024-03-01T00:00:00Z",
            "--end-time",
            "2024-03-01T00:59:59Z",
        ).stdout
    )
    assert fields["Integrity"] == "PASSED"
    assert fields["Event Count"] == "2,500"
    assert fields["Batch ID"] == f"{first} .. {third}"
    # only the batches holding the range's events are read
    fields = block(
        mcli.ok(
            "merkle",
            "verify-range",
            "--start-time",
            "2024-03-01T00:20:00Z",
            "--end-time",
            "2024-03-01T00:25:00Z",
        ).stdout
    )
    assert fields["Batch ID"] == second
    assert fields["Event Count"] == "1,000"

    some_event = event_ids(db)[1234]
    fields = block(mcli.ok("merkle", "verify-event", "--event-id", str(some_event)).stdout)
    assert fields["Batch ID"] == second
    assert fields["Event ID"] == str(some_event)
    assert fields["Integrity"] == "PASSED"

    data = json.loads(mcli.ok("merkle", "verify-batch", "--batch-id", first, "--format", "json").stdout)
    assert data["integrity"] == "PASSED"
    assert data["tamper_detected"] is False
    assert data["events_checked"] == 1000


def test_list_batches_shows_seqs_keys_and_last_verification(
    mcli: Cli, db: Database, sealed: list[str]
) -> None:
    mcli.ok("merkle", "verify-batch", "--batch-id", sealed[0])
    out = mcli.ok("merkle", "list-batches")
    assert out.stdout.splitlines()[0].split()[:3] == ["BATCH", "ID", "SEQ"]
    assert "1-1000" in out.stdout and "2001-2500" in out.stdout
    assert "Unsealed events: 0" in out.stdout
    data = json.loads(mcli.ok("merkle", "list-batches", "-o", "json").stdout)
    assert [b["event_count"] for b in data["batches"]] == [1000, 1000, 500]
    assert [b["verification"] for b in data["batches"]] == ["passed", None, None]
    assert data["batches"][1]["tree_size"] == 2000


def test_sealing_assigns_gap_free_seqs_in_event_order_and_is_idempotent(
    mcli: Cli, db: Database, sealed: list[str]
) -> None:
    with db.read() as conn:
        rows = conn.execute("SELECT event_id, seq, merkle_root_id FROM ledger_events ORDER BY seq").fetchall()
    assert [r["seq"] for r in rows] == list(range(1, 2501))
    assert [r["event_id"] for r in rows] == sorted(r["event_id"] for r in rows)
    again = block(mcli.ok("merkle", "seal").stdout)
    assert again["Batches Created"] == "0"
    assert batch_ids(db) == sealed


def test_due_only_waits_for_a_full_batch_or_the_oldest_event_to_age(
    mcli: Cli, db: Database, key_dir: Path
) -> None:
    mcli.ok("merkle", "generate-key")
    insert(db, 1500)
    fields = block(mcli.ok("merkle", "seal", "--due-only").stdout)
    assert (fields["Batches Created"], fields["Events Sealed"]) == ("1", "1,000")
    key = keys.load_signing_key(key_dir)
    with db.transaction() as conn:
        assert sealer.seal_pending(conn, key).batches == []  # 500 waiting, recorded just now
        later = datetime.now(UTC) + timedelta(minutes=6)
        result = sealer.seal_pending(conn, key, now=later)
    assert [b.event_count for b in result.batches] == [500]


def test_sealers_racing_seal_each_event_once(
    mcli: Cli, db: Database, database_url: str, key_dir: Path
) -> None:
    mcli.ok("merkle", "generate-key")
    insert(db, 3000)
    key = keys.load_signing_key(key_dir)
    results: list[sealer.SealResult] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(database_url) as conn:
                for _ in range(20):
                    results.append(sealer.seal_pending(conn, key, max_batch=250, max_age=timedelta(0)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    sealed_batches = sorted((b for r in results for b in r.batches), key=lambda b: b.first_seq)
    assert [(b.first_seq, b.last_seq) for b in sealed_batches] == [
        (i * 250 + 1, i * 250 + 250) for i in range(12)
    ]
    mcli.ok("merkle", "verify-range", "--start-time", "2024-01-01", "--end-time", "now")


def test_verify_event_of_an_unsealed_event(mcli: Cli, db: Database) -> None:
    mcli.ok("merkle", "generate-key")
    insert(db, 1)
    result = mcli("merkle", "verify-event", "--event-id", str(event_ids(db)[0]))
    assert result.exit_code == 1
    assert "not sealed yet" in result.stderr
    assert mcli("merkle", "verify-event", "--event-id", "999999").exit_code == 1


def test_verify_without_any_public_key_says_how_to_give_one(database_url: str, tmp_path: Path) -> None:
    cli = Cli(database_url, env={"CARACAL__INTEGRITY__KEY_DIR": str(tmp_path / "empty")})
    result = cli("merkle", "verify-range", "--start-time", "2024-01-01")
    assert result.exit_code == 2
    assert "--public-key" in result.stderr


def test_metrics_count_batches_and_failures(mcli: Cli, db: Database) -> None:
    def value(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    created = value("caracal_merkle_batches_created_total")
    failures = value("caracal_merkle_verification_failures_total")
    observed = value("caracal_merkle_batch_processing_duration_seconds_count")
    mcli.ok("merkle", "generate-key")
    insert(db, 1200)
    mcli.ok("merkle", "seal")
    assert value("caracal_merkle_batches_created_total") == created + 2
    assert value("caracal_merkle_batch_processing_duration_seconds_count") == observed + 2
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE ledger_events SET cost = 99 WHERE seq = 7")
    assert mcli("merkle", "verify-range", "--start-time", "2024-01-01").exit_code == 1
    assert value("caracal_merkle_verification_failures_total") == failures + 1


# --------------------------------------------------------------------------- proofs


def test_inclusion_proof_round_trip_offline(
    mcli: Cli, offline: Cli, db: Database, sealed: list[str], tmp_path: Path
) -> None:
    event = event_ids(db)[1500]
    proof = tmp_path / "proof.json"
    out = mcli.ok("merkle", "prove", "--event-id", str(event), "--output", str(proof))
    assert block(out.stdout)["Batch ID"] == sealed[1]
    public = tmp_path / "ledger.pub"
    offline.ok("merkle", "export-public-key", "--output", str(public))

    # a third party: the proof file and the public key, nothing else
    fields = block(offline.ok("merkle", "verify-proof", str(proof), "--public-key", str(public)).stdout)
    assert fields["Integrity"] == "PASSED"
    assert fields["Signature"] == "Valid"
    assert fields["Event ID"] == str(event)
    assert fields["Cost"] == "0.03700000 USD"
    assert fields["Tree Size"] == "2,000"
    doc = json.loads(proof.read_text())
    assert doc["event"]["event_id"] == event
    assert doc["leaf_index"] == doc["seq"] - 1

    # stdout works as well as a file
    assert json.loads(mcli.ok("merkle", "prove", "--event-id", str(event)).stdout) == doc


def _altered(doc: dict[str, Any], change: str) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    if change == "path":
        doc["inclusion_path"][0] = "00" * 32
    elif change == "canonical":
        raw = bytearray(__import__("base64").b64decode(doc["canonical"]))
        raw[-3] ^= 1
        doc["canonical"] = __import__("base64").b64encode(bytes(raw)).decode()
    elif change == "event":
        doc["event"]["cost"] = "0.00000001"
    elif change == "root":
        lines = doc["checkpoint"].split("\n")
        lines[2] = __import__("base64").b64encode(bytes(32)).decode()
        doc["checkpoint"] = "\n".join(lines)
    elif change == "tree size":
        doc["tree_size"] += 1
        doc["checkpoint"] = doc["checkpoint"].replace("\n2000\n", "\n2001\n", 1)
    elif change == "index":
        doc["leaf_index"] += 1
    elif change == "signature":
        doc["checkpoint"] = doc["checkpoint"].replace("— ", "— x", 1)
    return doc


@pytest.mark.parametrize("change", ["path", "canonical", "event", "root", "tree size", "index", "signature"])
def test_an_altered_proof_fails(
    mcli: Cli, offline: Cli, db: Database, sealed: list[str], tmp_path: Path, change: str
) -> None:
    event = event_ids(db)[1500]
    doc = json.loads(mcli.ok("merkle", "prove", "--event-id", str(event)).stdout)
    public = tmp_path / "ledger.pub"
    offline.ok("merkle", "export-public-key", "--output", str(public))
    altered = tmp_path / "altered.json"
    altered.write_text(json.dumps(_altered(doc, change)))
    result = offline("merkle", "verify-proof", str(altered), "--public-key", str(public))
    assert result.exit_code == 1, result
    fields = block(result.stdout)
    assert fields["Integrity"] == "FAILED"
    assert fields["Tamper Detected"] == "Yes"


def test_consistency_proof_round_trip(mcli: Cli, offline: Cli, sealed: list[str], tmp_path: Path) -> None:
    proof = tmp_path / "consistency.json"
    mcli.ok("merkle", "prove-consistency", "--from", sealed[0], "--to", sealed[2], "--output", str(proof))
    public = tmp_path / "ledger.pub"
    offline.ok("merkle", "export-public-key", "--output", str(public))
    fields = block(offline.ok("merkle", "verify-proof", str(proof), "--public-key", str(public)).stdout)
    assert fields["Integrity"] == "PASSED"
    assert (fields["From Tree Size"], fields["Tree Size"]) == ("1,000", "2,500")
    doc = json.loads(proof.read_text())
    doc["path"][-1] = "11" * 32
    proof.write_text(json.dumps(doc))
    assert offline("merkle", "verify-proof", str(proof), "--public-key", str(public)).exit_code == 1
    wrong_way = mcli("merkle", "prove-consistency", "--from", sealed[2], "--to", sealed[0])
    assert wrong_way.exit_code == 2


def remember(db: Database, batch_id: str, path: Path) -> Path:
    """Write a batch's signed checkpoint to ``path``, as a verifier keeps one it trusted."""
    with db.read() as conn:
        note = conn.execute(
            "SELECT checkpoint FROM merkle_batches WHERE batch_id = %s", (batch_id,)
        ).fetchone()
    path.write_text(note["checkpoint"])
    return path


def test_a_proof_against_a_trusted_checkpoint(
    mcli: Cli, offline: Cli, db: Database, sealed: list[str], tmp_path: Path
) -> None:
    public = tmp_path / "ledger.pub"
    offline.ok("merkle", "export-public-key", "--output", str(public))
    remembered = remember(db, sealed[0], tmp_path / "remembered")
    event = event_ids(db)[2200]  # in the third batch, newer than the remembered checkpoint
    proof = tmp_path / "proof.json"
    mcli.ok(
        "merkle",
        "prove",
        "--event-id",
        str(event),
        "--output",
        str(proof),
        "--trusted-checkpoint",
        str(remembered),
    )
    offline.ok(
        "merkle",
        "verify-proof",
        str(proof),
        "--public-key",
        str(public),
        "--trusted-checkpoint",
        str(remembered),
    )
    # without the consistency part the recipient cannot connect the two
    doc = json.loads(proof.read_text())
    del doc["consistency"]
    proof.write_text(json.dumps(doc))
    result = offline(
        "merkle",
        "verify-proof",
        str(proof),
        "--public-key",
        str(public),
        "--trusted-checkpoint",
        str(remembered),
    )
    assert result.exit_code == 1
    assert "consistency" in result.stdout


def test_a_proof_over_a_tampered_tree_is_refused_cleanly(
    mcli: Cli, db: Database, sealed: list[str], tmp_path: Path
) -> None:
    remembered = remember(db, sealed[0], tmp_path / "remembered")
    # the batch after the trusted checkpoint and the tree state gone (the guard trigger off, as a
    # superuser could): no frontier to prove the later checkpoint from
    with db.transaction() as conn:
        conn.execute("ALTER TABLE merkle_batches DISABLE TRIGGER merkle_batches_immutable")
        conn.execute("DELETE FROM merkle_batches WHERE batch_id = %s", (sealed[1],))
        conn.execute("ALTER TABLE merkle_batches ENABLE TRIGGER merkle_batches_immutable")
        conn.execute("DELETE FROM merkle_state")
    event = event_ids(db)[2200]  # in the third batch
    result = mcli("merkle", "prove", "--event-id", str(event), "--trusted-checkpoint", str(remembered))
    assert result.exit_code != 0  # an exception escaping the command would fail the test here instead
    assert "merkle_state has no row" in result.stdout + result.stderr
    assert "merkle verify-range" in result.stdout + result.stderr


# --------------------------------------------------------------------------- rotation


def test_rotation_keeps_old_checkpoints_verifiable(
    mcli: Cli, offline: Cli, db: Database, key_dir: Path, tmp_path: Path
) -> None:
    old = block(mcli.ok("merkle", "generate-key").stdout)
    insert(db, 1000)
    mcli.ok("merkle", "seal")
    old_public = tmp_path / "old.pub"
    offline.ok("merkle", "export-public-key", "--output", str(old_public))

    new = block(mcli.ok("merkle", "rotate-keys", "--reason", "yearly rotation").stdout)
    assert new["Key ID"] != old["Key ID"]
    assert old["Key ID"] in new["Retired Key ID"]
    assert not (key_dir / f"{old['Key Name']}.key").exists()  # nothing can sign as the old key any more
    assert (key_dir / f"{old['Key Name']}.pub").exists()
    assert stat.S_IMODE((key_dir / f"{new['Key Name']}.key").stat().st_mode) == 0o600
    insert(db, 500, start=START + timedelta(days=1))
    mcli.ok("merkle", "seal")
    new_public = tmp_path / "new.pub"
    offline.ok("merkle", "export-public-key", "--output", str(new_public))

    batches = batch_ids(db)
    with db.read() as conn:
        signers = [r["key_id"] for r in conn.execute("SELECT key_id FROM merkle_batches ORDER BY first_seq")]
        history = conn.execute("SELECT key_id, retired_at FROM merkle_keys ORDER BY created_at").fetchall()
        audit = conn.execute("SELECT action, reason, details FROM audit_log ORDER BY audit_id").fetchall()
    assert signers == [old["Key ID"], new["Key ID"]]
    assert [(h["key_id"], h["retired_at"] is not None) for h in history] == [
        (old["Key ID"], True),
        (new["Key ID"], False),
    ]
    assert [a["action"] for a in audit] == ["merkle.generate_key", "merkle.rotate_keys"]
    assert audit[1]["reason"] == "yearly rotation"
    assert audit[1]["details"]["retired_key_id"] == old["Key ID"]

    # the whole ledger verifies with the key folder's history ...
    mcli.ok("merkle", "verify-range", "--start-time", "2024-01-01", "--end-time", "now")
    # ... an old event's proof with the old public key alone ...
    proof = tmp_path / "old-event.json"
    mcli.ok("merkle", "prove", "--event-id", str(event_ids(db)[10]), "--output", str(proof))
    offline.ok("merkle", "verify-proof", str(proof), "--public-key", str(old_public))
    # ... but not with the new key alone, which never signed it
    result = offline("merkle", "verify-proof", str(proof), "--public-key", str(new_public))
    assert result.exit_code == 1
    result = mcli("merkle", "verify-range", "--start-time", "2024-01-01", "--public-key", str(new_public))
    assert result.exit_code == 1
    assert block(result.stdout)["First Bad Batch"] == batches[0]
    assert "no trusted key" in block(result.stdout)["Problem"]
    # a consistency proof across the rotation, checked with both keys
    across = tmp_path / "across.json"
    mcli.ok("merkle", "prove-consistency", "--from", batches[0], "--to", batches[1], "--output", str(across))
    offline.ok(
        "merkle",
        "verify-proof",
        str(across),
        "--public-key",
        str(old_public),
        "--public-key",
        str(new_public),
    )


def test_a_sealer_holding_a_rotated_key_refuses_to_sign(mcli: Cli, db: Database, key_dir: Path) -> None:
    mcli.ok("merkle", "generate-key")
    stale = keys.load_signing_key(key_dir)
    mcli.ok("merkle", "rotate-keys")
    insert(db, 5)
    with db.transaction() as conn, pytest.raises(Exception, match="retired"):
        sealer.seal_pending(conn, stale, max_age=timedelta(0))
    current = keys.ActiveSigningKey(key_dir).get()
    with db.transaction() as conn:
        assert sealer.seal_pending(conn, current, max_age=timedelta(0)).events == 5


# --------------------------------------------------------------------------- the encoding, as PostgreSQL stores it

#: JSON as a client might send it, in no normal form: PostgreSQL's jsonb normalises it, and so must we.
WEIRD_METADATA: list[str] = [
    "{}",
    '{"z": true, "y": false, "a": 1, "bb": [1, 2, {"c": null}], "\u00e9": "\u00fc\\u0001\\n\\t\\"\\\\"}',
    '{"price": 1.50, "big": 1000000000000000000000000000000, "neg": -0.000100, "e": 1E+2, "f": 1.5e-7, "z": -0}',
    '{"long key that sorts last": 1, "k": 2, "kk": 3, "ab": 4, "aa": 5, "": 6, "k": 7}',
    '{  "nested" : {"deep": {"deeper": [[], {}, "", 0, -1, -0.0, 12.3400]}}}',
    '{"emoji": "\U0001f98a", "cjk": "\u6f22\u5b57", "ctrl": "\u007f\u0080", "esc": "\\u00e9\\ud83e\\udd8a\\/"}',
    '[1, "two", 3.0]',
    '"just a string"',
]


@pytest.mark.parametrize("metadata", WEIRD_METADATA, ids=range(len(WEIRD_METADATA)))
def test_python_encoding_matches_what_the_sealer_stores(
    mcli: Cli, db: Database, key_dir: Path, metadata: str
) -> None:
    mcli.ok("merkle", "generate-key")
    agent_id = agent(db)
    costs = [
        ("0", "USD"),
        ("-0.25", "USD"),
        ("123.4", "JPY"),
        ("0.000000001", "BHD"),
        ("1", "XTS"),
        ("0.00000001", "EUR"),
    ]
    events = [
        LedgerEvent(
            uuid.uuid4(),
            LedgerEventType.ADJUSTMENT,
            agent_id,
            START + timedelta(microseconds=i * 7),
            Money(Decimal(amount), "USD"),
            model="m\u00fcdel" if i % 2 else None,
            metadata={"f": 0.1, "g": 1e16, "h": [1.0, -2.5e-8], "i": "\u00e9"},
        )
        for i, (amount, _currency) in enumerate(costs)
    ]
    with db.transaction() as conn:
        ledger_store.insert_events(conn, events)
        # a Python dict with floats (what insert_events sends) normalises like PostgreSQL does it
        stored = conn.execute("SELECT metadata::text AS m FROM ledger_events LIMIT 1").fetchone()
        assert encoding.metadata_text(events[0].metadata) == stored["m"]
        # currencies, amounts and JSON beyond what the domain types allow, straight into the columns
        for (amount, currency), event in zip(costs, events, strict=True):
            conn.execute(
                "UPDATE ledger_events SET currency = %s, cost = %s, metadata = %s::jsonb WHERE idempotency_key = %s",
                (currency, Decimal(amount), metadata, event.idempotency_key),
            )
    mcli.ok("merkle", "seal")
    with psycopg.connect(db.url, row_factory=dict_row) as conn:
        rows = conn.execute("SELECT *, metadata::text AS meta FROM ledger_events ORDER BY seq").fetchall()
    assert encoding.metadata_text(encoding.parse_metadata(metadata)) == rows[0]["meta"]
    for row in rows:
        assert encoding.metadata_text(encoding.parse_metadata(row["meta"])) == row["meta"]
        record = encoding.from_columns({**row, "metadata": encoding.parse_metadata(row["meta"])})
        assert encoding.encode(record) == bytes(row["canonical"])
        assert encoding.decode(bytes(row["canonical"])) == record
    with psycopg.connect(db.url) as conn:
        assert verifier.verify_all(conn, keys.trusted_keys(key_dir)).ok


def test_the_sealer_a_ledger_writer_runs(mcli: Cli, db: Database, database_url: str, key_dir: Path) -> None:
    from caracald.integrity import batches
    from caracald.runtime.config import load_config

    mcli.ok("merkle", "generate-key")
    config = load_config(
        environ={"CARACAL_DATABASE_URL": database_url, "CARACAL__INTEGRITY__KEY_DIR": str(key_dir)}
    )
    seal = sealer.Sealer.from_config(config)
    assert (seal.max_batch, seal.max_age) == (1000, timedelta(minutes=5))
    insert(db, 1100)
    with psycopg.connect(database_url) as conn:
        assert seal(conn).events == 1000  # one full batch; 100 wait for their age
        assert seal(conn).events == 0
        mcli.ok("merkle", "rotate-keys")  # the writer picks the new key up by itself
        assert seal(conn, now=datetime.now(UTC) + timedelta(minutes=6)).events == 100
        head = batches.tree_head(conn)
    assert head is not None and head.tree_size == 1100
    with db.read() as conn:
        signers = [r["key_id"] for r in conn.execute("SELECT key_id FROM merkle_batches ORDER BY first_seq")]
    assert len(set(signers)) == 2
    mcli.ok("merkle", "verify-range", "--start-time", "2024-01-01")


def test_a_key_name_cannot_leave_the_key_folder(mcli: Cli, key_dir: Path) -> None:
    result = mcli("merkle", "generate-key", "--name", "../escaped")
    assert result.exit_code == 2
    assert not (key_dir.parent / "escaped.key").exists()
    mcli.ok("merkle", "generate-key", "--name", "ledger-2025.a_b")
    assert mcli("merkle", "export-public-key", "--name", "../../etc/passwd").exit_code == 2
