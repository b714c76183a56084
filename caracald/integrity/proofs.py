"""Inclusion and consistency proofs as JSON documents anyone can check with only the public key.

An inclusion proof carries an event's canonical bytes (and, for people, the fields they encode), the
RFC 9162 audit path of its leaf, and the signed checkpoint of the batch that sealed it. A consistency proof
carries two signed checkpoints and the RFC 9162 proof that the later tree extends the earlier one. Checking
either (:func:`verify_document`) needs no database: the verifier trusts nothing in the file but what the
public key signs and what the hashes prove.

Proofs are built from what each batch stores -- the frontier of the tree before it and its own leaf
hashes -- without reading the rest of the tree: :class:`PartialTree` computes every node an inclusion or
consistency proof needs from the frontier at some size and the leaves after it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from uuid import UUID

from psycopg.rows import dict_row, tuple_row

from caracald.core import merkle
from caracald.core.errors import ConflictError, NotFoundError, ValidationError
from caracald.core.signing import Checkpoint, SignatureError, VerifyingKey, open_checkpoint
from caracald.integrity import batches
from caracald.integrity.batches import AnyConnection, IntegrityError
from caracald.integrity.encoding import EncodingError, decode

INCLUSION_FORMAT: Final = "caracal-inclusion-proof/1"
CONSISTENCY_FORMAT: Final = "caracal-consistency-proof/1"


# --------------------------------------------------------------------------- nodes from a frontier


def _split(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)


def extend_frontier(size: int, frontier: Sequence[bytes], leaves: Sequence[bytes]) -> tuple[int, list[bytes]]:
    """The ``(size, frontier)`` of a tree after appending ``leaves`` (as ``TreeBuilder.extend``, faster).

    The new leaves are split into the aligned perfect subtrees the tree will hold, each hashed whole by
    :func:`caracald.core.merkle.packed_root`, then merged into the frontier like one leaf of their height.
    """
    if len(frontier) != size.bit_count():
        raise ValidationError(f"a tree of size {size} has {size.bit_count()} frontier hashes")
    if not isinstance(leaves, merkle.PackedHashes) and any(len(leaf) != merkle.HASH_SIZE for leaf in leaves):
        raise ValidationError(f"a leaf hash must be {merkle.HASH_SIZE} bytes")
    packed, h = merkle.joined(leaves), merkle.HASH_SIZE
    nodes = list(frontier)
    pos, i, n = size, 0, len(packed) // h
    while i < n:
        width = pos & -pos if pos else 1 << 62
        while width > n - i:
            width >>= 1
        node = merkle.packed_root(packed[i * h : (i + width) * h])
        carry = pos // width
        while carry & 1:
            node = merkle.node_hash(nodes.pop(), node)
            carry >>= 1
        nodes.append(node)
        pos += width
        i += width
    return pos, nodes


#: Leaves per stored block (``merkle_batches.block_hashes``).
BLOCK_LEAVES: Final = 32


def block_hashes(start: int, leaves: Sequence[bytes]) -> list[bytes]:
    """Roots of the aligned blocks ``[32k, 32k + 32)`` lying wholly in ``[start, start + len(leaves))``."""
    first = -(-start // BLOCK_LEAVES) * BLOCK_LEAVES
    end = start + len(leaves)
    return [
        merkle.root(leaves[lo - start : lo - start + BLOCK_LEAVES])
        for lo in range(first, end - BLOCK_LEAVES + 1, BLOCK_LEAVES)
    ]


def frontier_root(size: int, frontier: Sequence[bytes]) -> bytes:
    """MTH of the tree whose frontier is given (as ``TreeBuilder.root``)."""
    return merkle.TreeBuilder.from_state(size, frontier).root()


class PartialTree:
    """The RFC 9162 tree over ``start + len(leaves)`` leaves, known only by the frontier at ``start``
    (the roots of the perfect subtrees ``[0, start)`` decomposes into, largest first) and the leaf hashes
    from ``start`` on.

    Every node an inclusion proof of a leaf at or after ``start``, or a consistency proof from any size
    at or after ``start``, needs is either one of those subtrees or is computed from the leaves.
    """

    def __init__(self, start: int, frontier: Sequence[bytes], leaves: Sequence[bytes]) -> None:
        if start < 0 or len(frontier) != start.bit_count():
            raise ValidationError(f"a tree of size {start} has {start.bit_count()} frontier hashes")
        self.start = start
        self.size = start + len(leaves)
        self._leaves = leaves
        self._known: dict[tuple[int, int], bytes] = {}
        lo = 0
        hashes = iter(frontier)
        for bit in reversed(range(start.bit_length())):
            if start >> bit & 1:
                width = 1 << bit
                self._known[(lo, lo + width)] = next(hashes)
                lo += width

    def node(self, lo: int, hi: int) -> bytes:
        """MTH of leaves ``[lo, hi)``, for a subtree of the RFC tree."""
        known = self._known.get((lo, hi))
        if known is not None:
            return known
        if lo >= self.start:
            return merkle.root(self._leaves[lo - self.start : hi - self.start])
        if hi - lo == 1 or (hi <= self.start and hi - lo == 1 << (hi - lo - 1).bit_length()):
            # a perfect subtree of old leaves that is not a frontier node lies inside one
            raise ValidationError(f"the subtree [{lo}, {hi}) lies inside the stored frontier")
        k = _split(hi - lo)
        return merkle.node_hash(self.node(lo, lo + k), self.node(lo + k, hi))

    def _check_size(self, tree_size: int | None) -> int:
        n = self.size if tree_size is None else tree_size
        if not self.start <= n <= self.size:
            raise ValidationError(f"tree size {n} is not between {self.start} and {self.size}")
        return n

    def root(self, tree_size: int | None = None) -> bytes:
        n = self._check_size(tree_size)
        return merkle.EMPTY_ROOT if n == 0 else self.node(0, n)

    def inclusion_path(self, index: int, tree_size: int | None = None) -> list[bytes]:
        """PATH(index, D[tree_size]), deepest sibling first (as ``merkle.inclusion_proof``)."""
        n = self._check_size(tree_size)
        if not self.start <= index < n:
            raise ValidationError(f"leaf {index} is not between {self.start} and {n}")
        path: list[bytes] = []
        lo, hi = 0, n
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                path.append(self.node(lo + k, hi))
                hi = lo + k
            else:
                path.append(self.node(lo, lo + k))
                lo += k
        path.reverse()
        return path

    def consistency_path(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """PROOF(old_size, D[new_size]) (as :func:`caracald.core.merkle.consistency_proof`)."""
        n = self._check_size(new_size)
        if not 0 < old_size <= n or old_size < self.start:
            raise ValidationError(f"old tree size {old_size} is not between {max(self.start, 1)} and {n}")
        path: list[bytes] = []
        lo, hi, m = 0, n, old_size
        old_root_known = True
        while True:
            if m == hi - lo:
                if not old_root_known:
                    path.append(self.node(lo, hi))
                break
            k = _split(hi - lo)
            if m <= k:
                path.append(self.node(lo + k, hi))
                hi = lo + k
            else:
                path.append(self.node(lo, lo + k))
                lo += k
                m -= k
                old_root_known = False
        path.reverse()
        return path


class SparseTree(PartialTree):
    """The tree of ``size`` leaves known by the frontier at ``start``, the stored 32-leaf block roots after
    it, and a few leaves: enough for the audit path of a leaf whose block's leaves are known, when the
    leaves of the partial blocks at either end of ``[start, size)`` are known too.
    """

    def __init__(
        self,
        start: int,
        frontier: Sequence[bytes],
        size: int,
        blocks: Sequence[bytes],
        leaves: dict[int, bytes],
    ) -> None:
        super().__init__(start, frontier, [])
        self.size = size
        first = -(-start // BLOCK_LEAVES) * BLOCK_LEAVES
        for i, block in enumerate(blocks):
            lo = first + i * BLOCK_LEAVES
            self._known[(lo, lo + BLOCK_LEAVES)] = block
        self._sparse = leaves

    def node(self, lo: int, hi: int) -> bytes:
        known = self._known.get((lo, hi))
        if known is not None:
            return known
        if hi - lo == 1:
            leaf = self._sparse.get(lo)
            if leaf is None:
                raise ValidationError(f"leaf {lo} is not known")
            return leaf
        k = _split(hi - lo)
        return merkle.node_hash(self.node(lo, lo + k), self.node(lo + k, hi))


# --------------------------------------------------------------------------- building proofs


def _hex(hashes: Sequence[bytes]) -> list[str]:
    return [h.hex() for h in hashes]


def _frontier_at(conn: AnyConnection, size: int) -> tuple[bytes, ...]:
    """The stored frontier of the tree of ``size`` leaves: the start frontier of the batch after it."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(
            "SELECT start_frontier FROM merkle_batches WHERE previous_tree_size = %s", (size,)
        ).fetchone()
    if row is not None:
        return tuple(batches.split_hashes(row[0]))
    current = batches.state(conn)
    if current.tree_size == size:
        return current.frontier
    raise NotFoundError(f"no stored frontier for a tree of {size} events")


def consistency_between(conn: AnyConnection, old_size: int, new_size: int) -> list[bytes]:
    """The RFC 9162 consistency proof between two checkpointed tree sizes, from stored data."""
    if not 0 < old_size <= new_size:
        raise ValidationError(f"no consistency proof from {old_size} to {new_size} events")
    frontier = _frontier_at(conn, old_size)
    try:
        leaves = batches.leaves_between(conn, old_size, new_size)
    except LookupError as exc:
        raise NotFoundError(f"cannot prove {old_size} -> {new_size}: {exc}") from None
    return PartialTree(old_size, frontier, leaves).consistency_path(old_size, new_size)


def _event_row(conn: AnyConnection, event_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "SELECT event_id, seq, merkle_root_id, canonical FROM ledger_events WHERE event_id = %s",
            (event_id,),
        ).fetchone()
    if row is None:
        raise NotFoundError(f"ledger event {event_id} not found")
    if row["seq"] is None or row["merkle_root_id"] is None or row["canonical"] is None:
        raise ConflictError(f"ledger event {event_id} is not sealed yet (caracal merkle seal)")
    return row


def inclusion_proof(
    conn: AnyConnection, event_id: int, *, trusted_checkpoint: str | None = None
) -> dict[str, Any]:
    """The inclusion proof of one event in its batch's signed checkpoint, as a JSON-ready mapping.

    With ``trusted_checkpoint`` (a signed note the recipient already trusts), the document also carries
    the consistency proof between that checkpoint and the event's, in whichever direction it goes.
    """
    row = _event_row(conn, event_id)
    seq = int(row["seq"])
    canonical = bytes(row["canonical"])
    batch = batches.get(conn, row["merkle_root_id"], with_leaves=True)
    if batch is None and (state := batches.find_state(conn)) is not None and seq > state.tree_size:
        raise ConflictError(
            f"ledger event {event_id} is not sealed yet: its batch is still open (caracal merkle seal)"
        )
    if batch is None or not batch.first_seq <= seq <= batch.last_seq or batch.leaf_hashes is None:
        raise IntegrityError(f"event {event_id} names batch {row['merkle_root_id']}, which does not hold it")
    leaves = batches.split_hashes(batch.leaf_hashes)
    leaf = merkle.leaf_hash(canonical)
    if leaves[seq - batch.first_seq] != leaf:
        raise IntegrityError(f"event {event_id} does not hash to its batch's recorded leaf: run verify-event")
    tree = PartialTree(batch.previous_tree_size, batch.start_frontier, leaves)
    path = tree.inclusion_path(seq - 1, batch.tree_size)
    if not merkle.verify_inclusion(leaf, seq - 1, batch.tree_size, path, batch.root_hash):
        raise IntegrityError(f"batch {batch.batch_id} does not hash to its recorded root: run verify-batch")
    try:
        record = decode(canonical).to_json()
    except EncodingError as exc:
        raise IntegrityError(f"event {event_id} has malformed canonical bytes: {exc.message}") from None
    doc: dict[str, Any] = {
        "format": INCLUSION_FORMAT,
        "event_id": event_id,
        "seq": seq,
        "leaf_index": seq - 1,
        "batch_id": str(batch.batch_id),
        "event": record,
        "canonical": base64.b64encode(canonical).decode("ascii"),
        "leaf_hash": leaf.hex(),
        "tree_size": batch.tree_size,
        "root_hash": batch.root_hash.hex(),
        "inclusion_path": _hex(path),
        "checkpoint": batch.checkpoint,
        "key_id": batch.key_id,
    }
    if trusted_checkpoint is not None:
        trusted = Checkpoint.parse_body(_note_body(trusted_checkpoint))
        doc["consistency"] = _consistency_section(conn, trusted.tree_size, batch.tree_size)
    return doc


def _consistency_section(conn: AnyConnection, a: int, b: int) -> dict[str, Any]:
    old, new = min(a, b), max(a, b)
    path = consistency_between(conn, old, new) if old and old != new else []
    return {"old_size": old, "new_size": new, "path": _hex(path)}


def consistency_proof(conn: AnyConnection, from_batch: UUID, to_batch: UUID) -> dict[str, Any]:
    """The proof that the checkpoint of ``to_batch`` extends that of ``from_batch``."""
    old = batches.get(conn, from_batch)
    new = batches.get(conn, to_batch)
    if old is None:
        raise NotFoundError(f"batch {from_batch} not found")
    if new is None:
        raise NotFoundError(f"batch {to_batch} not found")
    if old.tree_size > new.tree_size:
        raise ValidationError("--from must name the earlier batch (the smaller tree)")
    path = consistency_between(conn, old.tree_size, new.tree_size) if old.tree_size != new.tree_size else []
    if not merkle.verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash, path):
        raise IntegrityError("the stored leaves do not join the two checkpoints: run verify-range")
    return {
        "format": CONSISTENCY_FORMAT,
        "from": _end(old),
        "to": _end(new),
        "path": _hex(path),
    }


def _end(batch: batches.Batch) -> dict[str, Any]:
    return {
        "batch_id": str(batch.batch_id),
        "tree_size": batch.tree_size,
        "root_hash": batch.root_hash.hex(),
        "checkpoint": batch.checkpoint,
    }


# --------------------------------------------------------------------------- checking proofs offline


@dataclass
class ProofCheck:
    """What checking a proof document found. ``ok`` when nothing is wrong."""

    kind: str
    problems: list[str] = field(default_factory=list)
    checkpoint: Checkpoint | None = None
    old_checkpoint: Checkpoint | None = None
    event: dict[str, Any] | None = None
    signer: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _note_body(note: str) -> bytes:
    split = note.rfind("\n\n")
    if split < 0:
        raise ValidationError("not a signed checkpoint: no blank line before the signatures")
    return note[: split + 1].encode()


def read_checkpoint_file(path: Path) -> str:
    """A signed checkpoint from a file: the note itself, or a proof document (its newest checkpoint)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValidationError(f"cannot read {path}: {exc.strerror}") from None
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ValidationError(f"{path} is not valid JSON: {exc}") from None
        note = doc.get("checkpoint") if isinstance(doc, dict) else None
        if note is None and isinstance(doc, dict) and isinstance(doc.get("to"), dict):
            note = doc["to"].get("checkpoint")
        if not isinstance(note, str):
            raise ValidationError(f"{path} holds no signed checkpoint")
        return note
    return text


def load_document(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise ValidationError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValidationError(f"{path} is not a proof: invalid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") not in (INCLUSION_FORMAT, CONSISTENCY_FORMAT):
        raise ValidationError(f"{path} is not a Caracal proof (no known 'format')")
    return doc


def _hashes(value: Any, what: str) -> list[bytes]:
    if not isinstance(value, list):
        raise ValidationError(f"{what} must be a list of hex hashes")
    try:
        out = [bytes.fromhex(v) for v in value]
    except (TypeError, ValueError):
        raise ValidationError(f"{what} must be a list of hex hashes") from None
    if any(len(h) != merkle.HASH_SIZE for h in out):
        raise ValidationError(f"every hash in {what} must be {merkle.HASH_SIZE} bytes")
    return out


def _open(note: Any, keys: Sequence[VerifyingKey], what: str, problems: list[str]) -> Checkpoint | None:
    if not isinstance(note, str):
        problems.append(f"{what}: no signed checkpoint")
        return None
    try:
        return open_checkpoint(note, keys)
    except SignatureError as exc:
        problems.append(f"{what}: signature not valid: {exc.message}")
        return None


def _signer(note: str, keys: Sequence[VerifyingKey]) -> str | None:
    for key in keys:
        if f"— {key.name} " in note:
            return f"{key.name} ({key.key_id_hex})"
    return None


def verify_document(
    doc: dict[str, Any], keys: Sequence[VerifyingKey], *, trusted_checkpoint: str | None = None
) -> ProofCheck:
    """Check a proof document against the trusted public ``keys`` (and a checkpoint already trusted)."""
    kind = doc.get("format")
    check = ProofCheck(kind="inclusion" if kind == INCLUSION_FORMAT else "consistency")
    try:
        if kind == INCLUSION_FORMAT:
            _verify_inclusion_doc(doc, keys, check)
        elif kind == CONSISTENCY_FORMAT:
            _verify_consistency_doc(doc, keys, check)
        else:
            check.problems.append("not a Caracal proof document (unknown 'format')")
            return check
        if trusted_checkpoint is not None and check.checkpoint is not None:
            _against_trusted(doc, keys, trusted_checkpoint, check)
    except (ValidationError, KeyError, TypeError, ValueError, binascii.Error) as exc:
        detail = exc.message if isinstance(exc, ValidationError) else f"{type(exc).__name__}: {exc}"
        check.problems.append(f"malformed proof: {detail}")
    return check


def _verify_inclusion_doc(doc: dict[str, Any], keys: Sequence[VerifyingKey], check: ProofCheck) -> None:
    problems = check.problems
    checkpoint = _open(doc.get("checkpoint"), keys, "checkpoint", problems)
    check.checkpoint = checkpoint
    if checkpoint is not None:
        check.signer = _signer(doc["checkpoint"], keys)
    canonical = base64.b64decode(doc["canonical"], validate=True)
    leaf = merkle.leaf_hash(canonical)
    if "leaf_hash" in doc and doc["leaf_hash"] != leaf.hex():
        problems.append("leaf_hash is not the hash of the canonical bytes")
    try:
        record = decode(canonical)
    except EncodingError as exc:
        problems.append(f"the canonical bytes are not a ledger event: {exc.message}")
        return
    shown = record.to_json()
    check.event = shown
    if doc.get("event") != shown:
        problems.append("the event fields shown do not match the signed canonical bytes")
    if doc.get("seq") != record.seq or doc.get("event_id") != record.event_id:
        problems.append("seq or event_id do not match the canonical bytes")
    index = record.seq - 1
    if doc.get("leaf_index") != index:
        problems.append(f"leaf_index must be seq - 1 = {index}")
    path = _hashes(doc.get("inclusion_path"), "inclusion_path")
    if checkpoint is None:
        return
    if doc.get("tree_size") != checkpoint.tree_size or doc.get("root_hash") != checkpoint.root_hash.hex():
        problems.append("tree_size or root_hash differ from the signed checkpoint")
    if doc.get("batch_id") != checkpoint.batch_id:
        problems.append("batch_id differs from the signed checkpoint")
    if not merkle.verify_inclusion(leaf, index, checkpoint.tree_size, path, checkpoint.root_hash):
        problems.append("the inclusion path does not lead from the event's leaf to the signed root")


def _verify_consistency_doc(doc: dict[str, Any], keys: Sequence[VerifyingKey], check: ProofCheck) -> None:
    problems = check.problems
    old = _open(doc["from"].get("checkpoint"), keys, "from checkpoint", problems)
    new = _open(doc["to"].get("checkpoint"), keys, "to checkpoint", problems)
    check.old_checkpoint, check.checkpoint = old, new
    if new is not None:
        check.signer = _signer(doc["to"]["checkpoint"], keys)
    path = _hashes(doc.get("path"), "path")
    if old is None or new is None:
        return
    if old.origin != new.origin:
        problems.append(f"the checkpoints name different ledgers ({old.origin}, {new.origin})")
    for end, cp in (("from", old), ("to", new)):
        if doc[end].get("tree_size") != cp.tree_size or doc[end].get("root_hash") != cp.root_hash.hex():
            problems.append(f"{end}: tree_size or root_hash differ from its signed checkpoint")
    if old.tree_size > new.tree_size:
        problems.append("the 'from' checkpoint is larger than the 'to' checkpoint")
    elif old.tree_size == new.tree_size:
        if old.root_hash != new.root_hash or path:
            problems.append("two checkpoints of the same size with different roots: the ledger forked")
    elif not merkle.verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash, path):
        problems.append("the consistency proof fails: the later checkpoint does not extend the earlier one")


def _against_trusted(doc: dict[str, Any], keys: Sequence[VerifyingKey], note: str, check: ProofCheck) -> None:
    problems = check.problems
    trusted = _open(note, keys, "trusted checkpoint", problems)
    proof_cp = check.checkpoint
    if trusted is None or proof_cp is None:
        return
    if trusted.origin != proof_cp.origin:
        problems.append(f"the trusted checkpoint is of another ledger ({trusted.origin})")
        return
    ends = [proof_cp] if check.old_checkpoint is None else [check.old_checkpoint, proof_cp]
    for cp in ends:
        if cp.tree_size == trusted.tree_size:
            if cp.root_hash != trusted.root_hash:
                problems.append(
                    f"the trusted checkpoint and the proof's both cover {cp.tree_size} events with different "
                    "roots: the ledger was rewritten"
                )
            return
    if check.kind != "inclusion":
        problems.append("the trusted checkpoint is neither end of this consistency proof")
        return
    section = doc.get("consistency")
    old_size, new_size = sorted((trusted.tree_size, proof_cp.tree_size))
    if not isinstance(section, dict) or (section.get("old_size"), section.get("new_size")) != (
        old_size,
        new_size,
    ):
        problems.append(
            "no consistency proof between the trusted checkpoint and the proof's: "
            "export it with 'caracal merkle prove --trusted-checkpoint'"
        )
        return
    old_cp, new_cp = (trusted, proof_cp) if trusted.tree_size < proof_cp.tree_size else (proof_cp, trusted)
    path = _hashes(section.get("path"), "consistency path")
    if not merkle.verify_consistency(
        old_cp.tree_size, new_cp.tree_size, old_cp.root_hash, new_cp.root_hash, path
    ):
        what = "extend" if trusted.tree_size < proof_cp.tree_size else "lead to"
        problems.append(
            f"the proof's checkpoint does not {what} the trusted checkpoint: "
            "the ledger was rewritten or rolled back"
        )
