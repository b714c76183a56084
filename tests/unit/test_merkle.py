"""The ledger's Merkle tree is exactly RFC 9162's: roots, inclusion and consistency proofs."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caracald.core.errors import ValidationError
from caracald.core.merkle import (
    EMPTY_ROOT,
    TreeBuilder,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    leaf_hashes,
    node_hash,
    root,
    verify_consistency,
    verify_inclusion,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def entries(n: int, salt: bytes = b"") -> list[bytes]:
    return [salt + b"event-%d" % i for i in range(n)]


class Reference:
    """MTH, PATH and PROOF exactly as RFC 9162 2.1 defines them, over D[lo:hi] of fixed entries."""

    def __init__(self, data: Sequence[bytes]) -> None:
        self.data = tuple(data)
        self.mth = cache(self._mth)

    @staticmethod
    def _k(n: int) -> int:
        k = 1
        while k * 2 < n:
            k *= 2
        return k

    def _mth(self, lo: int, hi: int) -> bytes:
        n = hi - lo
        if n == 0:
            return hashlib.sha256(b"").digest()
        if n == 1:
            return hashlib.sha256(b"\x00" + self.data[lo]).digest()
        k = self._k(n)
        return hashlib.sha256(b"\x01" + self.mth(lo, lo + k) + self.mth(lo + k, hi)).digest()

    def path(self, m: int, lo: int, hi: int) -> list[bytes]:
        n = hi - lo
        if n == 1:
            return []
        k = self._k(n)
        if m < k:
            return [*self.path(m, lo, lo + k), self.mth(lo + k, hi)]
        return [*self.path(m - k, lo + k, hi), self.mth(lo, lo + k)]

    def proof(self, m: int, n: int) -> list[bytes]:
        return self._subproof(m, 0, n, True)

    def _subproof(self, m: int, lo: int, hi: int, b: bool) -> list[bytes]:
        n = hi - lo
        if m == n:
            return [] if b else [self.mth(lo, hi)]
        k = self._k(n)
        if m <= k:
            return [*self._subproof(m, lo, lo + k, b), self.mth(lo + k, hi)]
        return [*self._subproof(m - k, lo + k, hi, False), self.mth(lo, lo + k)]


def flip(value: bytes, at: int = 0) -> bytes:
    changed = bytearray(value)
    changed[at % len(changed)] ^= 0x01
    return bytes(changed)


# --- known answers -----------------------------------------------------------------------------------------


def test_known_answer_hashes() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert root([]) == EMPTY_ROOT
    expected = "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    assert leaf_hash(b"").hex() == expected
    assert root([leaf_hash(b"")]).hex() == expected
    assert node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    assert leaf_hashes([b"x", b""]) == [leaf_hash(b"x"), leaf_hash(b"")]


class Figure:
    """The 7-leaf tree of RFC 9162 section 2.1.5, its nodes named as in the RFC."""

    def __init__(self) -> None:
        self.leaves = leaf_hashes(entries(7))
        self.a, self.b, self.c, self.d, self.e, self.f, self.j = self.leaves
        self.g = node_hash(self.a, self.b)
        self.h = node_hash(self.c, self.d)
        self.i = node_hash(self.e, self.f)
        self.k = node_hash(self.g, self.h)
        self.l = node_hash(self.i, self.j)  # the RFC's name
        self.hash = node_hash(self.k, self.l)
        # The incremental trees of the figure: 3, 4 and 6 leaves.
        self.hash0 = node_hash(self.g, self.c)
        self.hash1 = self.k
        self.hash2 = node_hash(self.k, self.i)


def test_rfc_figure_roots() -> None:
    fig = Figure()
    assert root(fig.leaves) == fig.hash
    assert root(fig.leaves[:3]) == fig.hash0
    assert root(fig.leaves[:4]) == fig.hash1
    assert root(fig.leaves[:6]) == fig.hash2


def test_rfc_figure_inclusion_proofs() -> None:
    fig = Figure()
    expected = {
        0: [fig.b, fig.h, fig.l],  # d0, as the RFC lists
        1: [fig.a, fig.h, fig.l],
        3: [fig.c, fig.g, fig.l],  # d3
        4: [fig.f, fig.j, fig.k],  # d4
        6: [fig.i, fig.k],  # d6, promoted unchanged: j is its leaf hash
    }
    for index, proof in expected.items():
        assert inclusion_proof(fig.leaves, index) == proof
        assert verify_inclusion(fig.leaves[index], index, 7, proof, fig.hash)


def test_rfc_figure_consistency_proofs() -> None:
    fig = Figure()
    expected = {
        3: (fig.hash0, [fig.c, fig.d, fig.g, fig.l]),
        4: (fig.hash1, [fig.l]),
        6: (fig.hash2, [fig.i, fig.j, fig.k]),
    }
    for old_size, (old_root, proof) in expected.items():
        assert consistency_proof(fig.leaves, old_size, 7) == proof
        assert verify_consistency(old_size, 7, old_root, fig.hash, proof)


def test_not_the_duplicate_last_node_tree() -> None:
    """CVE-2012-2459: duplicating an odd last node makes [a, b, c] and [a, b, c, c] share a root."""

    def duplicate_last_root(nodes: list[bytes]) -> bytes:
        while len(nodes) > 1:
            if len(nodes) % 2:
                nodes = [*nodes, nodes[-1]]
            nodes = [node_hash(nodes[i], nodes[i + 1]) for i in range(0, len(nodes), 2)]
        return nodes[0]

    a, b, c = leaf_hashes([b"a", b"b", b"c"])
    assert duplicate_last_root([a, b, c]) == duplicate_last_root([a, b, c, c])  # the ambiguity exists
    assert root([a, b, c]) == node_hash(node_hash(a, b), c)
    assert root([a, b, c]) != duplicate_last_root([a, b, c])
    assert root([a, b, c]) != root([a, b, c, c])


def test_a_leaf_cannot_pose_as_an_interior_node() -> None:
    a, b = leaf_hashes([b"a", b"b"])
    assert root([leaf_hash(a + b)]) != root([a, b])


# --- roots -------------------------------------------------------------------------------------------------


def test_root_matches_the_rfc_definition_for_every_size_to_300() -> None:
    data = entries(300)
    ref = Reference(data)
    hashes = leaf_hashes(data)
    for n in range(301):
        assert root(hashes[:n]) == ref.mth(0, n), n


@SETTINGS
@given(st.lists(st.binary(max_size=64), max_size=300))
def test_root_matches_the_rfc_definition_for_any_entries(data: list[bytes]) -> None:
    assert root(leaf_hashes(data)) == Reference(data).mth(0, len(data))


def test_root_refuses_values_that_are_not_hashes() -> None:
    with pytest.raises(ValidationError):
        root([b"short"])
    with pytest.raises(ValidationError):
        root([leaf_hash(b"a"), b"x" * 33])


def test_root_of_a_large_tree_matches_the_builder() -> None:
    hashes = leaf_hashes(entries(100_003))
    builder = TreeBuilder()
    builder.extend(hashes)
    assert builder.root() == root(hashes)


# --- the incremental builder -------------------------------------------------------------------------------


def test_builder_gives_the_root_at_every_size_and_survives_its_state() -> None:
    data = entries(300)
    ref = Reference(data)
    hashes = leaf_hashes(data)
    builder = TreeBuilder()
    assert builder.root() == EMPTY_ROOT
    assert builder.to_state() == (0, [])
    for n, leaf in enumerate(hashes, start=1):
        builder.append(leaf)
        assert builder.size == n
        assert len(builder.frontier) == n.bit_count()
        assert builder.root() == ref.mth(0, n) == root(hashes[:n])
        size, frontier = builder.to_state()
        builder = TreeBuilder.from_state(size, frontier)


@SETTINGS
@given(st.integers(0, 300), st.integers(0, 300), st.integers(0, 300))
def test_builder_resumes_across_batches(first: int, second: int, third: int) -> None:
    hashes = leaf_hashes(entries(first + second + third))
    builder = TreeBuilder()
    builder.extend(hashes[:first])
    state = builder.to_state()
    resumed = TreeBuilder.from_state(*state)
    resumed.extend(hashes[first : first + second])
    resumed = TreeBuilder.from_state(*resumed.to_state())
    resumed.extend(hashes[first + second :])
    assert resumed.root() == root(hashes)
    assert resumed.size == len(hashes)


def test_builder_state_is_validated() -> None:
    h = leaf_hash(b"a")
    with pytest.raises(ValidationError):
        TreeBuilder.from_state(3, [h])  # size 3 needs two subtrees
    with pytest.raises(ValidationError):
        TreeBuilder.from_state(-1, [])
    with pytest.raises(ValidationError):
        TreeBuilder.from_state(1, [b"short"])
    with pytest.raises(ValidationError):
        TreeBuilder().append(b"short")
    builder = TreeBuilder()
    with pytest.raises(ValidationError):
        builder.extend([h, h, h, b"short", h])
    assert builder.size == 3
    assert builder.root() == root([h, h, h])
    assert TreeBuilder.from_state(1, [h]).root() == h


# --- inclusion proofs --------------------------------------------------------------------------------------


def test_inclusion_proofs_match_the_rfc_for_every_leaf_of_every_tree_to_130() -> None:
    data = entries(130)
    ref = Reference(data)
    hashes = leaf_hashes(data)
    for n in range(1, 131):
        tree_root = ref.mth(0, n)
        for index in range(n):
            proof = inclusion_proof(hashes, index, n)
            assert proof == ref.path(index, 0, n), (index, n)
            assert verify_inclusion(hashes[index], index, n, proof, tree_root)


@SETTINGS
@given(st.data())
def test_altered_inclusion_proofs_fail(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 300), label="n")
    extra = 8
    hashes = leaf_hashes(entries(n + extra))
    leaves = hashes[:n]
    index = data.draw(st.integers(0, n - 1), label="index")
    tree_root = root(leaves)
    proof = inclusion_proof(leaves, index)
    leaf = leaves[index]
    assert proof == Reference(entries(n)).path(index, 0, n)
    assert verify_inclusion(leaf, index, n, proof, tree_root)

    assert not verify_inclusion(flip(leaf), index, n, proof, tree_root)
    assert not verify_inclusion(leaf, index, n, proof, flip(tree_root, data.draw(st.integers(0, 31))))
    if proof:
        at = data.draw(st.integers(0, len(proof) - 1), label="element")
        byte = data.draw(st.integers(0, 31), label="byte")
        flipped = [*proof[:at], flip(proof[at], byte), *proof[at + 1 :]]
        assert not verify_inclusion(leaf, index, n, flipped, tree_root)
        assert not verify_inclusion(leaf, index, n, proof[:at] + proof[at + 1 :], tree_root)
    at = data.draw(st.integers(0, len(proof)), label="insert at")
    added = data.draw(st.sampled_from([*proof, leaf, tree_root, bytes(32)]), label="added")
    assert not verify_inclusion(leaf, index, n, [*proof[:at], added, *proof[at:]], tree_root)
    if n > 1:
        other = data.draw(st.integers(0, n - 1).filter(lambda i: i != index), label="other index")
        assert not verify_inclusion(leaf, other, n, proof, tree_root)
    # A checkpoint binds its size to its root, so a wrong size comes with that size's root.
    size = data.draw(st.integers(index + 1, n + extra).filter(lambda s: s != n), label="other size")
    assert not verify_inclusion(leaf, index, size, proof, root(hashes[:size]))


def test_the_size_alone_is_not_bound_by_an_inclusion_proof() -> None:
    # Leaf 0 is hashed the same way in trees of 5 to 8 leaves, so a proof checks a (size, root) pair.
    hashes = leaf_hashes(entries(8))
    proof = inclusion_proof(hashes, 0, 5)
    assert verify_inclusion(hashes[0], 0, 5, proof, root(hashes[:5]))
    assert verify_inclusion(hashes[0], 0, 6, proof, root(hashes[:5]))
    assert not verify_inclusion(hashes[0], 0, 6, proof, root(hashes[:6]))


def test_inclusion_proof_against_an_earlier_size() -> None:
    hashes = leaf_hashes(entries(20))
    proof = inclusion_proof(hashes, 4, tree_size=11)
    assert proof == inclusion_proof(hashes[:11], 4)
    assert verify_inclusion(hashes[4], 4, 11, proof, root(hashes[:11]))


@pytest.mark.parametrize(("index", "size"), [(-1, None), (3, None), (0, 0), (0, 4), (True, None)])
def test_inclusion_proof_refuses_bad_arguments(index: int, size: int | None) -> None:
    with pytest.raises(ValidationError):
        inclusion_proof(leaf_hashes(entries(3)), index, size)


def test_single_leaf_tree_has_an_empty_inclusion_proof() -> None:
    h = leaf_hash(b"only")
    assert inclusion_proof([h], 0) == []
    assert verify_inclusion(h, 0, 1, [], h)
    assert not verify_inclusion(h, 0, 1, [h], h)


# --- consistency proofs ------------------------------------------------------------------------------------


def test_consistency_proofs_match_the_rfc_for_every_pair_of_sizes_to_130() -> None:
    data = entries(130)
    ref = Reference(data)
    hashes = leaf_hashes(data)
    for n in range(1, 131):
        new_root = ref.mth(0, n)
        for m in range(1, n + 1):
            proof = consistency_proof(hashes, m, n)
            assert proof == ref.proof(m, n), (m, n)
            assert verify_consistency(m, n, ref.mth(0, m), new_root, proof)


@SETTINGS
@given(st.data())
def test_altered_consistency_proofs_fail(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 130), label="n")
    m = data.draw(st.integers(1, n), label="m")
    extra = 8
    hashes = leaf_hashes(entries(n + extra))
    old_root, new_root = root(hashes[:m]), root(hashes[:n])
    proof = consistency_proof(hashes, m, n)
    assert verify_consistency(m, n, old_root, new_root, proof)

    byte = data.draw(st.integers(0, 31), label="byte")
    assert not verify_consistency(m, n, flip(old_root, byte), new_root, proof)
    assert not verify_consistency(m, n, old_root, flip(new_root, byte), proof)
    if proof:
        at = data.draw(st.integers(0, len(proof) - 1), label="element")
        flipped = [*proof[:at], flip(proof[at], byte), *proof[at + 1 :]]
        assert not verify_consistency(m, n, old_root, new_root, flipped)
        assert not verify_consistency(m, n, old_root, new_root, proof[:at] + proof[at + 1 :])
    at = data.draw(st.integers(0, len(proof)), label="insert at")
    added = data.draw(st.sampled_from([*proof, old_root, new_root, bytes(32)]), label="added")
    assert not verify_consistency(m, n, old_root, new_root, [*proof[:at], added, *proof[at:]])
    if m != n:
        assert not verify_consistency(m, n, new_root, old_root, proof)
        assert not verify_consistency(n, m, new_root, old_root, proof)
    # Wrong sizes come with those sizes' roots, as they would from a signed checkpoint.
    other_m = data.draw(st.integers(1, n).filter(lambda s: s != m) if n > 1 else st.none(), label="old size")
    if other_m is not None:
        assert not verify_consistency(other_m, n, root(hashes[:other_m]), new_root, proof)
    other_n = data.draw(st.integers(m, n + extra).filter(lambda s: s != n), label="new size")
    assert not verify_consistency(m, other_n, old_root, root(hashes[:other_n]), proof)


def test_trivial_and_degenerate_consistency() -> None:
    hashes = leaf_hashes(entries(5))
    r = root(hashes)
    assert consistency_proof(hashes, 5) == []
    assert verify_consistency(5, 5, r, r, [])
    assert not verify_consistency(5, 5, r, flip(r), [])
    assert not verify_consistency(5, 5, r, r, [r])
    assert not verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert not verify_consistency(0, 5, EMPTY_ROOT, r, [])
    assert not verify_consistency(3, 5, root(hashes[:3]), r, [])


@pytest.mark.parametrize(("old", "new"), [(0, 3), (-1, 3), (4, 3), (2, 6), (True, 3)])
def test_consistency_proof_refuses_bad_arguments(old: int, new: int) -> None:
    with pytest.raises(ValidationError):
        consistency_proof(leaf_hashes(entries(5)), old, new)


# --- proof lengths are enforced ----------------------------------------------------------------------------


def _k(n: int) -> int:
    return Reference._k(n)


def ref_path_len(m: int, n: int) -> int:
    """len(PATH(m, D[n])) by the RFC's recursion."""
    if n == 1:
        return 0
    k = _k(n)
    return 1 + (ref_path_len(m, k) if m < k else ref_path_len(m - k, n - k))


def ref_proof_len(m: int, n: int, b: bool = True) -> int:
    """len(SUBPROOF(m, D[n], b)) by the RFC's recursion."""
    if m == n:
        return 0 if b else 1
    k = _k(n)
    return 1 + (ref_proof_len(m, k, b) if m <= k else ref_proof_len(m - k, n - k, False))


def _shift_while_even(fn: int, sn: int) -> tuple[int, int]:
    while fn and not fn & 1:
        fn, sn = fn >> 1, sn >> 1
    return fn, sn


def lenient_inclusion_root(leaf: bytes, index: int, size: int, proof: list[bytes]) -> bytes:
    """The RFC 2.1.3.2 fold without its checks on ``sn``: what a proof of any length would hash to."""
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            fn, sn = _shift_while_even(fn, sn)
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return r


def lenient_consistency_roots(m: int, n: int, proof: list[bytes], old: bytes) -> tuple[bytes, bytes]:
    """The RFC 2.1.4.2 fold without its checks on ``sn``; ``old`` stands for the old root when needed."""
    path = [old, *proof] if m & (m - 1) == 0 else list(proof)
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            fn, sn = _shift_while_even(fn, sn)
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return fr, sr


hash32 = st.binary(min_size=32, max_size=32)


@SETTINGS
@given(st.integers(1, 2**20), st.data(), st.lists(hash32, max_size=24), hash32)
def test_inclusion_accepts_only_proofs_of_the_rfc_length(
    size: int, data: st.DataObject, proof: list[bytes], leaf: bytes
) -> None:
    # Without the checks on sn, a short proof would match an inner node and a long one a bigger tree.
    index = data.draw(st.integers(0, size - 1), label="index")
    r = lenient_inclusion_root(leaf, index, size, proof)
    assert verify_inclusion(leaf, index, size, proof, r) == (len(proof) == ref_path_len(index, size))


@SETTINGS
@given(st.integers(2, 2**20), st.data(), st.lists(hash32, min_size=1, max_size=24), hash32)
def test_consistency_accepts_only_proofs_of_the_rfc_length(
    new_size: int, data: st.DataObject, proof: list[bytes], old: bytes
) -> None:
    old_size = data.draw(st.integers(1, new_size - 1), label="old size")
    fr, sr = lenient_consistency_roots(old_size, new_size, proof, old)
    expected = len(proof) == ref_proof_len(old_size, new_size)
    assert verify_consistency(old_size, new_size, fr, sr, proof) == expected


def test_proofs_cut_at_an_inner_node_or_extended_past_the_root_fail() -> None:
    fig = Figure()
    assert not verify_inclusion(fig.a, 0, 7, [fig.b, fig.h], fig.k)
    hashes = leaf_hashes(entries(8))
    proof = inclusion_proof(hashes, 4)
    # Leaf 4's proof in 8 leaves, read as leaf 0 of a 4-leaf tree, would reach the 8-leaf root.
    assert lenient_inclusion_root(hashes[4], 0, 4, proof) == root(hashes)
    assert not verify_inclusion(hashes[4], 0, 4, proof, root(hashes))


# --- verifiers never raise ---------------------------------------------------------------------------------

junk = st.one_of(
    st.none(),
    st.integers(-(2**70), 2**70),
    st.binary(max_size=31),
    st.binary(min_size=33, max_size=40),
    st.text(max_size=5),
    st.lists(st.binary(max_size=40), max_size=5),
    st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=3)), max_size=3),
)


@SETTINGS
@given(junk, junk, junk, junk, junk)
def test_verifiers_answer_false_to_malformed_input(
    a: object, b: object, c: object, d: object, e: object
) -> None:
    assert verify_inclusion(a, b, c, d, e) is False  # type: ignore[arg-type]
    assert verify_consistency(a, b, c, d, e) is False  # type: ignore[arg-type]


@SETTINGS
@given(
    st.integers(-5, 40),
    st.integers(-5, 40),
    st.lists(st.binary(min_size=32, max_size=32), max_size=8),
)
def test_verifiers_answer_false_to_random_well_typed_input(x: int, y: int, proof: list[bytes]) -> None:
    h = leaf_hash(b"x")
    assert verify_inclusion(h, x, y, proof, bytes(32)) is False
    assert verify_consistency(x, y, h, bytes(32), proof) is False
