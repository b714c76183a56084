"""Hashing packed entries (the verifier's fast path): the C extension and the pure-Python implementation
give the same answers, and both agree with hashing entry by entry."""

from __future__ import annotations

import struct
from collections.abc import Callable
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caracald.core import merkle
from caracald.core.errors import ValidationError
from caracald.core.merkle import PackedHashes, leaf_hash, leaf_hashes, packed_root, root

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PackedLeaves = Callable[[bytes, bytes, int, int], "tuple[bytes, bool] | None"]
IMPLEMENTATIONS: dict[str, tuple[PackedLeaves, Callable[[bytes], bytes]]] = {
    "python": (merkle._packed_leaf_hashes_py, merkle._packed_root_py),
}
if merkle.NATIVE:
    from caracald.core import _merkle_native

    IMPLEMENTATIONS["native"] = (_merkle_native.packed_leaf_hashes, _merkle_native.packed_root)


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request: pytest.FixtureRequest) -> tuple[PackedLeaves, Callable[[bytes], bytes]]:
    return IMPLEMENTATIONS[request.param]


def test_the_extension_is_built_where_the_tests_run() -> None:
    """``make setup`` builds it here (a C compiler and OpenSSL's headers are present): the fast path is what
    the benchmarks and the tests exercise, not only the fallback."""
    assert merkle.NATIVE


def pack(entries: list[bytes]) -> tuple[bytes, bytes]:
    return b"".join(struct.pack(">i", len(e)) for e in entries), b"".join(entries)


def ascending_keys(entries: list[bytes], key: slice) -> bool:
    keys = [e[key] for e in entries]
    long_enough = all(len(e) >= key.stop for e in entries)
    return long_enough and all(a < b for a, b in pairwise(keys))


@SETTINGS
@given(st.lists(st.binary(max_size=80), max_size=60), st.integers(0, 6), st.integers(0, 6))
def test_packed_leaf_hashes_are_the_entries_leaf_hashes(entries: list[bytes], start: int, width: int) -> None:
    key = slice(start, start + width)
    lengths, data = pack(entries)
    for packed_leaves, _ in IMPLEMENTATIONS.values():
        result = packed_leaves(lengths, data, key.start, key.stop)
        assert result is not None
        hashes, ascending = result
        assert hashes == b"".join(leaf_hashes(entries))
        assert ascending == ascending_keys(entries, key)


@SETTINGS
@given(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=20), st.data())
def test_lengths_that_do_not_add_up_are_refused(entries: list[bytes], data: st.DataObject) -> None:
    lengths, packed = pack(entries)
    broken = data.draw(
        st.sampled_from(
            [
                (lengths, packed[:-1]),  # the data ends early
                (lengths, packed + b"x"),  # bytes left over
                (lengths[:-1], packed),  # lengths not a multiple of 4
                (struct.pack(">i", -1) + lengths[4:], packed),  # a negative length
                (struct.pack(">i", len(packed) + 1) + lengths[4:], packed),  # past the end
            ]
        )
    )
    for packed_leaves, _ in IMPLEMENTATIONS.values():
        assert packed_leaves(*broken, 0, 1) is None


def test_no_entries_hash_to_nothing(impl: tuple[PackedLeaves, Callable[[bytes], bytes]]) -> None:
    assert impl[0](b"", b"", 0, 8) == (b"", True)


def test_a_bad_key_slice_is_an_error() -> None:
    if not merkle.NATIVE:
        pytest.skip("the extension is not built")
    with pytest.raises(ValueError, match="key slice"):
        _merkle_native.packed_leaf_hashes(b"", b"", 4, 2)


@SETTINGS
@given(st.lists(st.binary(max_size=16), min_size=1, max_size=300))
def test_packed_root_is_the_root(entries: list[bytes]) -> None:
    leaves = leaf_hashes(entries)
    for _, packed in IMPLEMENTATIONS.values():
        assert packed(b"".join(leaves)) == root(leaves)


@pytest.mark.parametrize("hashes", [b"", b"x" * 31, b"x" * 33])
def test_packed_root_wants_whole_hashes(
    impl: tuple[PackedLeaves, Callable[[bytes], bytes]], hashes: bytes
) -> None:
    with pytest.raises(ValueError, match="32-byte hashes"):
        impl[1](hashes)


def test_the_extension_reads_any_buffer() -> None:
    if not merkle.NATIVE:
        pytest.skip("the extension is not built")
    leaves = b"".join(leaf_hashes([b"a", b"b", b"c"]))
    assert _merkle_native.packed_root(memoryview(leaves)) == packed_root(leaves)
    lengths, data = pack([b"a", b"bc"])
    assert _merkle_native.packed_leaf_hashes(bytearray(lengths), memoryview(data), 0, 1) == (
        leaf_hash(b"a") + leaf_hash(b"bc"),
        True,
    )


def test_packed_hashes_read_as_a_sequence() -> None:
    leaves = leaf_hashes([b"a", b"b", b"c", b"d"])
    packed = PackedHashes(b"".join(leaves))
    assert len(packed) == 4
    assert list(packed) == leaves
    assert packed[-1] == leaves[-1]
    assert list(packed[1:3]) == leaves[1:3]
    assert list(packed[::2]) == leaves[::2]
    assert merkle.joined(packed) is packed.data
    assert merkle.joined(leaves) == packed.data
    with pytest.raises(IndexError):
        packed[4]
    with pytest.raises(ValidationError):
        PackedHashes(b"x" * 33)
