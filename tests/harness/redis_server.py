"""A real ``redis-server`` on a free loopback port, without persistence."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

from tests.harness import (
    ServiceControlError,
    ServiceStartError,
    child_argv,
    make_workdir,
    register_cleanup,
    remove_tree,
    stop_process,
    tail,
)
from tests.harness.ports import LOOPBACK, free_port

INSTALL_HINT = "redis-server not found: install it with apt-get install redis-server"
_START_ATTEMPTS = 3


def find_redis_server() -> str:
    """Path of ``redis-server``, or :class:`ServiceStartError` with the install hint."""
    path = shutil.which("redis-server")
    if path is None:
        raise ServiceStartError(INSTALL_HINT)
    return path


def redis_ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when ``PING`` on ``host:port`` answers ``+PONG`` (no client library involved)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisService:
    """A Redis server for the tests.

    ``url`` is ``redis://127.0.0.1:PORT/0``. A managed service (``managed``) can be stopped,
    killed and restarted on the same port; an external one (from ``CARACAL_TEST_REDIS_URL``) only
    offers ``url``, ``host`` and ``port``.

    With ``tls`` (a certificate and its key, see :func:`tests.harness.tls.self_signed`) a managed server
    also listens with TLS on ``tls_port``; ``tls_url`` is a ``rediss://`` URL that trusts that certificate.
    """

    def __init__(
        self,
        *,
        host: str = LOOPBACK,
        port: int | None = None,
        url: str | None = None,
        persistent: bool = False,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.managed = url is None
        self.tls = tls
        self.tls_port = free_port(host) if tls is not None and url is None else None
        # persistent: an append-only file (fsync every second), so a restart keeps the data, as in production.
        self.persistent = persistent
        if url is not None:
            parts = urlsplit(url)
            self.url = url
            self.host = parts.hostname or LOOPBACK
            self.port = parts.port or 6379
        else:
            self.host = host
            self.port = port if port is not None else free_port(host)
            self.url = f"redis://{self.host}:{self.port}/0"
        self.workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._registered = False

    @classmethod
    def external(cls, url: str) -> RedisService:
        return cls(url=url)

    def __repr__(self) -> str:
        return f"RedisService(url={self.url!r}, managed={self.managed}, running={self.is_running})"

    @property
    def tls_url(self) -> str:
        """``rediss://127.0.0.1:TLS_PORT/0``, trusting the server's certificate."""
        if self.tls is None or self.tls_port is None:
            raise ServiceControlError("this Redis does not listen with TLS")
        return f"rediss://{self.host}:{self.tls_port}/0?ssl_ca_certs={quote(str(self.tls[0]))}"

    @property
    def log_path(self) -> Path | None:
        return self.workdir / "redis.log" if self.workdir else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def is_running(self) -> bool:
        if not self.managed:
            return redis_ping(self.host, self.port)
        return self._proc is not None and self._proc.poll() is None

    def _require_managed(self, what: str) -> None:
        if not self.managed:
            raise ServiceControlError(f"cannot {what} the external Redis at {self.url}")

    def start(self, timeout: float = 20.0) -> RedisService:
        """Start the server and wait until ``PING`` answers. A no-op when already running."""
        self._require_managed("start")
        with self._lock:
            if self.is_running:
                return self
            if self.workdir is None:
                self.workdir = make_workdir("redis")
            if not self._registered:
                register_cleanup(self.close)
                self._registered = True
            first_start = self._proc is None
            for attempt in range(1, _START_ATTEMPTS + 1):
                try:
                    self._launch_and_wait(timeout)
                    return self
                except ServiceStartError as exc:
                    # Another process took the port between choosing and binding it: on the
                    # first start we may pick another one; a restart must keep its port.
                    if first_start and attempt < _START_ATTEMPTS and "Address already in use" in str(exc):
                        self.port = free_port(self.host)
                        self.url = f"redis://{self.host}:{self.port}/0"
                        if self.tls is not None:
                            self.tls_port = free_port(self.host)
                        continue
                    raise
        return self

    def _launch_and_wait(self, timeout: float) -> None:
        assert self.workdir is not None
        assert self.log_path is not None
        argv = [
            find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--appendfsync",
            "everysec",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.log_path),
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
        ]
        if self.tls is not None:
            cert, key = self.tls
            argv += [
                "--tls-port",
                str(self.tls_port),
                "--tls-cert-file",
                str(cert),
                "--tls-key-file",
                str(key),
            ]
            argv += ["--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
        with self.log_path.open("ab") as out:
            out.write(f"--- starting {' '.join(argv)}\n".encode())
            out.flush()
            self._proc = subprocess.Popen(
                child_argv(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServiceStartError(
                    f"redis-server on port {self.port} exited with code {self._proc.returncode}; "
                    f"end of {self.log_path}:\n{tail(self.log_path)}"
                )
            if redis_ping(self.host, self.port):
                return
            time.sleep(0.02)
        stop_process(self._proc, timeout=5)
        raise ServiceStartError(
            f"redis-server on port {self.port} did not answer PING within {timeout:.0f} s; "
            f"end of {self.log_path}:\n{tail(self.log_path)}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``); its folder is kept."""
        self._require_managed("stop")
        with self._lock:
            if self._proc is not None:
                stop_process(self._proc, timeout=timeout)

    def forget_data(self) -> None:
        """Delete what a stopped server persisted (its append-only file and snapshot): the next start comes
        up empty, as a Redis that lost its data does."""
        self._require_managed("forget the data of")
        with self._lock:
            if self.is_running:
                raise ServiceControlError("stop the server before deleting its data")
            if self.workdir is not None:
                remove_tree(self.workdir / "appendonlydir")
                (self.workdir / "dump.rdb").unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        self._require_managed("kill")
        with self._lock:
            if self._proc is not None:
                self._proc.kill()
                self._proc.wait(timeout=30)

    def restart(self, timeout: float = 20.0) -> RedisService:
        """Stop (if running) and start again on the same port. Data is kept only when ``persistent``."""
        self._require_managed("restart")
        with self._lock:
            self.stop()
            return self.start(timeout)

    def close(self) -> None:
        """Stop the server and remove its folder. Idempotent."""
        if not self.managed:
            return
        with self._lock:
            if self._proc is not None:
                stop_process(self._proc, timeout=10)
            remove_tree(self.workdir)
            self.workdir = None

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines) if self.log_path else "<no log>"


def start_redis(timeout: float = 20.0) -> RedisService:
    """Start a managed Redis on a free port."""
    return RedisService().start(timeout)
