"""Checkpoint signing keys: files in ``integrity.key_dir``, public halves in ``merkle_keys``, rotation.

Layout of the key folder (mode 0700)::

    <name>.key   PKCS #8 PEM private key, mode 0600 -- only the active key has one
    <name>.pub   its signed-note verifier key (``<name>+<key id>+<base64>``), kept forever
    active       the name of the key that signs new checkpoints

Every ``.pub`` file is a key the verifier trusts, so checkpoints signed before a rotation stay
verifiable. Rotation writes a new key, records its public half, retires the old one in ``merkle_keys``
and audits it, all in one transaction; then it switches ``active`` and deletes the old private key.
Private keys are never written to the database or to logs.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from psycopg.rows import dict_row, tuple_row

from caracald.admin.common import audit
from caracald.core.audit import AuditEventType
from caracald.core.errors import ConflictError, NotFoundError, ValidationError
from caracald.core.signing import KeyAlgorithm, SigningKey, VerifyingKey, generate_key
from caracald.integrity.batches import AnyConnection
from caracald.store.database import Database

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
ACTIVE_FILE = "active"
NAME_PREFIX = "caracal-ledger"


class KeyFileError(ValidationError):
    """A key file that is missing, unreadable or unsafe."""

    reason = "bad_key"


def new_key_name(at: datetime | None = None) -> str:
    """``caracal-ledger-20250115T103000Z-1a2b``: sortable, unique, fit for a note key name and a file name."""
    at = (at or datetime.now(UTC)).astimezone(UTC)
    return f"{NAME_PREFIX}-{at:%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def check_key_name(name: str) -> str:
    """A key name is also a file name: letters, digits, ``.``, ``_`` and ``-``, at most 200."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise KeyFileError(f"key name {name!r} must be letters, digits, '.', '_' or '-' (at most 200)")
    return name


def _private_path(key_dir: Path, name: str) -> Path:
    return key_dir / f"{check_key_name(name)}{PRIVATE_SUFFIX}"


def _public_path(key_dir: Path, name: str) -> Path:
    return key_dir / f"{check_key_name(name)}{PUBLIC_SUFFIX}"


def _ensure_dir(key_dir: Path) -> None:
    if not key_dir.exists():
        key_dir.mkdir(mode=0o700, parents=True)
    elif not key_dir.is_dir():
        raise KeyFileError(f"key folder {key_dir} is not a folder")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with exactly ``mode`` (never readable by others first); refuse to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never wider than asked
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    _write_new(tmp, data, mode)
    os.replace(tmp, path)


def write_key_files(key_dir: Path, key: SigningKey) -> tuple[Path, Path]:
    """Write ``<name>.key`` (0600) and ``<name>.pub`` (0644) for a new key. Does not activate it."""
    _ensure_dir(key_dir)
    private = _private_path(key_dir, key.name)
    public = _public_path(key_dir, key.name)
    try:
        _write_new(private, key.to_pem(), 0o600)
    except FileExistsError:
        raise ConflictError(f"key file {private} already exists") from None
    try:
        _write_new(public, (key.public().to_text() + "\n").encode(), 0o644)
    except BaseException:
        private.unlink(missing_ok=True)
        raise
    return private, public


def active_name(key_dir: Path) -> str | None:
    path = key_dir / ACTIVE_FILE
    try:
        name = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None
    return name or None


def _set_active(key_dir: Path, name: str) -> None:
    _replace(key_dir / ACTIVE_FILE, (name + "\n").encode(), 0o644)


def load_signing_key(key_dir: Path, name: str | None = None) -> SigningKey:
    """The active signing key (or the one named). Refuses a private key file others can read."""
    name = name or active_name(key_dir)
    if name is None:
        raise NotFoundError(
            f"no signing key in {key_dir}: create one with 'caracal merkle generate-key' "
            "(or set integrity.key_dir)"
        )
    path = _private_path(key_dir, name)
    try:
        info = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"signing key file {path} not found") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc.strerror}") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise KeyFileError(
            f"signing key {path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it"
        )
    return SigningKey.from_pem(data, name)


def load_public_key_file(path: Path) -> VerifyingKey:
    """A verifier key file: ``<name>+<key id>+<base64>`` on one line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc.strerror}") from None
    try:
        return VerifyingKey.from_text(text)
    except ValidationError as exc:
        raise KeyFileError(f"{path} is not a public key: {exc.message}") from None


def trusted_keys(key_dir: Path) -> list[VerifyingKey]:
    """Every public key in the key folder, current and retired: the keys verification trusts."""
    if not key_dir.is_dir():
        return []
    return [load_public_key_file(p) for p in sorted(key_dir.glob(f"*{PUBLIC_SUFFIX}"))]


class ActiveSigningKey:
    """The active key of a folder, re-read when ``active`` changes (a daemon's view across rotations)."""

    def __init__(self, key_dir: Path) -> None:
        self.key_dir = key_dir
        self._stamp: tuple[int, int] | None = None
        self._key: SigningKey | None = None

    def get(self) -> SigningKey:
        info = (self.key_dir / ACTIVE_FILE).stat()
        stamp = (info.st_mtime_ns, info.st_ino)
        if self._key is None or stamp != self._stamp:
            self._key = load_signing_key(self.key_dir)
            self._stamp = stamp
        return self._key


# --------------------------------------------------------------------------- the merkle_keys table


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_name: str
    key_id: str
    algorithm: str
    public_key: str
    created_at: datetime
    retired_at: datetime | None

    @property
    def active(self) -> bool:
        return self.retired_at is None

    def verifying_key(self) -> VerifyingKey:
        return VerifyingKey.from_text(self.public_key)


def _record(row: dict[str, Any]) -> KeyRecord:
    return KeyRecord(
        row["key_name"],
        row["key_id"],
        row["algorithm"],
        row["public_key"],
        row["created_at"],
        row["retired_at"],
    )


def key_history(conn: AnyConnection) -> list[KeyRecord]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute("SELECT * FROM merkle_keys ORDER BY created_at, key_name").fetchall()
    return [_record(r) for r in rows]


def register(conn: AnyConnection, key: VerifyingKey, at: datetime) -> None:
    """Record a public key (no-op when it is already recorded)."""
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            """
            INSERT INTO merkle_keys (key_name, key_id, algorithm, public_key, created_at)
            VALUES (%s, %s, %s, %s, %s) ON CONFLICT (key_name, key_id) DO NOTHING
            """,
            (key.name, key.key_id_hex, key.algorithm, key.to_text(), at),
        )


def check_signing_key(conn: AnyConnection, key: SigningKey) -> None:
    """Refuse to sign with a key that is not the recorded, unretired one."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(
            "SELECT retired_at FROM merkle_keys WHERE key_name = %s AND key_id = %s AND public_key = %s",
            (key.name, key.key_id_hex, key.public().to_text()),
        ).fetchone()
    if row is None:
        raise ConflictError(
            f"signing key {key.name} ({key.key_id_hex}) is not recorded in merkle_keys: "
            "create keys with 'caracal merkle generate-key'"
        )
    if row[0] is not None:
        raise ConflictError(
            f"signing key {key.name} ({key.key_id_hex}) was retired at {row[0]:%Y-%m-%dT%H:%M:%SZ}: "
            "load the active key"
        )


# --------------------------------------------------------------------------- use cases


@dataclass(frozen=True, slots=True)
class NewKey:
    key: VerifyingKey
    private_path: Path
    public_path: Path
    retired: VerifyingKey | None = None


def generate(
    db: Database,
    key_dir: Path,
    *,
    actor: str,
    algorithm: KeyAlgorithm = "ed25519",
    name: str | None = None,
    at: datetime | None = None,
) -> NewKey:
    """Create the first signing key (refused when one is active: rotate it instead)."""
    at = at or datetime.now(UTC)
    current = active_name(key_dir)
    if current is not None:
        raise ConflictError(f"signing key {current} is active in {key_dir}: use 'caracal merkle rotate-keys'")
    key = generate_key(name or new_key_name(at), algorithm)
    private, public = write_key_files(key_dir, key)
    try:
        with db.transaction() as conn:
            if any(r.active for r in key_history(conn)):
                raise ConflictError(
                    "the database records an active signing key that is not in this key folder: "
                    "point integrity.key_dir at its folder, or rotate there"
                )
            register(conn, key.public(), at)
            audit(
                conn,
                actor=actor,
                event_type=AuditEventType.CREDENTIAL,
                action="merkle.generate_key",
                at=at,
                subject_id=key.key_id_hex,
                details={"key_name": key.name, "key_id": key.key_id_hex, "algorithm": key.algorithm},
            )
    except BaseException:
        private.unlink(missing_ok=True)
        public.unlink(missing_ok=True)
        raise
    _set_active(key_dir, key.name)
    return NewKey(key.public(), private, public)


def rotate(
    db: Database,
    key_dir: Path,
    *,
    actor: str,
    algorithm: KeyAlgorithm | None = None,
    reason: str | None = None,
    at: datetime | None = None,
) -> NewKey:
    """Replace the active key by a new one (new key id); the old public key stays trusted for old checkpoints.

    The old private key file is deleted: after a rotation nothing can sign as the old key.
    """
    at = at or datetime.now(UTC)
    old = load_signing_key(key_dir)
    key = generate_key(new_key_name(at), algorithm or old.algorithm)
    private, public = write_key_files(key_dir, key)
    try:
        with db.transaction() as conn:
            check_signing_key(conn, old)
            with conn.cursor(row_factory=tuple_row) as cur:
                cur.execute(
                    "UPDATE merkle_keys SET retired_at = %s WHERE key_name = %s AND key_id = %s",
                    (at, old.name, old.key_id_hex),
                )
            register(conn, key.public(), at)
            audit(
                conn,
                actor=actor,
                event_type=AuditEventType.CREDENTIAL,
                action="merkle.rotate_keys",
                at=at,
                subject_id=key.key_id_hex,
                reason=reason,
                details={
                    "key_name": key.name,
                    "key_id": key.key_id_hex,
                    "algorithm": key.algorithm,
                    "retired_key_name": old.name,
                    "retired_key_id": old.key_id_hex,
                },
            )
    except BaseException:
        private.unlink(missing_ok=True)
        public.unlink(missing_ok=True)
        raise
    _set_active(key_dir, key.name)
    with contextlib.suppress(FileNotFoundError):
        _private_path(key_dir, old.name).unlink()
    return NewKey(key.public(), private, public, retired=old.public())


def public_key_text(key_dir: Path, name: str | None = None) -> str:
    """The verifier key text of the active key (or of the key named), from its ``.pub`` file."""
    name = name or active_name(key_dir)
    if name is None:
        raise NotFoundError(f"no signing key in {key_dir}: create one with 'caracal merkle generate-key'")
    return load_public_key_file(_public_path(key_dir, name)).to_text()
