"""Request ids: random (version 4) UUIDs drawn from a buffer of the kernel's random bytes.

``uuid.uuid4()`` asks the kernel for 16 bytes each time, a system call per request; here one call fetches
4 KiB, enough for 256 ids. The bytes are the same ``os.urandom`` ones, so the ids are as unpredictable. A
forked child starts with an empty buffer (it must not hand out its parent's ids again).
"""

from __future__ import annotations

import os
import uuid
from typing import Final

_BATCH: Final = 4096
_buffer = b""
_offset = 0


def _forget() -> None:
    global _buffer, _offset
    _buffer, _offset = b"", 0


os.register_at_fork(after_in_child=_forget)


def new_request_id() -> uuid.UUID:
    global _buffer, _offset
    if _offset + 16 > len(_buffer):
        _buffer, _offset = os.urandom(_BATCH), 0
    raw = _buffer[_offset : _offset + 16]
    _offset += 16
    return uuid.UUID(bytes=raw, version=4)
