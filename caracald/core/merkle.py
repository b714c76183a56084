"""The Certificate Transparency Merkle tree of RFC 9162 section 2.1, over the ledger's events.

Every function works on *leaf hashes* (``leaf_hash(entry)``), never on raw entries, so a caller hashes
each event once and reuses the result for roots and proofs.

The tree is the RFC's, not the "duplicate the last node" tree: for ``n`` leaves the left subtree holds
the largest power of two strictly less than ``n`` and an unpaired right node is promoted unchanged. The
0x00/0x01 prefixes separate leaves from interior nodes, so no two different ledgers share a root
(the duplicate-node tree gives ``[a, b, c]`` and ``[a, b, c, c]`` the same root, CVE-2012-2459).

Proof generators raise :class:`ValidationError` on bad arguments; verifiers never raise and answer False
for anything malformed.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from itertools import accumulate
from typing import overload

from caracald.core.errors import ValidationError

HASH_SIZE = 32

#: MTH({}) = SHA-256 of the empty string.
EMPTY_ROOT = hashlib.sha256(b"").digest()

# Copying a hasher already fed with the prefix is markedly cheaper than building a new one per call
# (OpenSSL 3 looks the digest up on every construction) and avoids concatenating the prefix.
_LEAF_PREFIX = hashlib.sha256(b"\x00")
_NODE_PREFIX = hashlib.sha256(b"\x01")


def leaf_hash(entry: bytes) -> bytes:
    """SHA-256(0x00 || entry)."""
    h = _LEAF_PREFIX.copy()
    h.update(entry)
    return h.digest()


def leaf_hashes(entries: Iterable[bytes]) -> list[bytes]:
    """``leaf_hash`` of each entry, in order; the fast path for hashing a whole ledger."""
    out: list[bytes] = []
    append = out.append
    new = _LEAF_PREFIX.copy
    for entry in entries:
        h = new()
        h.update(entry)
        append(h.digest())
    return out


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    h = _NODE_PREFIX.copy()
    h.update(left)
    h.update(right)
    return h.digest()


def _packed_leaf_hashes_py(
    lengths: bytes, data: bytes, key_start: int, key_end: int
) -> tuple[bytes, bool] | None:
    n, rest = divmod(len(lengths), 4)
    if rest:
        return None
    sizes = struct.unpack(f">{n}i", lengths)
    if n and min(sizes) < 0:
        return None
    ends = list(accumulate(sizes))
    if (ends[-1] if ends else 0) != len(data):
        return None
    entries = [data[a:b] for a, b in zip([0, *ends][:-1], ends, strict=True)]
    keys = [entry[key_start:key_end] for entry in entries]
    ascending = all(size >= key_end for size in sizes) and all(map(bytes.__lt__, keys, keys[1:]))
    return b"".join(leaf_hashes(entries)), ascending


def _packed_root_py(hashes: bytes) -> bytes:
    if not hashes or len(hashes) % HASH_SIZE:
        raise ValueError(f"leaf hashes must be a non-empty run of {HASH_SIZE}-byte hashes")
    return _fold([hashes[i : i + HASH_SIZE] for i in range(0, len(hashes), HASH_SIZE)])


try:
    from caracald.core._merkle_native import packed_leaf_hashes as _packed_leaf_hashes
    from caracald.core._merkle_native import packed_root as _packed_root

    NATIVE = True
except ImportError:  # not built (no compiler or OpenSSL headers where it was installed): same results, slower
    _packed_leaf_hashes, _packed_root = _packed_leaf_hashes_py, _packed_root_py
    NATIVE = False


def packed_leaf_hashes(lengths: bytes, data: bytes, key: slice) -> tuple[bytes, bool] | None:
    """The leaf hashes of entries stored back to back in ``data``, whose sizes are the big-endian 32-bit
    integers of ``lengths``: all of them in one ``bytes`` (32 each, in order), and whether every entry holds
    ``key`` (a ``slice(start, end)``) and those keys strictly increase, compared as bytes. None when the
    lengths do not add up to ``data`` (a negative one, too many, too few).

    In C when the extension is built: 0.37 ms per 1,000 entries of 430 bytes, against 1.5 ms for splitting
    them and hashing each in Python.
    """
    return _packed_leaf_hashes(lengths, data, key.start, key.stop)


def packed_root(hashes: bytes) -> bytes:
    """MTH over leaf hashes given back to back (a positive multiple of 32 bytes), as :func:`root`."""
    return _packed_root(hashes)


class PackedHashes(Sequence[bytes]):
    """32-byte hashes stored back to back, read as a sequence of ``bytes`` (each made when asked for)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        if len(data) % HASH_SIZE:
            raise ValidationError(f"packed hashes must be a multiple of {HASH_SIZE} bytes long")
        self.data = data

    def __len__(self) -> int:
        return len(self.data) // HASH_SIZE

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> PackedHashes: ...

    def __getitem__(self, index: int | slice) -> bytes | PackedHashes:
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                return PackedHashes(b"".join(self[i] for i in range(start, stop, step)))
            return PackedHashes(self.data[start * HASH_SIZE : max(start, stop) * HASH_SIZE])
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("hash index out of range")
        return self.data[index * HASH_SIZE : (index + 1) * HASH_SIZE]


def joined(hashes: Sequence[bytes]) -> bytes:
    """The hashes back to back (as :class:`PackedHashes` keeps them)."""
    return hashes.data if isinstance(hashes, PackedHashes) else b"".join(hashes)


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes | bytearray) and len(value) == HASH_SIZE


def _split(n: int) -> int:
    """The largest power of two strictly less than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_leaf_hashes(leaves: Sequence[bytes]) -> None:
    if any(length != HASH_SIZE for length in set(map(len, leaves))):
        raise ValidationError(f"every leaf hash must be {HASH_SIZE} bytes")


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over the given leaf hashes (in C when the extension is built, see :func:`packed_root`)."""
    if not leaf_hashes:
        return EMPTY_ROOT
    _check_leaf_hashes(leaf_hashes)
    if len(leaf_hashes) == 1:
        return bytes(leaf_hashes[0])
    return _packed_root(joined(leaf_hashes))


def _fold(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over one or more leaf hashes, in Python.

    Folds level by level: pairing neighbours and promoting an odd last node unchanged builds exactly
    the RFC's tree, with about ``n`` hashes, ``O(n)`` memory and no recursion.
    """
    level: Sequence[bytes] = leaf_hashes
    new = _NODE_PREFIX.copy
    while len(level) > 1:
        pairs = iter(level)
        parents: list[bytes] = []
        append = parents.append
        for left, right in zip(pairs, pairs, strict=False):
            h = new()
            h.update(left)
            h.update(right)
            append(h.digest())
        if len(level) & 1:
            append(level[-1])
        level = parents
    return bytes(level[0])


class TreeBuilder:
    """Extends a tree one leaf hash at a time, keeping only its frontier.

    The frontier is the roots of the perfect subtrees the current size decomposes into, largest
    (leftmost) first: one per set bit of the size, so at most 64 hashes for any realistic ledger. A
    writer persists ``to_state()`` with each checkpoint and resumes with ``from_state()`` without
    re-reading old leaves.
    """

    __slots__ = ("_frontier", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._frontier: list[bytes] = []

    @property
    def size(self) -> int:
        return self._size

    @property
    def frontier(self) -> tuple[bytes, ...]:
        return tuple(self._frontier)

    def append(self, leaf_hash: bytes) -> None:
        if not _is_hash(leaf_hash):
            raise ValidationError(f"a leaf hash must be {HASH_SIZE} bytes")
        node = bytes(leaf_hash)
        frontier = self._frontier
        # Each trailing one bit of the old size is a perfect subtree the new leaf completes.
        carry = self._size
        while carry & 1:
            node = node_hash(frontier.pop(), node)
            carry >>= 1
        frontier.append(node)
        self._size += 1

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """``append`` each leaf hash; on a bad one, the leaves before it stay appended."""
        # append() inlined: a verifier streams a whole ledger through here in O(log n) memory.
        frontier = self._frontier
        new = _NODE_PREFIX.copy
        size = self._size
        try:
            for leaf in leaf_hashes:
                if not _is_hash(leaf):
                    raise ValidationError(f"a leaf hash must be {HASH_SIZE} bytes")
                node = bytes(leaf)
                carry = size
                while carry & 1:
                    h = new()
                    h.update(frontier.pop())
                    h.update(node)
                    node = h.digest()
                    carry >>= 1
                frontier.append(node)
                size += 1
        finally:
            self._size = size

    def root(self) -> bytes:
        """MTH of the leaves appended so far, in ``O(log n)`` hashes."""
        if not self._frontier:
            return EMPTY_ROOT
        # Smaller subtrees sit to the right, so folding right to left reproduces the RFC's splits.
        acc = self._frontier[-1]
        for subtree in reversed(self._frontier[:-1]):
            acc = node_hash(subtree, acc)
        return acc

    def to_state(self) -> tuple[int, list[bytes]]:
        """``(size, frontier)`` to persist; the frontier is largest subtree first."""
        return self._size, list(self._frontier)

    @classmethod
    def from_state(cls, size: int, frontier: Sequence[bytes]) -> TreeBuilder:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValidationError("a tree size must be a non-negative integer")
        if len(frontier) != size.bit_count():
            raise ValidationError(
                f"a tree of size {size} has {size.bit_count()} frontier hashes, not {len(frontier)}"
            )
        if not all(_is_hash(h) for h in frontier):
            raise ValidationError(f"every frontier hash must be {HASH_SIZE} bytes")
        builder = cls()
        builder._size = size
        builder._frontier = [bytes(h) for h in frontier]
        return builder


def _tree_size(leaf_hashes: Sequence[bytes], tree_size: int | None) -> int:
    if tree_size is None:
        return len(leaf_hashes)
    if (
        isinstance(tree_size, bool)
        or not isinstance(tree_size, int)
        or not 0 <= tree_size <= len(leaf_hashes)
    ):
        raise ValidationError(f"tree size {tree_size!r} is not between 0 and {len(leaf_hashes)}")
    return tree_size


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int, tree_size: int | None = None) -> list[bytes]:
    """PATH(index, D[tree_size]) of RFC 9162 2.1.3.1, deepest sibling first.

    ``tree_size`` proves against an earlier checkpoint of a ledger that has grown since; it defaults
    to every leaf given. Costs ``O(tree_size)`` hashes.
    """
    n = _tree_size(leaf_hashes, tree_size)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
        raise ValidationError(f"leaf index {index!r} is not in a tree of size {n}")
    path: list[bytes] = []
    lo, hi = 0, n
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(root(leaf_hashes[lo + k : hi]))
            hi = lo + k
        else:
            path.append(root(leaf_hashes[lo : lo + k]))
            lo += k
    path.reverse()
    return path


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 2.1.3.2: whether ``proof`` shows ``leaf_hash`` at ``index`` in the tree ``root``.

    The proof binds the pair (``tree_size``, ``root``), not the size alone: take both from one signed
    checkpoint. (Some sizes share a proof shape: leaf 0 hashes the same way in trees of 5 to 8 leaves.)
    """
    if not (_is_hash(leaf_hash) and _is_hash(root)):
        return False
    if not (isinstance(index, int) and isinstance(tree_size, int)) or not 0 <= index < tree_size:
        return False
    try:
        path = list(proof)
    except TypeError:
        return False
    if not all(_is_hash(p) for p in path):
        return False
    fn, sn = index, tree_size - 1
    r = bytes(leaf_hash)
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def consistency_proof(
    leaf_hashes: Sequence[bytes], old_size: int, new_size: int | None = None
) -> list[bytes]:
    """PROOF(old_size, D[new_size]) of RFC 9162 2.1.4.1, deepest node first.

    ``new_size`` defaults to every leaf given. Equal sizes give the empty proof; ``old_size`` 0 is
    refused, as the RFC defines no proof from the empty tree. Costs ``O(new_size)`` hashes.
    """
    n = _tree_size(leaf_hashes, new_size)
    if isinstance(old_size, bool) or not isinstance(old_size, int) or not 0 < old_size <= n:
        raise ValidationError(f"old tree size {old_size!r} is not between 1 and {n}")
    path: list[bytes] = []
    lo, hi, m = 0, n, old_size
    # True while the subtree being split starts at leaf 0: if it then ends at old_size it is the old
    # tree itself, whose root the verifier already holds, so it is not sent.
    old_root_known = True
    while True:
        if m == hi - lo:
            if not old_root_known:
                path.append(root(leaf_hashes[lo:hi]))
            break
        k = _split(hi - lo)
        if m <= k:
            path.append(root(leaf_hashes[lo + k : hi]))
            hi = lo + k
        else:
            path.append(root(leaf_hashes[lo : lo + k]))
            lo += k
            m -= k
            old_root_known = False
    path.reverse()
    return path


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 2.1.4.2: whether the tree ``new_root`` extends the tree ``old_root``.

    Equal sizes are consistent exactly when the proof is empty and the roots are equal. Size 0 is
    always False: a caller whose previous checkpoint is the empty ledger has nothing to check.
    """
    if not (_is_hash(old_root) and _is_hash(new_root)):
        return False
    if not (isinstance(old_size, int) and isinstance(new_size, int)) or not 0 < old_size <= new_size:
        return False
    try:
        path = list(proof)
    except TypeError:
        return False
    if not all(_is_hash(p) for p in path):
        return False
    if old_size == new_size:
        return not path and old_root == new_root
    if not path:
        return False
    if old_size & (old_size - 1) == 0:
        path.insert(0, bytes(old_root))
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = bytes(path[0])
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root
