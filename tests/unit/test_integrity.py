"""The pure parts of ledger integrity: the canonical encoding, proofs from a stored frontier, offline checks."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caracald.core import merkle
from caracald.core.signing import Checkpoint, generate_key, sign_checkpoint
from caracald.integrity import encoding, proofs
from caracald.integrity.encoding import EncodingError, LedgerRecord

# --------------------------------------------------------------------------- the encoding


def record(**changes: Any) -> LedgerRecord:
    base: dict[str, Any] = {
        "seq": 1,
        "event_id": 42,
        "idempotency_key": uuid.UUID(int=1),
        "event_type": "settlement",
        "agent_id": uuid.UUID(int=2),
        "request_id": None,
        "occurred_at": datetime(2024, 1, 1, tzinfo=UTC),
        "resource": "https://api.openai.com/v1/chat/completions",
        "model": "gpt-4o",
        "input_tokens": 10,
        "output_tokens": None,
        "cached_input_tokens": None,
        "cost": Decimal("0.037"),
        "currency": "USD",
        "metadata": {"b": 1, "a": [True, None]},
    }
    base.update(changes)
    return LedgerRecord(**base)


def test_layout_is_a_version_byte_and_postgresql_binary_record() -> None:
    data = encoding.encode(record())
    assert data[0] == 1
    assert data[1:5] == (15).to_bytes(4, "big")  # fields
    assert data[5:9] == (20).to_bytes(4, "big")  # int8
    assert data[9:13] == (8).to_bytes(4, "big")  # 8 bytes
    assert data[encoding.SEQ_SLICE] == (1).to_bytes(8, "big")
    assert data[encoding.EVENT_ID_SLICE] == (42).to_bytes(8, "big")
    fields = encoding.raw_fields(data)
    assert len(fields) == len(encoding.FIELDS) == 15
    named = dict(zip(encoding.FIELDS, fields, strict=True))
    assert named["request_id"] is None  # NULL: length -1, no bytes
    assert named["cost"] == b"0.03700000"  # ledger scale of USD: 2 + 6 digits
    assert named["metadata"] == b'{"a": [true, null], "b": 1}'
    assert named["occurred_at"] == (24 * 365 * 3600 * 10**6 * 24 + 6 * 24 * 3600 * 10**6).to_bytes(8, "big")


@pytest.mark.parametrize(
    ("amount", "currency", "text"),
    [
        ("0", "USD", "0.00000000"),
        ("-0.25", "USD", "-0.25000000"),
        ("-0", "USD", "0.00000000"),
        ("12", "JPY", "12.000000"),
        ("0.001", "BHD", "0.001000000"),
        ("0.0000000001", "USD", "0.0000000001"),  # more digits than the ledger scale: kept
        ("1E+3", "EUR", "1000.00000000"),
        ("1", "???", "1.00000000"),  # an unknown code counts as two minor digits
        ("123456789012345678901234567890.5", "USD", "123456789012345678901234567890.50000000"),
    ],
)
def test_cost_text(amount: str, currency: str, text: str) -> None:
    assert encoding.cost_text(Decimal(amount), currency) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ({}, "{}"),
        ([], "[]"),
        ({"bb": 1, "a": 2, "ab": 3}, '{"a": 2, "ab": 3, "bb": 1}'),  # shorter keys first, then bytes
        ({"é": 1, "z": 2}, '{"z": 2, "é": 1}'),  # 'é' is two UTF-8 bytes
        (
            {"x": Decimal("1.50"), "y": Decimal("1E+2"), "z": Decimal("-0.0")},
            '{"x": 1.50, "y": 100, "z": 0.0}',
        ),
        ({"f": 0.1, "g": 1e16, "h": 1e-7}, '{"f": 0.1, "g": 10000000000000000, "h": 0.0000001}'),
        ('a"b\\c\n\u0001é', '"a\\"b\\\\c\\n\\u0001é"'),
        (None, "null"),
    ],
)
def test_metadata_text_is_jsonb_normal_form(value: Any, text: str) -> None:
    assert encoding.metadata_text(value) == text


def test_metadata_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(EncodingError):
        encoding.metadata_text({"x": float("nan")})
    with pytest.raises(EncodingError):
        encoding.metadata_text({1: "x"})
    with pytest.raises(EncodingError):
        encoding.parse_metadata("NaN")


_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
_json: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.decimals(min_value=-(10**12), max_value=10**12, allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    seq=st.integers(1, 2**63 - 1),
    event_id=st.integers(1, 2**63 - 1),
    request=st.none() | st.uuids(),
    at=st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)),
    resource=_text,
    model=st.none() | _text,
    tokens=st.none() | st.integers(0, 2**63 - 1),
    cost=st.decimals(min_value=-(10**20), max_value=10**20, places=12, allow_nan=False),
    currency=st.sampled_from(["USD", "JPY", "BHD", "EUR"]),
    metadata=_json,
)
def test_decode_inverts_encode(
    seq: int,
    event_id: int,
    request: uuid.UUID | None,
    at: datetime,
    resource: str,
    model: str | None,
    tokens: int | None,
    cost: Decimal,
    currency: str,
    metadata: Any,
) -> None:
    original = record(
        seq=seq,
        event_id=event_id,
        request_id=request,
        occurred_at=at,
        resource=resource,
        model=model,
        input_tokens=tokens,
        cached_input_tokens=tokens,
        cost=cost,
        currency=currency,
        metadata=metadata,
    )
    data = encoding.encode(original)
    decoded = encoding.decode(data)
    assert encoding.encode(decoded) == data
    assert decoded.cost == cost
    assert decoded.occurred_at == at


def _respell(data: bytes, name: str, raw: bytes) -> bytes:
    fields = encoding.raw_fields(data)
    fields[encoding.FIELDS.index(name)] = raw
    return (
        b"\x01"
        + (15).to_bytes(4, "big")
        + b"".join(
            oid.to_bytes(4, "big") + (b"\xff\xff\xff\xff" if f is None else len(f).to_bytes(4, "big") + f)
            for oid, f in zip(encoding.FIELD_OIDS, fields, strict=True)
        )
    )


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("cost", b"0.037"),  # right value, not at ledger scale
        ("cost", b"0.0370000000"),
        ("cost", b"+0.03700000"),
        ("metadata", b'{"b":1,"a":[true,null]}'),  # right value, not the normal form
        ("metadata", b'{"b": 1, "a": [true, null]}'),
        ("seq", b"\x00" * 7),
    ],
)
def test_decode_refuses_other_spellings(name: str, raw: bytes) -> None:
    with pytest.raises(EncodingError):
        encoding.decode(_respell(encoding.encode(record()), name, raw))


def test_decode_refuses_malformed_bytes() -> None:
    good = encoding.encode(record())
    for bad in (b"", b"\x02" + good[1:], good + b"\x00", good[:-1], good[:30]):
        with pytest.raises(EncodingError):
            encoding.decode(bad)


def test_differing_fields_names_what_changed() -> None:
    a = encoding.encode(record())
    b = encoding.encode(record(cost=Decimal("1"), agent_id=uuid.UUID(int=3)))
    assert encoding.differing_fields(a, b) == ["agent_id", "cost"]


def test_fields_sql_lists_the_fields_in_order() -> None:
    columns = [c.strip() for c in encoding.fields_sql("x").split(",")]
    assert columns[0] == "x.seq" and columns[-1] == "x.metadata::text"
    assert encoding.fields_sql("x", seq="0::int8").startswith("0::int8, x.event_id")


# --------------------------------------------------------------------------- proofs from a stored frontier


def _leaves(n: int) -> list[bytes]:
    return [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_partial_tree_proves_like_the_whole_tree(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 300))
    start = data.draw(st.integers(0, n))
    leaves = _leaves(n)
    builder = merkle.TreeBuilder()
    builder.extend(leaves[:start])
    partial = proofs.PartialTree(start, builder.frontier, leaves[start:])
    assert partial.root() == merkle.root(leaves)
    size = data.draw(st.integers(max(start, 1), n))
    assert partial.root(size) == merkle.root(leaves[:size])
    if start < size:
        index = data.draw(st.integers(start, size - 1))
        assert partial.inclusion_path(index, size) == merkle.inclusion_proof(leaves, index, size)
    old = data.draw(st.integers(max(start, 1), size))
    assert partial.consistency_path(old, size) == merkle.consistency_proof(leaves, old, size)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 70), min_size=1, max_size=6))
def test_extend_frontier_matches_the_tree_builder(sizes: list[int]) -> None:
    leaves = _leaves(sum(sizes))
    builder = merkle.TreeBuilder()
    size, frontier = 0, []
    at = 0
    for count in sizes:
        chunk = leaves[at : at + count]
        at += count
        builder.extend(chunk)
        size, frontier = proofs.extend_frontier(size, frontier, chunk)
        assert (size, frontier) == builder.to_state()
        assert proofs.frontier_root(size, frontier) == builder.root()


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_sparse_tree_paths_need_only_blocks_and_three_partial_blocks(data: st.DataObject) -> None:
    start = data.draw(st.integers(0, 200))
    size = data.draw(st.integers(start + 1, start + 200))
    index = data.draw(st.integers(start, size - 1))
    leaves = _leaves(size)
    builder = merkle.TreeBuilder()
    builder.extend(leaves[:start])
    blocks = proofs.block_hashes(start, leaves[start:])
    known: dict[int, bytes] = {}
    b = proofs.BLOCK_LEAVES
    for lo, hi in (
        (start, min(-(-start // b) * b, size)),
        (max(index // b * b, start), min(index // b * b + b, size)),
        (max(size // b * b, start), size),
    ):
        known.update({i: leaves[i] for i in range(lo, hi)})
    tree = proofs.SparseTree(start, builder.frontier, size, blocks, known)
    assert tree.inclusion_path(index, size) == merkle.inclusion_proof(leaves, index, size)
    assert len(known) <= 3 * b


def test_partial_tree_refuses_nodes_inside_the_frontier() -> None:
    leaves = _leaves(8)
    builder = merkle.TreeBuilder()
    builder.extend(leaves[:4])
    partial = proofs.PartialTree(4, builder.frontier, leaves[4:])
    with pytest.raises(Exception, match="frontier"):
        partial.node(0, 2)
    with pytest.raises(Exception, match="between"):
        partial.inclusion_path(1, 8)


# --------------------------------------------------------------------------- offline checks


def _inclusion_doc(n: int = 5, index: int = 3) -> tuple[dict[str, Any], Any]:
    key = generate_key("caracal-ledger-test")
    records = [record(seq=i + 1, event_id=100 + i) for i in range(n)]
    canonicals = [encoding.encode(r) for r in records]
    leaves = merkle.leaf_hashes(canonicals)
    root = merkle.root(leaves)
    note = sign_checkpoint(Checkpoint("caracal.ledger/test", n, root, datetime.now(UTC), "b-1"), key)
    doc = {
        "format": proofs.INCLUSION_FORMAT,
        "event_id": 100 + index,
        "seq": index + 1,
        "leaf_index": index,
        "batch_id": "b-1",
        "event": records[index].to_json(),
        "canonical": base64.b64encode(canonicals[index]).decode(),
        "leaf_hash": leaves[index].hex(),
        "tree_size": n,
        "root_hash": root.hex(),
        "inclusion_path": [h.hex() for h in merkle.inclusion_proof(leaves, index)],
        "checkpoint": note,
    }
    return doc, key


def test_an_inclusion_proof_checks_offline_and_any_change_fails() -> None:
    doc, key = _inclusion_doc()
    assert proofs.verify_document(doc, [key.public()]).ok
    other = generate_key("caracal-ledger-test")
    assert not proofs.verify_document(doc, [other.public()]).ok
    for field, value in [("leaf_index", 2), ("event_id", 1), ("batch_id", "b-2"), ("tree_size", 6)]:
        changed = json.loads(json.dumps(doc))
        changed[field] = value
        assert not proofs.verify_document(changed, [key.public()]).ok, field
    changed = json.loads(json.dumps(doc))
    changed["event"]["resource"] = "https://elsewhere.example.com"
    check = proofs.verify_document(changed, [key.public()])
    assert check.problems == ["the event fields shown do not match the signed canonical bytes"]
    changed = json.loads(json.dumps(doc))
    changed["inclusion_path"] = "not a list"
    assert proofs.verify_document(changed, [key.public()]).problems[0].startswith("malformed proof")


def test_a_trusted_checkpoint_of_the_same_size_must_have_the_same_root() -> None:
    doc, key = _inclusion_doc()
    same = proofs.verify_document(doc, [key.public()], trusted_checkpoint=doc["checkpoint"])
    assert same.ok
    forked = sign_checkpoint(
        Checkpoint("caracal.ledger/test", 5, bytes(32), datetime.now(UTC) - timedelta(days=1), "b-0"), key
    )
    check = proofs.verify_document(doc, [key.public()], trusted_checkpoint=forked)
    assert not check.ok
    assert "rewritten" in check.problems[0]
