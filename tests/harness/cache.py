"""Where the harness keeps things that outlive one test session (Kafka jars, templates).

The folder is ``$CARACAL_TEST_CACHE`` when set, else ``~/.cache/caracal-test``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from filelock import FileLock

CACHE_ENV = "CARACAL_TEST_CACHE"


def cache_dir() -> Path:
    """Return the cache folder, creating it when missing."""
    raw = os.environ.get(CACHE_ENV)
    path = Path(raw).expanduser() if raw else Path.home() / ".cache" / "caracal-test"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


_locks: dict[Path, FileLock] = {}
_locks_guard = threading.Lock()


def cache_lock(name: str, *, timeout: float = 900.0) -> FileLock:
    """An inter-process lock named ``name`` inside the cache folder.

    One object per lock file and process, so the same thread may take it again while holding
    it. ``timeout`` is generous because the holder may be downloading jars from Maven Central.
    """
    path = cache_dir() / f"{name}.lock"
    with _locks_guard:
        lock = _locks.get(path)
        if lock is None:
            lock = _locks[path] = FileLock(str(path), timeout=timeout)
        return lock
