"""systemd/: the units verify, score "OK" in ``systemd-analyze security``, configure Caracal correctly, and
the daemons they start speak the notify protocol (READY=1, then WATCHDOG=1) under the units' hardening.

* ``systemd-analyze verify`` runs with ``--root`` on a temporary root holding the units, systemd's own units
  and an executable ``/usr/bin/caracald`` and ``/usr/bin/caracal`` (wrappers of this virtualenv's), so the
  ExecStart= paths are really checked, as are unknown keys and bad values.
* ``MemoryDenyWriteExecute=yes`` is emulated with the same seccomp filter systemd installs (no writable and
  executable mapping, no mprotect to executable), so "it does not break Python" is tested, not assumed.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from caracald.runtime.config import load_config
from tests.deploytools import ROOT
from tests.harness.ports import LOOPBACK, free_port

SYSTEMD = ROOT / "systemd"
DAEMONS = ["gateway", "ledger-writer", "metrics-aggregator", "audit-logger"]
JOBS = ["backup", "snapshot"]
SERVICES = [f"caracal-{name}.service" for name in DAEMONS + JOBS]
TIMERS = [f"caracal-{name}.timer" for name in JOBS]
ALL_UNITS = [*SERVICES, *TIMERS, "caracal.target"]
THRESHOLD = 2.0
VENV_BIN = Path(sys.executable).parent

Unit = dict[str, list[tuple[str, str]]]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (Debian package systemd)")
    return path


def parse_unit(text: str) -> Unit:
    """Sections -> (key, value) pairs in order; repeated keys kept (systemd accumulates many of them)."""
    sections: Unit = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"key outside a section: {line}"
        assert not line.endswith("\\"), "no continuation lines, please"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def _unit(name: str) -> Unit:
    return parse_unit((SYSTEMD / name).read_text())


def _values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def _one(unit: Unit, section: str, key: str) -> str:
    values = _values(unit, section, key)
    assert len(values) == 1, f"{section}.{key}: {values}"
    return values[0]


# -- systemd-analyze verify ----------------------------------------------------------------------------


def _systemd_units_dir() -> Path:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "sysinit.target").exists():
            return candidate
    pytest.fail("systemd's unit directory (sysinit.target) not found")


def _wrapper(path: Path, target: Path) -> None:
    path.write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
    path.chmod(0o755)


@pytest.fixture
def system_root(tmp_path: Path) -> Path:
    """A root for ``systemd-analyze --root``: systemd's units, ours, and the two executables."""
    root = tmp_path / "root"
    shutil.copytree(_systemd_units_dir(), root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in ALL_UNITS:
        shutil.copy(SYSTEMD / name, units / name)
    (root / "usr/bin").mkdir(parents=True)
    for command in ("caracald", "caracal"):
        _wrapper(root / "usr/bin" / command, VENV_BIN / command)
    return root


def _verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("systemd-analyze"), "verify", f"--root={root}", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )


def test_systemd_analyze_verify(system_root: Path) -> None:
    result = _verify(system_root, *ALL_UNITS)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert output == "", f"systemd-analyze verify complained:\n{output}"


def test_verify_catches_mistakes(system_root: Path) -> None:
    """The harness is not blind: a misspelt key, a bad value and a missing ExecStart binary are reported."""
    unit = system_root / "etc/systemd/system/caracal-gateway.service"
    unit.write_text(
        unit.read_text()
        .replace("ProtectSystem=strict", "ProtectSytem=strict")
        .replace("WatchdogSec=30", "WatchdogSec=soon")
    )
    (system_root / "usr/bin/caracald").unlink()
    result = _verify(system_root, "caracal-gateway.service")
    output = result.stdout + result.stderr
    assert "ProtectSytem" in output
    assert "soon" in output  # "Failed to parse ... ignoring: soon"
    assert result.returncode != 0
    assert "/usr/bin/caracald" in output


def test_sysusers_and_tmpfiles(tmp_path: Path) -> None:
    """The account the units run as, and /etc/caracal/credentials (root-only), made in a temporary root."""
    (tmp_path / "etc").mkdir()
    sysusers = subprocess.run(
        [_tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSTEMD / "caracal.sysusers.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sysusers.returncode == 0, sysusers.stderr
    passwd = {
        line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    assert passwd["caracal"][5:] == ["/var/lib/caracal", "/usr/sbin/nologin"]
    tmpfiles = subprocess.run(
        [_tool("systemd-tmpfiles"), f"--root={tmp_path}", "--create", str(SYSTEMD / "caracal.tmpfiles.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tmpfiles.returncode == 0, tmpfiles.stderr
    assert (tmp_path / "etc/caracal/credentials").stat().st_mode & 0o777 == 0o700


# -- systemd-analyze security --------------------------------------------------------------------------


def exposure(unit_path: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    result = subprocess.run(
        [
            _tool("systemd-analyze"),
            "security",
            "--offline=true",
            # --threshold counts on the internal 0-100 scale: exposure 2.0 is 20.
            f"--threshold={round(THRESHOLD * 10)}",
            "--no-pager",
            str(unit_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0"},
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    return float(match.group(1)), result


@pytest.mark.parametrize("service", SERVICES)
def test_security_exposure_at_most_2(service: str) -> None:
    score, result = exposure(SYSTEMD / service)
    assert score <= THRESHOLD, f"{service}: exposure {score}\n{result.stdout}"
    assert result.returncode == 0, result.stdout + result.stderr


def test_security_threshold_fails_a_weak_unit(tmp_path: Path) -> None:
    weak = tmp_path / "weak.service"
    weak.write_text("[Service]\nExecStart=/usr/bin/caracald gateway\n")
    score, result = exposure(weak)
    assert score > THRESHOLD
    assert result.returncode != 0


# -- what the units say --------------------------------------------------------------------------------

HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "DevicePolicy": "closed",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "UMask": "0077",
    "User": "caracal",
}


@pytest.mark.parametrize("daemon", DAEMONS)
def test_daemon_units(daemon: str) -> None:
    unit = _unit(f"caracal-{daemon}.service")
    service = "Service"
    assert _one(unit, service, "Type") == "notify"
    assert _one(unit, service, "NotifyAccess") == "main"
    assert _one(unit, service, "WatchdogSec") == "30"
    assert _one(unit, service, "Restart") == "on-failure"
    assert _one(unit, "Unit", "StartLimitIntervalSec") == "0", "keep restarting while dependencies are down"
    assert (
        _one(unit, service, "ExecStart") == f"/usr/bin/caracald {daemon} --config /etc/caracal/caracal.yaml"
    )
    assert "caracal" in _one(unit, service, "StateDirectory").split()
    assert _one(unit, "Install", "WantedBy") == "caracal.target"
    assert _one(unit, "Unit", "PartOf") == "caracal.target"
    credentials = dict(v.split(":", 1) for v in _values(unit, service, "LoadCredential"))
    assert credentials["database-url"] == "/etc/caracal/credentials/database-url"
    assert all(path == f"/etc/caracal/credentials/{name}" for name, path in credentials.items())
    # No secret on a command line or in the environment: only paths into the credentials directory.
    environment = _environment(unit)
    assert not any(re.search(r"://|password|api_key=", v, re.IGNORECASE) for v in environment.values())
    for name in credentials:
        assert f"%d/{name}" in environment.values(), f"credential {name} loaded but not used"
    if daemon == "gateway":
        assert not _values(unit, service, "IPAddressDeny"), "agents and providers are anywhere"
    else:
        assert _one(unit, service, "IPAddressDeny") == "any"
        assert "localhost" in _one(unit, service, "IPAddressAllow").split()


@pytest.mark.parametrize("service", SERVICES)
def test_hardening(service: str) -> None:
    unit = _unit(service)
    for key, value in HARDENING.items():
        assert _values(unit, "Service", key)[-1:] == [value], f"{service}: {key}"
    filters = _values(unit, "Service", "SystemCallFilter")
    assert filters[0] == "@system-service"
    assert not _values(unit, "Service", "DynamicUser"), "a static user shares StateDirectory=caracal"


def test_target_and_timers() -> None:
    target = _unit("caracal.target")
    wanted = {w for line in _values(target, "Unit", "Wants") for w in line.split()}
    assert {f"caracal-{d}.service" for d in DAEMONS} <= wanted
    assert set(TIMERS) <= wanted
    backup = _unit("caracal-backup.service")
    assert _one(backup, "Service", "Type") == "oneshot"
    assert _one(backup, "Service", "ExecStart").endswith("backup create --type postgresql")
    snapshot = _unit("caracal-snapshot.service")
    assert _one(snapshot, "Service", "ExecStart").endswith("snapshot create")
    for job in JOBS:
        timer = _unit(f"caracal-{job}.timer")
        assert _one(timer, "Timer", "Unit") == f"caracal-{job}.service"
        assert _one(timer, "Timer", "OnCalendar")
        assert _one(timer, "Timer", "Persistent") == "yes"


def _environment(unit: Unit) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in _values(unit, "Service", "Environment"):
        for assignment in shlex.split(line):
            key, _, value = assignment.partition("=")
            env[key] = value
    return env


@pytest.mark.parametrize("service", SERVICES)
def test_units_configure_caracal_through_credentials(service: str, tmp_path: Path) -> None:
    """caracal.yaml.example plus the unit's Environment= (with %d and %S resolved) is a valid configuration."""
    unit = _unit(service)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    samples = {
        "database-url": "postgresql://caracal:secret@db.internal:5432/caracal",
        "redis-url": "redis://redis.internal:6379/0",
    }
    for line in _values(unit, "Service", "LoadCredential"):
        name = line.split(":", 1)[0]
        (credentials / name).write_text(samples.get(name, f"key-{name}") + "\n")
    environ = {
        key: value.replace("%d", str(credentials)).replace("%S", str(tmp_path / "state"))
        for key, value in _environment(unit).items()
    }
    environ["CARACAL_CONFIG"] = str(SYSTEMD / "caracal.yaml.example")
    settings = load_config(environ=environ)
    assert settings.database.url is not None
    assert settings.database.url.get_secret_value() == samples["database-url"]
    assert not settings.embedded_mode
    if service == "caracal-gateway.service":
        assert settings.redis.url is not None
        assert settings.budget.backend == "redis"
        for upstream in ("openai", "anthropic"):
            key = settings.gateway.upstreams[upstream].api_key
            assert key is not None and key.get_secret_value() == f"key-{upstream}-api-key"
        assert settings.bus.spool_dir == tmp_path / "state" / "caracal" / "spool"


def test_example_config_holds_no_secret() -> None:
    text = (SYSTEMD / "caracal.yaml.example").read_text()
    data = yaml.safe_load(text)
    assert "url" not in (data.get("database") or {})
    assert "password" not in text.replace("sasl-password", "").replace("password_file", "")


# -- the commands the units run ------------------------------------------------------------------------


def _argv(exec_start: str) -> list[str]:
    argv = shlex.split(exec_start)
    assert argv[0] in {"/usr/bin/caracald", "/usr/bin/caracal"}, argv
    return [str(VENV_BIN / Path(argv[0]).name), *argv[1:]]


def _command_path(argv: list[str]) -> list[str]:
    """The executable and its subcommands, without options: caracal backup create --type x -> caracal backup create."""
    words: list[str] = [argv[0]]
    skip = False
    for word in argv[1:]:
        if skip:
            skip = False
            continue
        if word.startswith("-"):
            skip = "=" not in word  # every option here takes a value
            continue
        words.append(word)
    return words


@pytest.mark.parametrize("service", SERVICES)
def test_exec_start_commands_exist(service: str) -> None:
    words = _command_path(_argv(_one(_unit(service), "Service", "ExecStart")))
    result = subprocess.run([*words, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# -- MemoryDenyWriteExecute ----------------------------------------------------------------------------

#: Installs the seccomp filter systemd uses for MemoryDenyWriteExecute=yes, then execs argv[1:].
MDWE_LAUNCHER = r"""
import ctypes, os, platform, struct, sys
ARCH = {
    "x86_64": (0xC000003E, {"mmap": 9, "mprotect": 10, "pkey_mprotect": 329, "shmat": 30}),
    "aarch64": (0xC00000B7, {"mmap": 222, "mprotect": 226, "pkey_mprotect": 288, "shmat": 196}),
}
LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
ALLOW, DENY = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
audit_arch, nr = ARCH[platform.machine()]
code, labels = [], {}
def op(c, k=0, jt=0, jf=0):
    code.append([c, jt, jf, k])
op(LD, 4); op(JEQ, audit_arch, 0, "allow")                   # seccomp_data.arch
op(LD, 0)                                                     # seccomp_data.nr
op(JEQ, nr["mmap"], "mmap"); op(JEQ, nr["mprotect"], "prot"); op(JEQ, nr["pkey_mprotect"], "prot")
op(JEQ, nr["shmat"], "shm"); op(RET, ALLOW)
labels["mmap"] = len(code); op(LD, 32); op(AND, 6); op(JEQ, 6, "deny", "allow")          # PROT_WRITE|PROT_EXEC
labels["prot"] = len(code); op(LD, 32); op(AND, 4); op(JEQ, 0, "allow", "deny")          # PROT_EXEC
labels["shm"] = len(code); op(LD, 32); op(AND, 0x8000); op(JEQ, 0, "allow", "deny")      # SHM_EXEC
labels["allow"] = len(code); op(RET, ALLOW)
labels["deny"] = len(code); op(RET, DENY)
blob = b"".join(
    struct.pack("HBBI", c, labels[jt] - pc - 1 if isinstance(jt, str) else jt,
                labels[jf] - pc - 1 if isinstance(jf, str) else jf, k)
    for pc, (c, jt, jf, k) in enumerate(code)
)
buf = ctypes.create_string_buffer(blob)
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
prog = Prog(len(code), ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
if libc.prctl(38, 1, None, 0, 0):  # PR_SET_NO_NEW_PRIVS
    raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
if libc.prctl(22, 2, ctypes.addressof(prog), 0, 0):  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")
os.execv(sys.argv[1], sys.argv[1:])
"""

#: Under the filter: the filter works, then Caracal's modules and native libraries do real work.
MDWE_WORKLOAD = r"""
import asyncio, ctypes, mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    raise SystemExit("the filter let a writable+executable mapping through")
except PermissionError:
    pass
import caracald.cli, caracal_ops.cli.main, caracald.gateway.server, caracald.consumers.ledger_writer
import brotli, confluent_kafka, hiredis, httptools, psycopg, redis, starlette, uvicorn, yaml
from caracald.gateway.http_client import UpstreamClient
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
key = Ed25519PrivateKey.generate()
key.public_key().verify(key.sign(b"batch root"), b"batch root")
producer = confluent_kafka.Producer({"bootstrap.servers": "127.0.0.1:9", "log_level": 0})
producer.flush(0)
libc = ctypes.CDLL(None)
CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
values = (ctypes.c_int * 3)(3, 1, 2)
libc.qsort(values, 3, ctypes.sizeof(ctypes.c_int), CMP(lambda a, b: a[0] - b[0]))
assert list(values) == [1, 2, 3]
assert brotli.decompress(brotli.compress(b"answer")) == b"answer"
assert hiredis.pack_command(("PING",)) == b"*1\r\n$4\r\nPING\r\n"
class Answer:
    def on_body(self, body): self.body = body
answer = Answer()
httptools.HttpResponseParser(answer).feed_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
assert answer.body == b"ok"
async def main():
    await UpstreamClient(connect_timeout=1, read_timeout=1, total_timeout=1).close()
asyncio.run(main())
print("ok")
"""


def under_mdwe(argv: list[str]) -> list[str]:
    if platform.machine() not in {"x86_64", "aarch64"}:
        pytest.fail(f"no MemoryDenyWriteExecute emulation for {platform.machine()}")
    return [sys.executable, "-c", MDWE_LAUNCHER, *argv]


def test_python_and_caracals_libraries_run_with_memory_deny_write_execute() -> None:
    result = subprocess.run(
        under_mdwe([sys.executable, "-c", MDWE_WORKLOAD]), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


# -- the daemons speak sd_notify -----------------------------------------------------------------------


@contextlib.contextmanager
def notify_socket(directory: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(directory / "notify.sock")
    assert len(path.encode()) < 108
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield path, sock
    finally:
        sock.close()


def _messages_until(
    sock: socket.socket, proc: subprocess.Popen[bytes], want: set[str], timeout: float
) -> list[str]:
    """Datagrams (as field lists joined by '|') until every field in ``want`` was seen, or timeout."""
    seen: list[str] = []
    fields: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not want <= fields:
        if proc.poll() is not None:
            break
        sock.settimeout(0.2)
        try:
            data = sock.recv(65536).decode()
        except TimeoutError:
            continue
        seen.append(data.replace("\n", "|"))
        fields.update(data.split("\n"))
    return seen


def _daemon_config(tmp_path: Path, database_url: str, daemon: str) -> tuple[Path, int]:
    port = free_port()
    config = {
        "database": {"url": database_url},
        "bus": {"kind": "postgres"},
        "budget": {"backend": "local"},
        "gateway": {"host": LOOPBACK, "port": port, "metrics_port": free_port()},
    }
    path = tmp_path / f"{daemon}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port


@pytest.mark.parametrize("daemon", DAEMONS)
def test_daemon_sends_ready_and_watchdog_under_the_units_sandbox(
    daemon: str, tmp_path: Path, database_url: str
) -> None:
    """``caracald <daemon>`` as its unit runs it: READY=1 once serving, then WATCHDOG=1 (WATCHDOG_USEC=2 s)."""
    caracald = str(VENV_BIN / "caracald")
    config, port = _daemon_config(tmp_path, database_url, daemon)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_", "CARACAL"))}
    with notify_socket(tmp_path) as (address, sock):
        env.update(NOTIFY_SOCKET=address, WATCHDOG_USEC="2000000", PYTHONDONTWRITEBYTECODE="1")
        if daemon != "gateway":  # the unit's command line; free loopback ports instead of 8080 and 9090
            env.update(
                CARACAL_LISTEN_HOST=LOOPBACK,
                CARACAL_HEALTH_PORT=str(free_port()),
                CARACAL_METRICS_PORT=str(free_port()),
            )
        log = tmp_path / "daemon.log"
        with log.open("wb") as output:
            proc = subprocess.Popen(
                under_mdwe([caracald, daemon, "--config", str(config)]),
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                startup = _messages_until(sock, proc, {"READY=1"}, timeout=90)
                assert any("READY=1" in m.split("|") for m in startup), (
                    f"no READY=1 (exit {proc.poll()}); got {startup}\n{log.read_text()[-3000:]}"
                )
                if daemon == "gateway":
                    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/health", timeout=10) as response:
                        assert response.status == 200
                after = _messages_until(sock, proc, {"WATCHDOG=1"}, timeout=10)
                assert any("WATCHDOG=1" in m.split("|") for m in after), (
                    f"no WATCHDOG=1 within 10 s of READY=1: {after}\n{log.read_text()[-3000:]}"
                )
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
