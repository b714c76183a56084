"""Where the harness keeps things that outlive one test session (Kafka jars, templates).

The folder is ``$CARACAL_TEST_CACHE`` when set, else ``~/.cache/caracal-test``.
"""

from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock

CACHE_ENV = "CARACAL_TEST_CACHE"


def cache_dir() -> Path:
    """Return the cache folder, creating it when missing."""
    raw = os.environ.get(CACHE_ENV)
    path = Path(raw).expanduser() if raw else Path.home() / ".cache" / "caracal-test"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def cache_lock(name: str, *, timeout: float = 900.0) -> FileLock:
    """An inter-process lock named ``name`` inside the cache folder.

    ``timeout`` is generous because the holder may be downloading jars from Maven Central.
    """
    return FileLock(str(cache_dir() / f"{name}.lock"), timeout=timeout)
