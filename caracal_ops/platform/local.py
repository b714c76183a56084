"""The local platform: Caracal's own supervisor for one machine.

Each component runs as ``caracald <component>`` (or the command ``platform.commands.<component>`` names) in
the background, in its own session, with its output appended to ``<data dir>/logs/<component>.log`` and a
pid file ``<data dir>/run/<component>.pid`` (the pid, the process's start time, so that a recycled pid is
never mistaken for it, and the command). Only the components ``caracald`` has are run: the others show as
``not-installed``.

Stopping sends SIGTERM to the component's process group and SIGKILL after ``platform.stop_timeout_seconds``.
Status comes from the pid's liveness: a pid file whose process died without being stopped shows as
``failed``. The local platform runs one replica of each component: scaling to 0 stops it, scaling to any
other count starts that one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sh

from caracal_ops.platform.base import (
    COMPONENTS,
    ComponentState,
    ComponentStatus,
    PlatformError,
    check_replicas,
    component_name,
)

#: Environment a daemon must not inherit from whatever started the CLI (a systemd unit, a socket).
_SCRUBBED_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)

#: Background commands started by this process: polled (:func:`_reap`) so that they leave no zombie.
_children: dict[int, Any] = {}


def _reap(pid: int) -> int | None:
    """Collect the exit code of a child this process started, once it exited (None while it runs, or
    when another process started it: init reaps those)."""
    child = _children.get(pid)
    if child is None:
        return None
    alive, code = child.process.is_alive()
    if alive:
        return None
    _children.pop(pid, None)
    return int(code) if code is not None else None


def caracald_commands() -> frozenset[str]:
    """The commands this installation's ``caracald`` has (``gateway``, and the consumers once they exist)."""
    from caracald.cli import app

    names = set()
    for command in app.registered_commands:
        if command.name:
            names.add(command.name)
        elif command.callback is not None:
            names.add(command.callback.__name__.replace("_", "-"))
    return frozenset(names)


def caracald_executable() -> list[str]:
    """The ``caracald`` next to this Python (a virtualenv's), else the one on PATH, else ``python -c``."""
    beside = Path(sys.executable).parent / "caracald"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("caracald")
    if found:
        return [found]
    return [sys.executable, "-c", "from caracald.cli import run; run()"]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a live pid, from /proc; None elsewhere."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[-1].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class PidFile:
    pid: int
    start_ticks: int | None
    argv: list[str]
    started_at: datetime

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # it exists, as another user
        stat = _proc_stat(self.pid)
        if stat is None:
            return not Path("/proc").is_dir()  # gone, unless there is no /proc (not Linux): trust kill(0)
        state, ticks = stat
        if state in ("Z", "X"):
            return False
        return self.start_ticks is None or ticks == self.start_ticks


class LocalPlatform:
    kind = "local"

    def __init__(
        self,
        *,
        run_dir: Path,
        log_dir: Path,
        commands: Mapping[str, Sequence[str]] | None = None,
        env: Mapping[str, str] | None = None,
        stop_timeout: float = 30.0,
        start_grace: float = 1.0,
        available: Iterable[str] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.log_dir = log_dir
        self._commands = {component_name(k): list(v) for k, v in (commands or {}).items()}
        self._env = dict(env or {})
        self._stop_timeout = stop_timeout
        self._start_grace = start_grace
        self._available = frozenset(available) if available is not None else None

    # -- what can run ---------------------------------------------------------------------------------

    def components(self) -> tuple[str, ...]:
        known = self._available if self._available is not None else caracald_commands()
        return tuple(c for c in COMPONENTS if c in self._commands or c in known)

    def command(self, component: str) -> list[str]:
        name = component_name(component)
        if name in self._commands:
            return list(self._commands[name])
        return [*caracald_executable(), name]

    def pid_path(self, component: str) -> Path:
        return self.run_dir / f"{component_name(component)}.pid"

    def log_path(self, component: str) -> Path:
        return self.log_dir / f"{component_name(component)}.log"

    def _require_available(self, name: str) -> None:
        if name not in self.components():
            raise PlatformError(
                f"{name} cannot run on the local platform: this caracald has no `{name}` command "
                f"(it has: {', '.join(sorted(caracald_commands()))})"
            )

    # -- pid files ------------------------------------------------------------------------------------

    def _read_pid(self, name: str) -> PidFile | None:
        path = self.pid_path(name)
        try:
            data = json.loads(path.read_text())
            _reap(int(data["pid"]))
            return PidFile(
                pid=int(data["pid"]),
                start_ticks=data.get("start_ticks"),
                argv=list(data.get("argv", [])),
                started_at=datetime.fromisoformat(data["started_at"]),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            raise PlatformError(f"unreadable pid file {path}: remove it if {name} is not running") from None

    def _write_pid(self, name: str, pid_file: PidFile) -> None:
        path = self.pid_path(name)
        tmp = path.with_suffix(".pid.tmp")
        tmp.write_text(
            json.dumps(
                {
                    "pid": pid_file.pid,
                    "start_ticks": pid_file.start_ticks,
                    "argv": pid_file.argv,
                    "started_at": pid_file.started_at.isoformat(),
                }
            )
        )
        tmp.replace(path)

    def _tail(self, name: str, lines: int) -> str:
        path = self.log_path(name)
        try:
            with path.open(errors="replace") as handle:
                return "".join(deque(handle, maxlen=lines))
        except FileNotFoundError:
            return ""

    # -- control --------------------------------------------------------------------------------------

    def start(self, component: str) -> str:
        name = component_name(component)
        self._require_available(name)
        running = self._read_pid(name)
        if running is not None and running.alive():
            return f"{name} already running (pid {running.pid})"
        for folder in (self.run_dir, self.log_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        argv = self.command(name)
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        env.update(self._env)
        started_at = datetime.now(UTC)
        log = self.log_path(name).open("ab")
        log.write(
            f"--- {started_at.isoformat()} caracal services: starting {name}: {' '.join(argv)}\n".encode()
        )
        log.flush()
        try:
            with open(os.devnull, "rb") as devnull:
                try:
                    child = sh.Command(argv[0])(
                        *argv[1:],
                        _bg=True,
                        _bg_exc=False,
                        _new_session=True,
                        _out=log,
                        _err_to_out=True,
                        _in=devnull,
                        _env=env,
                        _return_cmd=True,
                    )
                except sh.CommandNotFound:
                    raise PlatformError(f"cannot start {name}: {argv[0]} not found") from None
        finally:
            log.close()
        pid = int(child.pid)
        _children[pid] = child
        stat = _proc_stat(pid)
        pid_file = PidFile(pid, stat[1] if stat else None, argv, started_at)
        self._write_pid(name, pid_file)
        deadline = time.monotonic() + self._start_grace
        while time.monotonic() < deadline:
            code = _reap(pid)
            if code is not None or not pid_file.alive():
                self.pid_path(name).unlink(missing_ok=True)
                tail = self._tail(name, 5).strip()
                raise PlatformError(
                    f"{name} exited at once"
                    + (f" (exit code {code})" if code is not None else "")
                    + f"; see {self.log_path(name)}"
                    + (f": {tail.splitlines()[-1]}" if tail else "")
                )
            time.sleep(0.05)
        return f"{name} started (pid {pid}, log {self.log_path(name)})"

    def stop(self, component: str) -> str:
        name = component_name(component)
        pid_file = self._read_pid(name)
        if pid_file is None:
            return f"{name} not running"
        if not pid_file.alive():
            self.pid_path(name).unlink(missing_ok=True)
            return f"{name} not running (removed the stale pid file of pid {pid_file.pid})"
        began = time.monotonic()
        self._signal(pid_file.pid, signal.SIGTERM)
        how = "SIGTERM"
        if not self._wait_gone(pid_file, self._stop_timeout):
            self._signal(pid_file.pid, signal.SIGKILL)
            how = f"SIGKILL after {self._stop_timeout:g} s"
            if not self._wait_gone(pid_file, 10.0):
                raise PlatformError(f"{name} (pid {pid_file.pid}) survived SIGKILL")
        self.pid_path(name).unlink(missing_ok=True)
        with self.log_path(name).open("ab") as log:
            log.write(
                f"--- {datetime.now(UTC).isoformat()} caracal services: stopped {name} ({how})\n".encode()
            )
        return f"{name} stopped (pid {pid_file.pid}, {how}, {time.monotonic() - began:.1f} s)"

    @staticmethod
    def _signal(pid: int, signum: int) -> None:
        # the whole process group (the daemon runs in its own session), so its children go too
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(pid, signum)

    @staticmethod
    def _wait_gone(pid_file: PidFile, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _reap(pid_file.pid)
            if not pid_file.alive():
                return True
            time.sleep(0.05)
        _reap(pid_file.pid)
        return not pid_file.alive()

    def restart(self, component: str) -> str:
        stopped = self.stop(component)
        return f"{stopped}; {self.start(component)}"

    def scale(self, component: str, replicas: int) -> str:
        check_replicas(replicas)
        if replicas == 0:
            return self.stop(component)
        summary = self.start(component)
        if replicas > 1:
            summary += " (the local platform runs one replica per component)"
        return summary

    def status(self, component: str) -> ComponentStatus:
        name = component_name(component)
        pid_file = self._read_pid(name)
        if pid_file is not None and pid_file.alive():
            up = datetime.now(UTC) - pid_file.started_at
            return ComponentStatus(
                name,
                ComponentState.RUNNING,
                replicas=1,
                ready=1,
                detail=f"pid {pid_file.pid}, up {_duration(up.total_seconds())}",
            )
        if name not in self.components():
            return ComponentStatus(name, ComponentState.NOT_INSTALLED, detail="caracald has no such command")
        if pid_file is not None:
            last = self._tail(name, 1).strip()
            return ComponentStatus(
                name,
                ComponentState.FAILED,
                replicas=1,
                ready=0,
                detail=f"pid {pid_file.pid} exited without being stopped" + (f": {last}" if last else ""),
            )
        return ComponentStatus(name, ComponentState.STOPPED, replicas=0, ready=0)

    def logs(self, component: str, lines: int = 100) -> str:
        name = component_name(component)
        text = self._tail(name, lines)
        if not text and not self.log_path(name).exists():
            raise PlatformError(f"no log for {name} yet ({self.log_path(name)})")
        return text


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
