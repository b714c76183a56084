"""Checkpoints are signed notes: canonical bodies, stable key ids, strict verification and key rotation."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from caracald.core.errors import ValidationError
from caracald.core.signing import (
    Checkpoint,
    KeyAlgorithm,
    SignatureError,
    SigningKey,
    VerifyingKey,
    generate_key,
    open_checkpoint,
    sign_checkpoint,
)

ALGORITHMS: list[KeyAlgorithm] = ["ed25519", "ecdsa-p256"]
SEED = bytes(range(32))
ROOT = hashlib.sha256(b"root").digest()
T = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
ORIGIN = "caracal.example/ledger"


def checkpoint(**changes: object) -> Checkpoint:
    cp = Checkpoint(origin=ORIGIN, tree_size=7, root_hash=ROOT, timestamp=T, batch_id="b-0001")
    return dataclasses.replace(cp, **changes)  # type: ignore[arg-type]


def split_note(note: str) -> tuple[str, str]:
    body, _, signatures = note.partition("\n\n")
    return body + "\n", signatures


# --- the body ----------------------------------------------------------------------------------------------


def test_body_is_the_canonical_five_lines() -> None:
    b64 = base64.b64encode(ROOT).decode()
    assert checkpoint().body() == f"{ORIGIN}\n7\n{b64}\ntime 2025-01-02T03:04:05Z\nbatch b-0001\n".encode()
    micro = checkpoint(timestamp=T.replace(microsecond=120))
    assert b"time 2025-01-02T03:04:05.000120Z\n" in micro.body()
    assert b"time 0999-01-01T00:00:00Z\n" in checkpoint(timestamp=datetime(999, 1, 1, tzinfo=UTC)).body()


def test_timestamps_are_stored_in_utc() -> None:
    paris = timezone(timedelta(hours=1))
    cp = checkpoint(timestamp=datetime(2025, 1, 2, 4, 4, 5, tzinfo=paris))
    assert cp.timestamp == T
    assert cp.timestamp.tzinfo is UTC
    assert cp.body() == checkpoint().body()


@pytest.mark.parametrize(
    "changes",
    [
        {"timestamp": datetime(2025, 1, 2)},  # naive
        {"tree_size": -1},
        {"tree_size": 2**64},
        {"tree_size": True},
        {"root_hash": b"short"},
        {"origin": ""},
        {"origin": "two\nlines"},
        {"batch_id": ""},
        {"batch_id": "tab\there"},
    ],
)
def test_invalid_checkpoints_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        checkpoint(**changes)


line_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cc", "Cs", "Zl", "Zp"]), min_size=1, max_size=30
).filter(str.isprintable)


@settings(max_examples=200, deadline=None)
@given(
    origin=line_text,
    size=st.integers(0, 2**64 - 1),
    root_hash=st.binary(min_size=32, max_size=32),
    when=st.datetimes(timezones=st.just(UTC)),
    batch=line_text,
)
def test_bodies_round_trip(origin: str, size: int, root_hash: bytes, when: datetime, batch: str) -> None:
    cp = Checkpoint(origin=origin, tree_size=size, root_hash=root_hash, timestamp=when, batch_id=batch)
    assert Checkpoint.parse_body(cp.body()) == cp


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"\n7\n", b"\n07\n"),  # leading zero
        (b"\n7\n", b"\n+7\n"),
        (b"\n7\n", b"\n 7\n"),
        (b"05Z\n", b"05.000000Z\n"),  # a zero fraction has a shorter spelling
        (b"05Z\n", b"05+00:00\n"),
        (b"05Z\n", b"05z\n"),
        (b"time ", b"Time "),
        (b"batch ", b"batch:"),
        (b"=\n", b"\n"),  # unpadded base64
        (b"batch b-0001\n", b"batch b-0001\nextra\n"),
        (b"batch b-0001\n", b"batch b-0001"),
        (b"2025-01-02", b"2025-02-30"),
    ],
)
def test_non_canonical_bodies_are_refused(old: bytes, new: bytes) -> None:
    body = checkpoint().body()
    assert old in body
    with pytest.raises(ValidationError):
        Checkpoint.parse_body(body.replace(old, new, 1))


def test_a_root_hash_of_the_wrong_length_is_refused() -> None:
    body = checkpoint().body().replace(base64.b64encode(ROOT), base64.b64encode(ROOT[:31]))
    with pytest.raises(ValidationError):
        Checkpoint.parse_body(body)


# --- keys --------------------------------------------------------------------------------------------------


def test_key_ids_follow_the_signed_note_formula() -> None:
    ed = SigningKey("log.example/a", "ed25519", ed25519.Ed25519PrivateKey.from_private_bytes(SEED))
    raw = ed25519.Ed25519PrivateKey.from_private_bytes(SEED).public_key().public_bytes_raw()
    assert ed.key_id == hashlib.sha256(b"log.example/a\n\x01" + raw).digest()[:4]
    assert ed.key_id_hex == ed.public().key_id_hex == ed.key_id.hex()

    p256 = SigningKey("log.example/a", "ecdsa-p256", ec.derive_private_key(12345, ec.SECP256R1()))
    point = base64.b64decode(p256.public().to_text().split("+", 2)[2])
    assert len(point) == 34
    assert point[0] == 0x02  # the type byte
    assert point[1] in (2, 3)  # a compressed point
    assert p256.key_id == hashlib.sha256(b"log.example/a\n" + point).digest()[:4]


def test_key_ids_are_stable() -> None:
    key = SigningKey("log.example/a", "ed25519", ed25519.Ed25519PrivateKey.from_private_bytes(SEED))
    assert key.key_id_hex == "d870bab6"
    assert SigningKey.from_pem(key.to_pem(), "log.example/a").key_id == key.key_id
    assert SigningKey.from_pem(key.to_pem(), "log.example/b").key_id != key.key_id


def test_go_signed_note_vector() -> None:
    """golang.org/x/mod/sumdb/note's documented example: our Ed25519 notes interoperate."""
    vkey = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
    skey_data = base64.b64decode("AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz")
    text = (
        b"If you think cryptography is the answer to your problem,\n"
        b"then you don't know what your problem is.\n"
    )
    sig = "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="

    verifier = VerifyingKey.from_text(vkey)
    assert verifier.to_text() == vkey
    signed = base64.b64decode(sig)
    assert signed[:4] == verifier.key_id
    assert verifier.verify(text, signed[4:])
    assert not verifier.verify(text.replace(b"answer", b"question"), signed[4:])

    signer = SigningKey(
        "PeterNeumann", "ed25519", ed25519.Ed25519PrivateKey.from_private_bytes(skey_data[1:])
    )
    assert signer.public() == verifier
    assert base64.b64encode(signer.key_id + signer.sign(text)).decode() == sig


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_keys_round_trip_as_text_and_pem(algorithm: KeyAlgorithm) -> None:
    key = generate_key("caracal.example/ledger", algorithm)
    assert key.algorithm == algorithm
    public = key.public()
    assert VerifyingKey.from_text(public.to_text()) == public
    assert VerifyingKey.from_text(public.to_text() + "\n") == public
    assert "\n" not in public.to_text()
    reloaded = SigningKey.from_pem(key.to_pem(), key.name)
    assert reloaded.public() == public
    encrypted = key.to_pem(password=b"secret")
    assert SigningKey.from_pem(encrypted, key.name, password=b"secret").public() == public
    with pytest.raises(ValidationError):
        SigningKey.from_pem(encrypted, key.name, password=b"wrong")
    with pytest.raises(ValidationError):
        SigningKey.from_pem(encrypted, key.name)


def test_bad_key_texts_are_refused() -> None:
    good = generate_key("log.example/a").public().to_text()
    name, key_id, data = good.split("+", 2)
    other_id = f"{(int(key_id, 16) ^ 1):08x}"
    for text in [
        "",
        f"{name}+{key_id}",
        f"{name}+{other_id}+{data}",  # id does not match the key
        f"{name}+{key_id.upper()}+{data}",
        f"{name}+{key_id}+{data}=",
        f"{name}+{key_id}+ {data}",
        f"other.example+{key_id}+{data}",  # the id covers the name
        f"{name}+{key_id}+" + base64.b64encode(b"\x03" + bytes(32)).decode(),  # unknown type
        f"{name}+{key_id}+" + base64.b64encode(b"\x01" + bytes(31)).decode(),
        f"{name}+{key_id}+" + base64.b64encode(b"\x02" + b"\x04" + bytes(64)).decode(),  # uncompressed
        f"+{key_id}+{data}",
    ]:
        with pytest.raises(ValidationError):
            VerifyingKey.from_text(text)


@pytest.mark.parametrize("name", ["", "has space", "has+plus", "tab\t", "nbsp\u00a0"])
def test_bad_key_names_are_refused(name: str) -> None:
    with pytest.raises(ValidationError):
        generate_key(name)


def test_keys_must_match_their_algorithm() -> None:
    with pytest.raises(ValidationError):
        generate_key("a", "rsa")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        SigningKey("a", "ecdsa-p256", ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(ValidationError):
        SigningKey("a", "ecdsa-p256", ec.generate_private_key(ec.SECP384R1()))
    p384 = ec.generate_private_key(ec.SECP384R1())
    pem = p384.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValidationError):
        SigningKey.from_pem(pem, "a")
    with pytest.raises(ValidationError):
        SigningKey.from_pem(b"not a key", "a")


def test_repr_does_not_show_the_private_key() -> None:
    key = generate_key("log.example/a")
    assert repr(key) == f"SigningKey('log.example/a', 'ed25519', id={key.key_id_hex})"


# --- notes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_signed_checkpoints_round_trip(algorithm: KeyAlgorithm) -> None:
    key = generate_key("caracal.example/ledger", algorithm)
    cp = checkpoint(timestamp=T.replace(microsecond=987654))
    note = sign_checkpoint(cp, key)
    body, signatures = split_note(note)
    assert body.encode() == cp.body()
    assert signatures.startswith("— caracal.example/ledger ")
    assert signatures.endswith("\n")
    assert signatures.count("\n") == 1
    assert open_checkpoint(note, [key.public()]) == cp
    # What is signed is the body as bytes, with its final newline.
    signature = base64.b64decode(signatures.split(" ")[-1])
    assert signature[:4] == key.key_id
    assert key.public().verify(cp.body(), signature[4:])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "changes",
    [
        {"tree_size": 8},
        {"tree_size": 0},
        {"root_hash": hashlib.sha256(b"other").digest()},
        {"timestamp": T + timedelta(seconds=1)},
        {"timestamp": T + timedelta(microseconds=1)},
        {"batch_id": "b-0002"},
        {"origin": "caracal.example/other"},
    ],
)
def test_a_modified_body_fails(algorithm: KeyAlgorithm, changes: dict[str, object]) -> None:
    key = generate_key("caracal.example/ledger", algorithm)
    _, signatures = split_note(sign_checkpoint(checkpoint(), key))
    forged = checkpoint(**changes).body().decode() + "\n" + signatures
    with pytest.raises(SignatureError, match="bad signature"):
        open_checkpoint(forged, [key.public()])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_note_from_an_unknown_key_fails(algorithm: KeyAlgorithm) -> None:
    signer = generate_key("caracal.example/ledger", algorithm)
    note = sign_checkpoint(checkpoint(), signer)
    same_name = generate_key("caracal.example/ledger", algorithm).public()
    other_name = SigningKey.from_pem(signer.to_pem(), "caracal.example/other").public()
    for keys in ([], [same_name], [other_name]):
        with pytest.raises(SignatureError, match="no signature by a known key"):
            open_checkpoint(note, keys)


def test_a_bad_signature_from_a_known_key_rejects_the_note_even_beside_a_good_one() -> None:
    good, known = generate_key("log.example/a"), generate_key("log.example/b")
    note = sign_checkpoint(checkpoint(), good)
    forged_line = "— log.example/b " + base64.b64encode(known.key_id + bytes(64)).decode() + "\n"
    with pytest.raises(SignatureError, match=r"bad signature by key log\.example/b"):
        open_checkpoint(note + forged_line, [good.public(), known.public()])
    # A verifier that does not know log.example/b ignores that line.
    assert open_checkpoint(note + forged_line, [good.public()]) == checkpoint()


def test_signature_by_a_trusted_key_with_another_algorithm_fails() -> None:
    ed = generate_key("log.example/a", "ed25519")
    p256 = generate_key("log.example/a", "ecdsa-p256")
    note = sign_checkpoint(checkpoint(), ed)
    with pytest.raises(SignatureError):
        open_checkpoint(note, [p256.public()])


def test_rotation() -> None:
    old, new = generate_key("caracal.example/ledger"), generate_key("caracal.example/ledger", "ecdsa-p256")
    assert old.key_id != new.key_id
    cp = checkpoint()
    # A checkpoint signed before the rotation still opens for a verifier that trusts both keys.
    assert open_checkpoint(sign_checkpoint(cp, old), [new.public(), old.public()]) == cp
    # During the overlap the writer signs with both, so verifiers on either side accept it.
    both = sign_checkpoint(cp, new, old)
    assert both.count("\n— ") == 2
    assert open_checkpoint(both, [old.public()]) == cp
    assert open_checkpoint(both, [new.public()]) == cp
    assert open_checkpoint(both, [old.public(), new.public()]) == cp
    # After the rotation the old key is dropped and its signatures no longer count.
    with pytest.raises(SignatureError):
        open_checkpoint(sign_checkpoint(cp, old), [new.public()])
    with pytest.raises(ValidationError):
        sign_checkpoint(cp, old, old)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda n: n.replace("\n\n", "\n"),  # no blank line
        lambda n: n.rstrip("\n"),  # signature line without its newline
        lambda n: n + "\n",
        lambda n: n.replace("— ", "-- "),
        lambda n: n.replace("— ", "—"),
        lambda n: n.replace("=\n", "\n"),  # unpadded signature
        lambda n: n.replace("\n— ", "\n— \t"),
        lambda n: n + "— log.example/a AAAA\n",  # too short to hold a key id and a signature
        lambda n: n.replace("batch", "\x00batch"),
        lambda n: n.replace("\nbatch b-0001\n", "\n"),  # a body that is not a checkpoint
        lambda n: n.replace("\n\n", "\n\n\n"),
        lambda n: n + "— log.example/z AQIDBAU=\n" * 100,  # too many signatures
        lambda n: n.replace("\n\n", "\r\n\r\n"),
    ],
)
def test_malformed_notes_fail(mangle: object) -> None:
    key = generate_key("log.example/a")
    note = sign_checkpoint(checkpoint(), key)
    mangled = mangle(note)  # type: ignore[operator]
    assert mangled != note
    with pytest.raises(SignatureError):
        open_checkpoint(mangled, [key.public()])


def test_a_malformed_body_under_a_valid_signature_fails() -> None:
    key = generate_key("log.example/a")
    body = b"not\na\ncheckpoint\n"
    signature = base64.b64encode(key.key_id + key.sign(body)).decode()
    note = body.decode() + f"\n— log.example/a {signature}\n"
    with pytest.raises(SignatureError, match="malformed note"):
        open_checkpoint(note, [key.public()])


def test_open_checkpoint_refuses_non_text() -> None:
    with pytest.raises(SignatureError):
        open_checkpoint(b"bytes", [])  # type: ignore[arg-type]


def test_signature_error_is_a_validation_error() -> None:
    assert issubclass(SignatureError, ValidationError)
    assert SignatureError.reason != ValidationError.reason
