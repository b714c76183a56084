"""Signed checkpoints of the ledger's Merkle tree, as C2SP signed notes (c2sp.org/signed-note).

A checkpoint's body is five lines, each ending in a newline::

    <origin>
    <tree size in decimal>
    <root hash, standard base64>
    time <RFC 3339 UTC, e.g. 2025-01-02T03:04:05Z or 2025-01-02T03:04:05.123456Z>
    batch <batch id>

The note is the body, a blank line, then one line per signature::

    — <key name> <base64(4-byte key id || signature)>

Key ids are SHA-256(key name || 0x0A || type || public key)[:4] with type 0x01 for Ed25519 (32-byte
RFC 8032 key) and 0x02 for ECDSA P-256 with SHA-256 (33-byte compressed SEC 1 point, DER-encoded
signatures). Ed25519 notes are interoperable with other signed-note tools; ECDSA ones are not: C2SP's
type 0x02 takes its key id from the DER SubjectPublicKeyInfo instead, which would not bind the name.

Opening a note follows the spec: lines from unknown keys are ignored (so a note can carry the new key
and the old one while verifiers rotate), any one valid signature from a known key is enough, and an
invalid signature from a known key rejects the whole note.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from caracald.core.errors import ValidationError

KeyAlgorithm = Literal["ed25519", "ecdsa-p256"]
ALGORITHMS: tuple[KeyAlgorithm, ...] = ("ed25519", "ecdsa-p256")

_TYPE_BYTE: dict[KeyAlgorithm, int] = {"ed25519": 0x01, "ecdsa-p256": 0x02}
_ALGORITHM_OF_TYPE: dict[int, KeyAlgorithm] = {t: a for a, t in _TYPE_BYTE.items()}
_RAW_KEY_SIZE: dict[KeyAlgorithm, int] = {"ed25519": 32, "ecdsa-p256": 33}

ROOT_HASH_SIZE = 32
#: Tree sizes are unsigned 64-bit, as in C2SP tlog-checkpoint.
MAX_TREE_SIZE = 2**64 - 1
# The spec asks verifiers to cap signatures and accept at least 16; 100 matches the Go implementation.
MAX_SIGNATURES = 100
MAX_NOTE_CHARS = 1 << 20

_SIGNATURE_PREFIX = "— "
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")
_TIME = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{6}))?Z")
_SIGNATURE_LINE = re.compile(r"— ([^\s+]+) ([A-Za-z0-9+/=]+)")
_KEY_ID_HEX = re.compile(r"[0-9a-f]{8}")

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


class SignatureError(ValidationError):
    """A signed note that is malformed, signed by no known key, or carries a bad signature."""

    reason = "bad_signature"


def _check_text_line(what: str, value: object) -> str:
    if not isinstance(value, str) or not value or not value.isprintable():
        raise ValidationError(f"the {what} must be a non-empty line of printable text, not {value!r}")
    return value


def _check_key_name(name: object) -> str:
    if (
        not isinstance(name, str)
        or not name
        or not name.isprintable()
        or any(c.isspace() or c == "+" for c in name)
    ):
        raise ValidationError(f"a key name must be non-empty, without spaces or '+', not {name!r}")
    return name


def _check_algorithm(algorithm: object) -> KeyAlgorithm:
    for known in ALGORITHMS:
        if algorithm == known:
            return known
    raise ValidationError(f"unknown key algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")


def _b64decode_canonical(text: str) -> bytes:
    """Strict standard base64, refusing the alternative spellings of the same bytes."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValidationError(f"invalid base64: {exc}") from exc
    if base64.b64encode(data).decode("ascii") != text:
        raise ValidationError("base64 is not in canonical form")
    return data


def _format_time(t: datetime) -> str:
    # strftime does not zero-pad years before 1000 on every platform.
    text = f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
    if t.microsecond:
        text += f".{t.microsecond:06d}"
    return text + "Z"


def _parse_time(text: str) -> datetime:
    match = _TIME.fullmatch(text)
    if match is None:
        raise ValidationError(f"time {text!r} is not RFC 3339 UTC (YYYY-MM-DDTHH:MM:SS[.ffffff]Z)")
    year, month, day, hour, minute, second, micro = match.groups()
    try:
        return datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), int(micro or 0), tzinfo=UTC
        )
    except ValueError as exc:
        raise ValidationError(f"time {text!r} is not a valid instant: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A claim that the ledger named ``origin`` had ``tree_size`` events with Merkle root ``root_hash``.

    ``timestamp`` must be timezone-aware and is stored in UTC.
    """

    origin: str
    tree_size: int
    root_hash: bytes
    timestamp: datetime
    batch_id: str

    def __post_init__(self) -> None:
        _check_text_line("origin", self.origin)
        _check_text_line("batch id", self.batch_id)
        size = self.tree_size
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_TREE_SIZE:
            raise ValidationError(f"tree size {size!r} is not an integer between 0 and 2^64-1")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != ROOT_HASH_SIZE:
            raise ValidationError(f"a root hash must be {ROOT_HASH_SIZE} bytes")
        ts = self.timestamp
        if not isinstance(ts, datetime) or ts.utcoffset() is None:
            raise ValidationError(f"a checkpoint time must be timezone-aware, not {ts!r}")
        object.__setattr__(self, "timestamp", ts.astimezone(UTC))

    def body(self) -> bytes:
        """The canonical text the signatures cover."""
        return (
            f"{self.origin}\n"
            f"{self.tree_size}\n"
            f"{base64.b64encode(self.root_hash).decode('ascii')}\n"
            f"time {_format_time(self.timestamp)}\n"
            f"batch {self.batch_id}\n"
        ).encode()

    @classmethod
    def parse_body(cls, body: bytes) -> Checkpoint:
        """The checkpoint whose ``body()`` is exactly ``body``; anything else is a ValidationError."""
        try:
            text = body.decode("utf-8")
        except (UnicodeDecodeError, AttributeError) as exc:
            raise ValidationError("a checkpoint body must be UTF-8 bytes") from exc
        lines = text.split("\n")
        if len(lines) != 6 or lines[-1] != "":
            raise ValidationError("a checkpoint body is exactly five lines, each ending in a newline")
        origin, size_text, root_text, time_line, batch_line, _ = lines
        if _DECIMAL.fullmatch(size_text) is None:
            raise ValidationError(f"tree size {size_text!r} is not a decimal number")
        root_hash = _b64decode_canonical(root_text)
        if not time_line.startswith("time "):
            raise ValidationError("the fourth line of a checkpoint must start with 'time '")
        if not batch_line.startswith("batch "):
            raise ValidationError("the fifth line of a checkpoint must start with 'batch '")
        checkpoint = cls(
            origin=origin,
            tree_size=int(size_text),
            root_hash=root_hash,
            timestamp=_parse_time(time_line.removeprefix("time ")),
            batch_id=batch_line.removeprefix("batch "),
        )
        # One checkpoint, one spelling: e.g. a ".000000" fraction would re-render without it.
        if checkpoint.body() != body:
            raise ValidationError("the checkpoint body is not in canonical form")
        return checkpoint


def _raw_public_bytes(public_key: PublicKey) -> bytes:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def _check_key_matches(algorithm: KeyAlgorithm, key: object) -> None:
    if algorithm == "ed25519":
        ok = isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey)
    else:
        ok = isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and isinstance(
            key.curve, ec.SECP256R1
        )
    if not ok:
        raise ValidationError(f"the key given is not an {algorithm} key")


class VerifyingKey:
    """A named public key that checks signatures on checkpoints."""

    __slots__ = ("_algorithm", "_key_id", "_name", "_public_key", "_raw")

    def __init__(self, name: str, algorithm: KeyAlgorithm, public_key: PublicKey) -> None:
        self._name = _check_key_name(name)
        self._algorithm = _check_algorithm(algorithm)
        _check_key_matches(self._algorithm, public_key)
        self._public_key = public_key
        self._raw = _raw_public_bytes(public_key)
        type_byte = bytes([_TYPE_BYTE[self._algorithm]])
        self._key_id = hashlib.sha256(self._name.encode() + b"\n" + type_byte + self._raw).digest()[:4]

    @property
    def name(self) -> str:
        return self._name

    @property
    def algorithm(self) -> KeyAlgorithm:
        return self._algorithm

    @property
    def public_key(self) -> PublicKey:
        return self._public_key

    @property
    def key_id(self) -> bytes:
        """The 4-byte id that prefixes this key's signatures."""
        return self._key_id

    @property
    def key_id_hex(self) -> str:
        return self._key_id.hex()

    def verify(self, body: bytes, signature: bytes) -> bool:
        try:
            if isinstance(self._public_key, ed25519.Ed25519PublicKey):
                self._public_key.verify(signature, body)
            else:
                self._public_key.verify(signature, body, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def to_text(self) -> str:
        """``<name>+<key id hex>+<base64(type byte || public key)>``, a signed-note verifier key."""
        data = bytes([_TYPE_BYTE[self._algorithm]]) + self._raw
        return f"{self._name}+{self.key_id_hex}+{base64.b64encode(data).decode('ascii')}"

    @classmethod
    def from_text(cls, text: str) -> VerifyingKey:
        """Parse ``to_text()`` output; surrounding whitespace, such as a file's final newline, is ignored."""
        parts = text.strip().split("+", 2)
        if len(parts) != 3:
            raise ValidationError("a verifier key reads <name>+<key id>+<key data>")
        name, key_id_hex, key_data = parts
        if _KEY_ID_HEX.fullmatch(key_id_hex) is None:
            raise ValidationError(f"key id {key_id_hex!r} is not 8 lowercase hex digits")
        data = _b64decode_canonical(key_data)
        if not data or data[0] not in _ALGORITHM_OF_TYPE:
            raise ValidationError("the verifier key's type is not Ed25519 (0x01) or ECDSA P-256 (0x02)")
        algorithm = _ALGORITHM_OF_TYPE[data[0]]
        raw = data[1:]
        if len(raw) != _RAW_KEY_SIZE[algorithm]:
            raise ValidationError(f"an {algorithm} verifier key holds {_RAW_KEY_SIZE[algorithm]} key bytes")
        public_key: PublicKey
        try:
            if algorithm == "ed25519":
                public_key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
            else:
                if raw[0] not in (0x02, 0x03):
                    raise ValidationError("an ecdsa-p256 verifier key is a compressed point")
                public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ValidationError(f"invalid {algorithm} public key: {exc}") from exc
        key = cls(name, algorithm, public_key)
        if key.key_id_hex != key_id_hex:
            raise ValidationError(f"key id {key_id_hex} does not match the key, whose id is {key.key_id_hex}")
        return key

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VerifyingKey):
            return NotImplemented
        return (self._name, self._algorithm, self._raw) == (other._name, other._algorithm, other._raw)

    def __hash__(self) -> int:
        return hash((self._name, self._algorithm, self._raw))

    def __repr__(self) -> str:
        return f"VerifyingKey({self._name!r}, {self._algorithm!r}, id={self.key_id_hex})"


class SigningKey:
    """A named private key that signs checkpoints. Reading and writing key files is the caller's job."""

    __slots__ = ("_algorithm", "_name", "_private_key", "_public")

    def __init__(self, name: str, algorithm: KeyAlgorithm, private_key: PrivateKey) -> None:
        self._name = _check_key_name(name)
        self._algorithm = _check_algorithm(algorithm)
        _check_key_matches(self._algorithm, private_key)
        self._private_key = private_key
        self._public = VerifyingKey(self._name, self._algorithm, private_key.public_key())

    @property
    def name(self) -> str:
        return self._name

    @property
    def algorithm(self) -> KeyAlgorithm:
        return self._algorithm

    @property
    def key_id(self) -> bytes:
        return self._public.key_id

    @property
    def key_id_hex(self) -> str:
        return self._public.key_id_hex

    def sign(self, body: bytes) -> bytes:
        if isinstance(self._private_key, ed25519.Ed25519PrivateKey):
            return self._private_key.sign(body)
        return self._private_key.sign(body, ec.ECDSA(hashes.SHA256()))

    def public(self) -> VerifyingKey:
        return self._public

    def to_pem(self, password: bytes | None = None) -> bytes:
        """PKCS #8 PEM, encrypted when a password is given."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        )
        return self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    @classmethod
    def from_pem(cls, data: bytes, name: str, password: bytes | None = None) -> SigningKey:
        """Load a PEM private key; the algorithm follows from the key. PEM does not carry the name."""
        try:
            private_key = serialization.load_pem_private_key(data, password=password)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ValidationError(f"cannot load the signing key {name!r}: {exc}") from exc
        if isinstance(private_key, ed25519.Ed25519PrivateKey):
            return cls(name, "ed25519", private_key)
        if isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(
            private_key.curve, ec.SECP256R1
        ):
            return cls(name, "ecdsa-p256", private_key)
        raise ValidationError(f"the signing key {name!r} is neither Ed25519 nor ECDSA P-256")

    def __repr__(self) -> str:
        return f"SigningKey({self._name!r}, {self._algorithm!r}, id={self.key_id_hex})"


def generate_key(name: str, algorithm: KeyAlgorithm = "ed25519") -> SigningKey:
    algorithm = _check_algorithm(algorithm)
    private_key: PrivateKey
    if algorithm == "ed25519":
        private_key = ed25519.Ed25519PrivateKey.generate()
    else:
        private_key = ec.generate_private_key(ec.SECP256R1())
    return SigningKey(name, algorithm, private_key)


def sign_checkpoint(checkpoint: Checkpoint, key: SigningKey, *more_keys: SigningKey) -> str:
    """The signed note for ``checkpoint``; extra keys add signature lines (old and new key in a rotation)."""
    keys = (key, *more_keys)
    if len({(k.name, k.key_id) for k in keys}) != len(keys):
        raise ValidationError("a checkpoint is signed at most once by each key")
    body = checkpoint.body()
    lines = [
        f"{_SIGNATURE_PREFIX}{k.name} {base64.b64encode(k.key_id + k.sign(body)).decode('ascii')}\n"
        for k in keys
    ]
    return body.decode() + "\n" + "".join(lines)


def open_checkpoint(note: str, keys: Iterable[VerifyingKey]) -> Checkpoint:
    """Verify ``note`` against the trusted ``keys`` and return its checkpoint, or raise SignatureError.

    Signature lines are matched to keys by name and key id together. Lines from keys not in ``keys``
    are ignored; at least one must come from a known key and every known key's signature must verify.
    """
    if not isinstance(note, str):
        raise SignatureError("malformed note: not text")
    if len(note) > MAX_NOTE_CHARS:
        raise SignatureError(f"malformed note: longer than {MAX_NOTE_CHARS} characters")
    if any(c < " " and c != "\n" for c in note):
        raise SignatureError("malformed note: control characters other than newline")
    split = note.rfind("\n\n")
    if split < 0:
        raise SignatureError("malformed note: no blank line before the signatures")
    body = note[: split + 1].encode()
    block = note[split + 2 :]
    if not block.endswith("\n"):
        raise SignatureError("malformed note: the signatures must end with a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise SignatureError(f"malformed note: more than {MAX_SIGNATURES} signatures")

    trusted: dict[tuple[str, bytes], list[VerifyingKey]] = {}
    for key in keys:
        trusted.setdefault((key.name, key.key_id), []).append(key)

    verified = False
    unknown: list[str] = []
    for line in lines:
        match = _SIGNATURE_LINE.fullmatch(line)
        if match is None:
            raise SignatureError(f"malformed note: bad signature line {line[:80]!r}")
        name, encoded = match.groups()
        try:
            data = _b64decode_canonical(encoded)
        except ValidationError as exc:
            raise SignatureError(f"malformed note: signature by {name}: {exc.message}") from exc
        if len(data) < 5:
            raise SignatureError(f"malformed note: signature by {name} is too short")
        key_id, signature = data[:4], data[4:]
        candidates = trusted.get((name, key_id))
        if not candidates:
            unknown.append(f"{name}+{key_id.hex()}")
            continue
        # Key ids are short and may collide, so any trusted key with this name and id may match.
        if not any(k.verify(body, signature) for k in candidates):
            raise SignatureError(f"bad signature by key {name}+{key_id.hex()}")
        verified = True
    if not verified:
        raise SignatureError(f"no signature by a known key; signed by unknown key(s) {', '.join(unknown)}")
    try:
        return Checkpoint.parse_body(body)
    except ValidationError as exc:
        raise SignatureError(f"malformed note: {exc.message}") from exc
