"""Real services for the integration tests: PostgreSQL, Redis and Apache Kafka.

Each service runs as a child process on free loopback ports (or a unix socket for PostgreSQL),
keeps its data and logs in its own temporary folder, and is stopped and removed when the test
session ends (:func:`stop_all`, also registered with :mod:`atexit`). A service that cannot start
raises :class:`ServiceStartError` carrying the reason and the tail of its log.

Modules:

* :mod:`tests.harness.ports` -- free loopback ports.
* :mod:`tests.harness.cache` -- the cache folder (``$CARACAL_TEST_CACHE``).
* :mod:`tests.harness.postgres` -- :class:`~tests.harness.postgres.PostgresService`.
* :mod:`tests.harness.redis_server` -- :class:`~tests.harness.redis_server.RedisService`.
* :mod:`tests.harness.kafka` -- :class:`~tests.harness.kafka.KafkaService`
  (``python -m tests.harness.kafka --fetch`` fetches the broker's jars ahead of time).

This module holds what they share and imports none of them, so importing it is cheap.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "ServiceControlError",
    "ServiceStartError",
    "child_argv",
    "make_workdir",
    "register_cleanup",
    "stop_all",
    "stop_process",
    "sweep_stale_workdirs",
    "tail",
]

LOG_TAIL_LINES = 40


class ServiceStartError(RuntimeError):
    """A service could not be started; the message says why and shows the end of its log."""


class ServiceControlError(RuntimeError):
    """A control operation (stop, restart, ...) was asked of a service the harness does not own."""


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of the text file ``path`` (a note when it cannot be read)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 256 * 1024))
            data = handle.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    text = "\n".join(data.splitlines()[-lines:])
    return text or f"<{path} is empty>"


_OWNER_FILE = ".caracal-owner"
_swept = False


def make_workdir(prefix: str) -> Path:
    """A fresh temporary folder for one service instance, marked with this process's pid.

    The first call of a process also removes the folders (and stops the servers) that
    processes which died without cleaning up left behind (see :func:`sweep_stale_workdirs`).
    """
    global _swept
    if not _swept:
        _swept = True
        sweep_stale_workdirs()
    path = Path(tempfile.mkdtemp(prefix=f"caracal-{prefix}-")).resolve()
    (path / _OWNER_FILE).write_text(f"{os.getpid()}\n")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pids_mentioning(path: Path) -> list[int]:
    """Processes whose command line mentions ``path`` (a server still running from it)."""
    needle = str(path).encode()
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            pids.append(int(entry.name))
    return pids


def sweep_stale_workdirs() -> None:
    """Remove the service folders of harness processes that are gone, and stop what still runs
    from them (a PostgreSQL server outlives a SIGKILLed test run: pg_ctl detaches it)."""
    for path in Path(tempfile.gettempdir()).glob("caracal-*-*"):
        try:
            owner = int((path / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if _pid_alive(owner):
            continue
        pids = _pids_mentioning(path)
        for pid in pids:  # SIGQUIT: PostgreSQL's immediate shutdown, which frees shared memory
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if _pid_alive(pid) and not _is_zombie(pid)]
            time.sleep(0.05)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        remove_tree(path)


def _is_zombie(pid: int) -> bool:
    try:
        return ") Z" in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False


def remove_tree(path: Path | None) -> None:
    """Remove ``path`` and everything below it, ignoring a folder that is already gone."""
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


_SETPRIV = shutil.which("setpriv")


def child_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed so the child is SIGKILLed if this process dies without cleaning up.

    Uses ``setpriv --pdeathsig KILL`` (util-linux) when present. The parent-death signal fires
    when the *thread* that started the child exits, so it is only used from the main thread.
    """
    if (
        _SETPRIV
        and sys.platform.startswith("linux")
        and threading.current_thread() is threading.main_thread()
    ):
        return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]
    return list(argv)


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to ``proc`` and wait up to ``timeout`` s; SIGKILL it if it is still there."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)  # a paused (SIGSTOP) process must wake up to exit
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=30)


_cleanups: list[Callable[[], None]] = []
_cleanup_lock = threading.Lock()


def register_cleanup(fn: Callable[[], None]) -> None:
    """Run ``fn`` from :func:`stop_all` (latest registered first). ``fn`` must be idempotent."""
    with _cleanup_lock:
        _cleanups.append(fn)


def stop_all() -> list[BaseException]:
    """Stop every service started by the harness in this process; return the errors seen."""
    errors: list[BaseException] = []
    while True:
        with _cleanup_lock:
            if not _cleanups:
                break
            fn = _cleanups.pop()
        try:
            fn()
        except BaseException as exc:  # keep stopping the others, report afterwards
            errors.append(exc)
            print(f"caracal test harness: cleanup {fn!r} failed: {exc!r}", file=sys.stderr)
    return errors


atexit.register(stop_all)
