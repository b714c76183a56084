"""The systemd notify client against a real unix datagram socket."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from caracald.runtime.sdnotify import Notifier, Watchdog, notify, watchdog_interval


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket bound in tmp_path, standing in for systemd's notify socket."""
    address = str(tmp_path / "notify.sock")
    assert len(address.encode()) < 108, f"tmp_path too long for a unix socket address: {address}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    try:
        yield address, sock
    finally:
        sock.close()


def _receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def _nothing_waiting(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        sock.recv(4096)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(2)
    return False


def test_ready_status_watchdog_stopping(listener: tuple[str, socket.socket]) -> None:
    address, sock = listener
    with Notifier(address) as notifier:
        assert notifier.enabled
        assert notifier.ready("serving on :8443")
        assert _receive(sock) == ["READY=1", "STATUS=serving on :8443"]
        assert notifier.status("draining\nsecond line")
        assert _receive(sock) == ["STATUS=draining second line"]
        assert notifier.watchdog()
        assert _receive(sock) == ["WATCHDOG=1"]
        assert notifier.extend_timeout(2.5)
        assert _receive(sock) == ["EXTEND_TIMEOUT_USEC=2500000"]
        assert notifier.stopping()
        assert _receive(sock) == ["STOPPING=1"]
        assert notifier.reloading()
        fields = _receive(sock)
        assert fields[0] == "RELOADING=1"
        assert fields[1].startswith("MONOTONIC_USEC=")
        assert int(fields[1].split("=", 1)[1]) > 0


def test_abstract_namespace_address() -> None:
    name = f"caracal-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        assert notify("READY=1", environ={"NOTIFY_SOCKET": f"@{name}"})
        assert _receive(sock) == ["READY=1"]
    finally:
        sock.close()


def test_from_environment_and_unset(listener: tuple[str, socket.socket]) -> None:
    address, sock = listener
    env = {"NOTIFY_SOCKET": address, "OTHER": "x"}
    notifier = Notifier.from_environment(env, unset=True)
    assert "NOTIFY_SOCKET" not in env
    assert env == {"OTHER": "x"}
    assert notifier.watchdog()
    assert _receive(sock) == ["WATCHDOG=1"]
    notifier.close()


def test_no_socket_is_a_no_op() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not notify("READY=1", environ={})
    assert not Notifier("vsock:2:1234").enabled


def test_unreachable_socket_returns_false(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "absent.sock"))
    assert notifier.enabled
    assert not notifier.ready()
    # A later send tries again (with a new socket) rather than giving up for good.
    assert not notifier.watchdog()


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    mine = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(mine) == 0.5
    theirs = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert watchdog_interval(theirs) is None
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "7"}, pid=7) == 0.5


def test_watchdog_feeds_at_most_once_per_interval(listener: tuple[str, socket.socket]) -> None:
    address, sock = listener
    now = [100.0]
    watchdog = Watchdog(Notifier(address), environ={"WATCHDOG_USEC": "10000000"}, clock=lambda: now[0])
    assert watchdog.enabled
    assert watchdog.interval == 5.0
    assert watchdog.due()
    assert watchdog.feed()
    assert _receive(sock) == ["WATCHDOG=1"]
    now[0] += 4.9
    assert not watchdog.due()
    assert not watchdog.feed()
    assert _nothing_waiting(sock)
    assert watchdog.feed(force=True)
    assert _receive(sock) == ["WATCHDOG=1"]
    now[0] += 5.0
    assert watchdog.feed()
    assert _receive(sock) == ["WATCHDOG=1"]


def test_watchdog_off_without_watchdog_usec_or_socket(listener: tuple[str, socket.socket]) -> None:
    address, sock = listener
    assert not Watchdog(Notifier(address), environ={}).feed()
    assert not Watchdog(Notifier(None), environ={"WATCHDOG_USEC": "1000000"}).feed()
    assert _nothing_waiting(sock)


def test_a_daemon_loop_reports_ready_then_feeds_the_watchdog(listener: tuple[str, socket.socket]) -> None:
    """The shape every daemon follows: READY=1 after start-up, WATCHDOG=1 from its own loop, STOPPING=1."""
    address, sock = listener
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "40000"}  # feed every 20 ms
    notifier = Notifier.from_environment(env)
    watchdog = Watchdog(notifier, environ=env)
    notifier.ready("consuming")
    turns = 0
    while turns < 6:
        time.sleep(0.01)  # a turn of work
        watchdog.feed()
        turns += 1
    notifier.stopping()
    messages: list[str] = []
    while not _nothing_waiting_after(sock, messages):
        pass
    assert messages[0] == "READY=1\nSTATUS=consuming"
    assert messages[-1] == "STOPPING=1"
    pings = [m for m in messages if m == "WATCHDOG=1"]
    assert 2 <= len(pings) <= 4, messages


def _nothing_waiting_after(sock: socket.socket, into: list[str]) -> bool:
    sock.settimeout(0.05)
    try:
        into.append(sock.recv(4096).decode())
    except TimeoutError:
        return True
    finally:
        sock.settimeout(2)
    return False


async def test_watchdog_run_feeds_while_the_event_loop_turns(listener: tuple[str, socket.socket]) -> None:
    address, sock = listener
    healthy = [True]
    watchdog = Watchdog(Notifier(address), interval=0.02)
    task = asyncio.create_task(watchdog.run(lambda: healthy[0]))
    await asyncio.sleep(0.1)
    healthy[0] = False
    await asyncio.sleep(0.02)
    drained: list[str] = []
    while not _nothing_waiting_after(sock, drained):
        pass
    assert drained and set(drained) == {"WATCHDOG=1"}
    await asyncio.sleep(0.1)
    assert _nothing_waiting(sock), "an unhealthy daemon must stop feeding the watchdog"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_signal_handler_can_notify_while_a_notification_is_being_sent(
    listener: tuple[str, socket.socket],
) -> None:
    """SIGTERM's handler sends STOPPING=1; the signal may land while the main thread is inside a send (the
    loop's WATCHDOG=1). That must not hang the daemon's shutdown."""
    address, sock = listener
    with Notifier(address) as notifier:
        previous = signal.signal(signal.SIGUSR2, lambda signum, frame: notifier.stopping("stopping"))
        try:
            with notifier._lock:  # the state a send is in when the signal arrives
                os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(0.01)  # the handler runs here, on this thread
        finally:
            signal.signal(signal.SIGUSR2, previous)
        assert _receive(sock) == ["STOPPING=1", "STATUS=stopping"]
