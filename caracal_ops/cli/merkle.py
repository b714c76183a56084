"""``caracal merkle``: seal the ledger into signed Merkle batches, verify it, prove events, manage keys.

Verification trusts only public key files: every ``.pub`` in the key folder (``integrity.key_dir``, or
``--key-dir``), or the files given with ``--public-key``; never the keys the database lists. Verify commands
exit 1 when they find tampering; ``verify-proof`` needs no database at all.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import typer

from caracal_ops.cli.context import EXIT_FAILED, state
from caracal_ops.cli.output import FORMAT_OPTION, OutputFormat, emit_block, emit_json, emit_table, timestamp
from caracald.core.agents import parse_uuid
from caracald.core.errors import ConflictError, ValidationError
from caracald.core.signing import ALGORITHMS, Checkpoint, VerifyingKey
from caracald.core.timeparse import parse_timestamp
from caracald.integrity import batches, keys, metrics, proofs, sealer, verifier
from caracald.integrity.verifier import Report
from caracald.store.database import Connection, Database

app = typer.Typer(
    help="Ledger integrity: sealing, verification, proofs and signing keys.", no_args_is_help=True
)

_KEY_DIR = "caracal.merkle.key_dir"

PUBLIC_KEY_OPTION = typer.Option(
    [],
    "--public-key",
    help="Trust this public key file (repeatable) instead of the key folder's .pub files.",
    dir_okay=False,
    metavar="FILE",
)
FORMAT = FORMAT_OPTION


@app.callback()
def merkle(
    ctx: typer.Context,
    key_dir: Path | None = typer.Option(
        None, "--key-dir", help="Signing key folder (default: integrity.key_dir).", file_okay=False
    ),
) -> None:
    ctx.meta[_KEY_DIR] = key_dir


def _key_dir(ctx: typer.Context) -> Path:
    override = ctx.meta.get(_KEY_DIR)
    if override is not None:
        return Path(override).expanduser()
    config = state(ctx).config
    return config.integrity.resolved_key_dir(embedded=config.embedded_mode, data_dir=config.embedded.data_dir)


def _trusted(ctx: typer.Context, public_keys: list[Path]) -> list[VerifyingKey]:
    if public_keys:
        return [keys.load_public_key_file(p) for p in public_keys]
    key_dir = _key_dir(ctx)
    found = keys.trusted_keys(key_dir)
    if not found:
        raise ValidationError(
            f"no public keys in {key_dir} to verify with: "
            "give --public-key FILE, or --key-dir / integrity.key_dir"
        )
    return found


def _grace(ctx: typer.Context) -> timedelta:
    """How long an event may wait for its batch before verification counts it as left out."""
    return timedelta(seconds=2 * state(ctx).config.integrity.batch_max_age_seconds + 300)


def _snapshot(conn: Connection) -> None:
    # db.read() has only set READ ONLY so far: the whole verification reads one snapshot
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")


def _record(db: Database, report: Report) -> None:
    """Note each checked batch's outcome (for list-batches); verification never depends on it."""
    if not report.outcomes:
        return
    outcomes = [(bid, p is None, p.message if p else None) for bid, p in report.outcomes.items()]
    try:
        with db.transaction() as conn:
            batches.record_verification(conn, outcomes, datetime.now(UTC))
    except psycopg.Error:
        pass  # e.g. a read-only role: the result printed below is what counts


def _batch_text(report: Report) -> str:
    if report.first_batch is None:
        return "-"
    if report.first_batch == report.last_batch:
        return str(report.first_batch)
    return f"{report.first_batch} .. {report.last_batch}"


def _emit(report: Report, fmt: OutputFormat, extra: list[tuple[str, Any]] | None = None) -> None:
    if fmt is OutputFormat.JSON:
        data = report.to_json()
        data.update({label.lower().replace(" ", "_"): value for label, value in extra or []})
        emit_json(data)
    else:
        fields: list[tuple[str, Any]] = list(extra or [])
        if report.scope == "range":
            fields.append(("Batches Checked", f"{report.batches_checked:,}"))
        fields.append(("Batch ID", _batch_text(report)))
        if report.scope == "event":
            fields.append(("Event ID", report.event_id))
            fields.append(("Seq", report.seq if report.seq is not None else "-"))
        count = report.batch_event_count if report.scope == "event" else report.events_checked
        if report.scope == "batch" and report.batch_event_count is not None:
            count = report.batch_event_count
        fields.append(("Event Count", f"{count or 0:,}"))
        fields.append(("Merkle Root", "0x" + report.merkle_root.hex() if report.merkle_root else "-"))
        fields.append(("Signature", "Valid" if report.signatures_valid else "Invalid"))
        fields.append(("Integrity", "PASSED" if report.ok else "FAILED"))
        fields.append(("Tamper Detected", "No" if report.ok else "Yes"))
        if report.scope == "range" and report.unsealed_events:
            fields.append(("Unsealed Events", f"{report.unsealed_events:,} (waiting for their batch)"))
        first = report.first_problem
        if first is not None:
            fields.append(("First Bad Batch", first.batch_id or "-"))
            fields.append(("First Bad Event", first.event_text()))
            fields.append(("Problem", first.message))
            if len(report.problems) > 1:
                fields.append(("Problems Found", f"{len(report.problems):,}"))
        emit_block("Verification Result", fields)
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


# --------------------------------------------------------------------------- verification


@app.command("verify-batch")
def verify_batch(
    ctx: typer.Context,
    batch_id: str = typer.Option(..., "--batch-id"),
    public_key: list[Path] = PUBLIC_KEY_OPTION,
    fmt: OutputFormat = FORMAT,
) -> None:
    """Verify one batch: its signature, its link to the batch before, and every one of its events."""
    trusted = _trusted(ctx, public_key)
    batch = parse_uuid(batch_id, what="batch id")
    db = state(ctx).db
    with db.read() as conn:
        _snapshot(conn)
        report = verifier.verify_batch(conn, batch, trusted)
    _record(db, report)
    _emit(report, fmt)


@app.command("verify-range")
def verify_range(
    ctx: typer.Context,
    start_time: str = typer.Option(..., "--start-time", help="ISO 8601 (inclusive), or 'now'."),
    end_time: str = typer.Option("now", "--end-time", help="ISO 8601 (inclusive), or 'now'."),
    trusted_checkpoint: Path | None = typer.Option(
        None,
        "--trusted-checkpoint",
        help="A signed checkpoint remembered from before (a note, or a proof file): finds rollback, rewrite.",
        dir_okay=False,
    ),
    public_key: list[Path] = PUBLIC_KEY_OPTION,
    fmt: OutputFormat = FORMAT,
) -> None:
    """Verify every batch with events that occurred in the range, the chain between them, and that no
    event was left out of a batch. Exits 1 on any tampering."""
    trusted = _trusted(ctx, public_key)
    at = datetime.now(UTC)
    start = parse_timestamp(start_time, what="start time", now=at)
    end = parse_timestamp(end_time, what="end time", now=at)
    if end < start:
        raise ValidationError("end time must not be before start time")
    note = proofs.read_checkpoint_file(trusted_checkpoint) if trusted_checkpoint else None
    db = state(ctx).db
    with db.read() as conn:
        _snapshot(conn)
        report = verifier.verify_range(
            conn, start, end, trusted, trusted_checkpoint=note, unsealed_grace=_grace(ctx), now=at
        )
    _record(db, report)
    _emit(report, fmt, [("Time Range", f"{timestamp(start)} to {timestamp(end)}")])


@app.command("verify-event")
def verify_event(
    ctx: typer.Context,
    event_id: int = typer.Option(..., "--event-id", min=1),
    public_key: list[Path] = PUBLIC_KEY_OPTION,
    fmt: OutputFormat = FORMAT,
) -> None:
    """Prove one event against its batch's signed root, without reading the rest of the ledger."""
    trusted = _trusted(ctx, public_key)
    with state(ctx).db.read() as conn:
        _snapshot(conn)
        report = verifier.verify_event(conn, event_id, trusted, unsealed_grace=_grace(ctx))
    _emit(report, fmt)


# --------------------------------------------------------------------------- proofs


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise ValidationError(f"cannot write {path}: {exc.strerror}") from None


@app.command("prove")
def prove(
    ctx: typer.Context,
    event_id: int = typer.Option(..., "--event-id", min=1),
    output: Path | None = typer.Option(
        None, "--output", help="Write the proof here (default: stdout).", dir_okay=False
    ),
    trusted_checkpoint: Path | None = typer.Option(
        None,
        "--trusted-checkpoint",
        help="Also prove consistency with this checkpoint, which the proof's recipient already trusts.",
        dir_okay=False,
    ),
) -> None:
    """Export an event's inclusion proof and its signed checkpoint as JSON, checkable offline."""
    note = proofs.read_checkpoint_file(trusted_checkpoint) if trusted_checkpoint else None
    with state(ctx).db.read() as conn:
        doc = proofs.inclusion_proof(conn, event_id, trusted_checkpoint=note)
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if output is None:
        typer.echo(text, nl=False)
        return
    _write(output, text)
    emit_block(
        "Inclusion Proof Written",
        [
            ("File", output),
            ("Event ID", event_id),
            ("Batch ID", doc["batch_id"]),
            ("Tree Size", f"{doc['tree_size']:,}"),
            ("Merkle Root", "0x" + doc["root_hash"]),
        ],
    )


@app.command("prove-consistency")
def prove_consistency(
    ctx: typer.Context,
    from_batch: str = typer.Option(..., "--from", help="The earlier batch id."),
    to_batch: str = typer.Option(..., "--to", help="The later batch id."),
    output: Path | None = typer.Option(None, "--output", dir_okay=False),
) -> None:
    """Export the proof that one batch's checkpoint extends an earlier one's (nothing rewritten between)."""
    old = parse_uuid(from_batch, what="batch id")
    new = parse_uuid(to_batch, what="batch id")
    with state(ctx).db.read() as conn:
        doc = proofs.consistency_proof(conn, old, new)
    text = json.dumps(doc, indent=2) + "\n"
    if output is None:
        typer.echo(text, nl=False)
        return
    _write(output, text)
    emit_block(
        "Consistency Proof Written",
        [
            ("File", output),
            ("From", f"{doc['from']['batch_id']} ({doc['from']['tree_size']:,} events)"),
            ("To", f"{doc['to']['batch_id']} ({doc['to']['tree_size']:,} events)"),
        ],
    )


@app.command("verify-proof")
def verify_proof(
    proof_file: Path = typer.Argument(
        ..., help="A proof from 'prove' or 'prove-consistency'.", dir_okay=False
    ),
    public_key: list[Path] = typer.Option(
        ...,
        "--public-key",
        help="The signer's public key file (repeatable: old and new keys).",
        dir_okay=False,
        metavar="FILE",
    ),
    trusted_checkpoint: Path | None = typer.Option(
        None,
        "--trusted-checkpoint",
        help="A checkpoint you already trust (a note, or a proof file).",
        dir_okay=False,
    ),
    fmt: OutputFormat = FORMAT,
) -> None:
    """Check a proof offline with only the public key: no database, nothing trusted from the file itself."""
    trusted = [keys.load_public_key_file(p) for p in public_key]
    doc = proofs.load_document(proof_file)
    note = proofs.read_checkpoint_file(trusted_checkpoint) if trusted_checkpoint else None
    check = proofs.verify_document(doc, trusted, trusted_checkpoint=note)
    if not check.ok:
        metrics.VERIFICATION_FAILURES.inc()
    cp: Checkpoint | None = check.checkpoint
    signature_ok = not any("signature" in p for p in check.problems)
    if fmt is OutputFormat.JSON:
        emit_json(
            {
                "kind": check.kind,
                "integrity": "PASSED" if check.ok else "FAILED",
                "signature": "Valid" if signature_ok else "Invalid",
                "signed_by": check.signer,
                "event": check.event,
                "batch_id": cp.batch_id if cp else None,
                "tree_size": cp.tree_size if cp else None,
                "merkle_root": "0x" + cp.root_hash.hex() if cp else None,
                "from_tree_size": check.old_checkpoint.tree_size if check.old_checkpoint else None,
                "problems": check.problems,
            }
        )
    else:
        fields: list[tuple[str, Any]] = [("Proof", f"{check.kind} ({proof_file})")]
        if check.event is not None:
            fields += [
                ("Event ID", check.event["event_id"]),
                ("Seq", check.event["seq"]),
                ("Agent ID", check.event["agent_id"]),
                ("Occurred At", check.event["occurred_at"]),
                ("Cost", f"{check.event['cost']} {check.event['currency']}"),
            ]
        if check.old_checkpoint is not None:
            fields.append(("From Tree Size", f"{check.old_checkpoint.tree_size:,}"))
        if cp is not None:
            fields += [
                ("Batch ID", cp.batch_id),
                ("Tree Size", f"{cp.tree_size:,}"),
                ("Merkle Root", "0x" + cp.root_hash.hex()),
                ("Signed By", check.signer or "-"),
            ]
        fields += [
            ("Signature", "Valid" if signature_ok else "Invalid"),
            ("Integrity", "PASSED" if check.ok else "FAILED"),
            ("Tamper Detected", "No" if check.ok else "Yes"),
        ]
        fields += [("Problem", p) for p in check.problems]
        emit_block("Proof Verification", fields)
    if not check.ok:
        raise typer.Exit(EXIT_FAILED)


@app.command("checkpoint")
def checkpoint(
    ctx: typer.Context,
    output: Path | None = typer.Option(
        None, "--output", help="Write the signed checkpoint here, to trust it later.", dir_okay=False
    ),
) -> None:
    """Print the newest signed checkpoint: keep it, and later verify with --trusted-checkpoint."""
    with state(ctx).db.read() as conn:
        latest = batches.latest(conn)
    if latest is None:
        raise ConflictError("nothing is sealed yet: no checkpoint")
    if output is None:
        typer.echo(latest.checkpoint, nl=False)
        return
    _write(output, latest.checkpoint)
    emit_block(
        "Checkpoint Saved",
        [
            ("File", output),
            ("Batch ID", latest.batch_id),
            ("Tree Size", f"{latest.tree_size:,}"),
            ("Merkle Root", "0x" + latest.root_hash.hex()),
        ],
    )


# --------------------------------------------------------------------------- sealing and batches


@app.command("seal")
def seal(
    ctx: typer.Context,
    due_only: bool = typer.Option(
        False, "--due-only", help="Only batches that are full or older than integrity.batch_max_age_seconds."
    ),
    fmt: OutputFormat = FORMAT,
) -> None:
    """Seal pending ledger events into signed batches now."""
    cli = state(ctx)
    integrity = cli.config.integrity
    key = keys.load_signing_key(_key_dir(ctx))
    max_age = timedelta(seconds=integrity.batch_max_age_seconds) if due_only else timedelta(0)
    sealed: list[sealer.SealedBatch] = []
    while True:  # one transaction per batch, so a long backlog commits as it goes
        with cli.db.transaction() as conn:
            step = sealer.seal_pending(
                conn, key, max_batch=integrity.batch_size, max_age=max_age, max_batches=1, wait=True
            )
        if not step.batches:
            break
        sealed += step.batches
    result = sealer.SealResult(sealed)
    last = sealed[-1] if sealed else None
    if fmt is OutputFormat.JSON:
        emit_json(
            {
                "batches_created": len(result.batches),
                "events_sealed": result.events,
                "batch_ids": [str(b.batch_id) for b in result.batches],
                "tree_size": last.tree_size if last else None,
                "merkle_root": "0x" + last.root_hash.hex() if last else None,
                "key_id": key.key_id_hex,
            }
        )
        return
    fields: list[tuple[str, Any]] = [
        ("Batches Created", f"{len(result.batches):,}"),
        ("Events Sealed", f"{result.events:,}"),
    ]
    if last is not None:
        fields += [
            ("Last Batch ID", last.batch_id),
            ("Tree Size", f"{last.tree_size:,}"),
            ("Merkle Root", "0x" + last.root_hash.hex()),
            ("Key ID", key.key_id_hex),
        ]
    emit_block("Ledger Sealed", fields)


@app.command("list-batches")
def list_batches(
    ctx: typer.Context,
    limit: int = typer.Option(20, "--limit", min=1, max=100_000),
    fmt: OutputFormat = FORMAT,
) -> None:
    """The newest batches, oldest of them first, with their last verification."""
    with state(ctx).db.read() as conn:
        found = batches.recent(conn, limit)
        pending, _oldest = sealer.pending_count(conn)
    if fmt is OutputFormat.JSON:
        emit_json(
            {
                "unsealed_events": pending,
                "batches": [
                    {
                        "batch_id": b.batch_id,
                        "first_seq": b.first_seq,
                        "last_seq": b.last_seq,
                        "event_count": b.event_count,
                        "tree_size": b.tree_size,
                        "merkle_root": "0x" + b.root_hash.hex(),
                        "key_id": b.key_id,
                        "created_at": b.created_at,
                        "verified_at": b.verified_at,
                        "verification": b.verification_status,
                        "problem": b.verification_problem,
                    }
                    for b in found
                ],
            }
        )
        return
    emit_table(
        ["batch id", "seq", "events", "merkle root", "key id", "created", "verified"],
        [
            (
                b.batch_id,
                f"{b.first_seq}-{b.last_seq}",
                f"{b.event_count:,}",
                "0x" + b.root_hash.hex()[:16] + "...",
                b.key_id,
                timestamp(b.created_at),
                f"{b.verification_status} {timestamp(b.verified_at)}" if b.verification_status else "-",
            )
            for b in found
        ],
        empty="No batches sealed yet.",
    )
    typer.echo(f"Unsealed events: {pending:,}")


# --------------------------------------------------------------------------- keys


def _algorithm(value: str | None) -> Any:
    if value is not None and value not in ALGORITHMS:
        raise ValidationError(f"unknown key algorithm {value!r}: use {' or '.join(ALGORITHMS)}")
    return value


@app.command("generate-key")
def generate_key(
    ctx: typer.Context,
    algorithm: str | None = typer.Option(
        None, "--algorithm", help="ed25519 or ecdsa-p256 (default: config)."
    ),
    name: str | None = typer.Option(
        None, "--name", help="Key name (default: caracal-ledger-<time>-<random>)."
    ),
    fmt: OutputFormat = FORMAT,
) -> None:
    """Create the first checkpoint signing key (private file 0600) and record its public half."""
    cli = state(ctx)
    key_dir = _key_dir(ctx)
    new = keys.generate(
        cli.db,
        key_dir,
        actor=cli.who,
        algorithm=_algorithm(algorithm) or cli.config.integrity.key_algorithm,
        name=name,
    )
    _emit_key("Signing Key Generated", new, fmt)


@app.command("rotate-keys")
def rotate_keys(
    ctx: typer.Context,
    algorithm: str | None = typer.Option(
        None, "--algorithm", help="Algorithm of the new key (default: the old one's)."
    ),
    reason: str | None = typer.Option(None, "--reason", help="Why, for the audit log."),
    fmt: OutputFormat = FORMAT,
) -> None:
    """Replace the signing key with a new one (new key id). Checkpoints signed before stay verifiable with
    the old public key, which is kept; the old private key is deleted."""
    cli = state(ctx)
    new = keys.rotate(cli.db, _key_dir(ctx), actor=cli.who, algorithm=_algorithm(algorithm), reason=reason)
    _emit_key("Signing Key Rotated", new, fmt)


def _emit_key(title: str, new: keys.NewKey, fmt: OutputFormat) -> None:
    if fmt is OutputFormat.JSON:
        emit_json(
            {
                "key_name": new.key.name,
                "key_id": new.key.key_id_hex,
                "algorithm": new.key.algorithm,
                "public_key": new.key.to_text(),
                "private_key_file": str(new.private_path),
                "public_key_file": str(new.public_path),
                "retired_key_id": new.retired.key_id_hex if new.retired else None,
            }
        )
        return
    fields: list[tuple[str, Any]] = [
        ("Key Name", new.key.name),
        ("Key ID", new.key.key_id_hex),
        ("Algorithm", new.key.algorithm),
        ("Private Key File", f"{new.private_path} (mode 0600)"),
        ("Public Key File", new.public_path),
        ("Public Key", new.key.to_text()),
    ]
    if new.retired is not None:
        fields.append(("Retired Key ID", f"{new.retired.key_id_hex} ({new.retired.name}; public key kept)"))
    emit_block(title, fields)


@app.command("export-public-key")
def export_public_key(
    ctx: typer.Context,
    name: str | None = typer.Option(None, "--name", help="A key by name (default: the active key)."),
    all_keys: bool = typer.Option(False, "--all", help="Every key, current and retired, one per line."),
    output: Path | None = typer.Option(None, "--output", dir_okay=False),
) -> None:
    """Print the public key (signed-note verifier key) third parties verify proofs with."""
    key_dir = _key_dir(ctx)
    if all_keys:
        text = "".join(k.to_text() + "\n" for k in keys.trusted_keys(key_dir))
        if not text:
            raise ValidationError(f"no public keys in {key_dir}")
    else:
        text = keys.public_key_text(key_dir, name) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        _write(output, text)
        typer.echo(f"Public key written to {output}")


@app.command("list-keys")
def list_keys(ctx: typer.Context, fmt: OutputFormat = FORMAT) -> None:
    """The signing keys the database has recorded, current and retired."""
    with state(ctx).db.read() as conn:
        history = keys.key_history(conn)
    if fmt is OutputFormat.JSON:
        emit_json(
            [
                {
                    "key_name": k.key_name,
                    "key_id": k.key_id,
                    "algorithm": k.algorithm,
                    "public_key": k.public_key,
                    "created_at": k.created_at,
                    "retired_at": k.retired_at,
                }
                for k in history
            ]
        )
        return
    emit_table(
        ["key name", "key id", "algorithm", "created", "status"],
        [
            (
                k.key_name,
                k.key_id,
                k.algorithm,
                timestamp(k.created_at),
                "active" if k.active else f"retired {timestamp(k.retired_at)}",
            )
            for k in history
        ],
        empty="No signing keys recorded: create one with 'caracal merkle generate-key'.",
    )
