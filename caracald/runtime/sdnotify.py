"""A small, dependency-free client of systemd's notify protocol (``sd_notify(3)``), and a watchdog helper.

A daemon started with ``Type=notify`` tells systemd when it is ready (``READY=1``), what it is doing
(``STATUS=...``), that it is still alive (``WATCHDOG=1``, at least every ``WatchdogSec``) and that it is
shutting down (``STOPPING=1``), by sending datagrams to the unix socket named in ``$NOTIFY_SOCKET``. An
address starting with ``@`` is in the abstract namespace. Without ``$NOTIFY_SOCKET`` (a daemon run by hand,
in a container, under a test) every call is a no-op that returns False, so daemons call it unconditionally.

The watchdog is fed from the daemon's own work loop, never from a thread of its own: a thread would keep
systemd happy while the loop it is meant to vouch for is stuck. :class:`Watchdog` says how often to feed
(half of ``$WATCHDOG_USEC``, as ``sd_watchdog_enabled(3)`` recommends) and rate-limits :meth:`Watchdog.feed`,
so a loop can call it on every turn::

    notifier = Notifier.from_environment()
    watchdog = Watchdog(notifier)
    ...  # open the store, the bus
    notifier.ready("consuming caracal.metering.events")
    while running:
        handle(poll(timeout=min(1.0, watchdog.interval or 1.0)))
        watchdog.feed()
    notifier.stopping()

An asyncio daemon can run ``asyncio.create_task(watchdog.run())``: it feeds while the event loop turns (and
while an optional health check passes), which is what the watchdog should prove for an asyncio server.

Failures to notify are logged at debug level and reported by a False return, never raised: systemd's
bookkeeping must not take the daemon down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping

log = logging.getLogger(__name__)

__all__ = ["Notifier", "Watchdog", "notify", "watchdog_interval"]


def _address(value: str) -> str | bytes | None:
    """The socket address for ``$NOTIFY_SOCKET``: a path, or an abstract name (``@name``)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    # vsock: and other address families are not supported by this client.
    return None


def _field(key: str, value: str) -> str:
    # Fields are newline-separated: a value must not contain one.
    return f"{key}={' '.join(str(value).splitlines())}"


class Notifier:
    """Sends notify messages to one socket; disabled (every call a no-op) when ``address`` is None."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._target = _address(address) if address else None
        if address and self._target is None:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket address: notifications are off", address)
        self._sock: socket.socket | None = None
        # Re-entrant: a signal handler (SIGTERM's STOPPING=1) can run on a thread that is already sending.
        self._lock = threading.RLock()

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = False
    ) -> Notifier:
        """The notifier for ``$NOTIFY_SOCKET``; ``unset`` removes it (children do not inherit it)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET")
        if unset:
            env.pop("NOTIFY_SOCKET", None)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def send(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=value`` fields. True when it was handed to the socket."""
        if self._target is None or not fields:
            return False
        payload = "\n".join(fields).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(payload, self._target)
            except OSError as exc:
                log.debug("sd_notify to %s failed: %s", self.address, exc)
                self._close_locked()
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up is finished (and the optional status line)."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(_field("STATUS", status))
        return self.send(*fields)

    def status(self, text: str) -> bool:
        """``STATUS=...``: one line shown by ``systemctl status``."""
        return self.send(_field("STATUS", text))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: keep-alive ping."""
        return self.send("WATCHDOG=1")

    def watchdog_trigger(self) -> bool:
        """``WATCHDOG=trigger``: ask systemd to act as if the watchdog had expired."""
        return self.send("WATCHDOG=trigger")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        fields = ["STOPPING=1"]
        if status is not None:
            fields.append(_field("STATUS", status))
        return self.send(*fields)

    def reloading(self) -> bool:
        """``RELOADING=1``: configuration is being reloaded (send :meth:`ready` when done)."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC=``: ask for more time to start or stop (e.g. during migrations)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(int(seconds * 1_000_000), 0)}")

    def errno(self, code: int) -> bool:
        """``ERRNO=``: the reason for a failure, as an errno."""
        return self.send(f"ERRNO={int(code)}")

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """One-shot ``sd_notify``: ``notify("READY=1", "STATUS=serving")``. False when there is no socket."""
    env = os.environ if environ is None else environ
    with Notifier(env.get("NOTIFY_SOCKET")) as notifier:
        return notifier.send(*fields)


def watchdog_interval(environ: Mapping[str, str] | None = None, *, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings: half of ``$WATCHDOG_USEC``; None when the watchdog is off.

    As with ``sd_watchdog_enabled(3)``, a ``$WATCHDOG_PID`` naming another process means it is not ours.
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2_000_000


class Watchdog:
    """Feeds systemd's watchdog from a daemon's loop, at most once per :attr:`interval`.

    ``interval`` defaults to :func:`watchdog_interval` of the environment; when it is None (no watchdog
    configured) :meth:`feed` does nothing.
    """

    def __init__(
        self,
        notifier: Notifier,
        interval: float | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier
        self.interval = interval if interval is not None else watchdog_interval(environ)
        self._clock = clock
        self._last: float | None = None

    @property
    def enabled(self) -> bool:
        return self.interval is not None and self.notifier.enabled

    def due(self) -> bool:
        """True when a ping is owed (never fed, or ``interval`` has passed since the last one)."""
        if not self.enabled:
            return False
        assert self.interval is not None
        return self._last is None or self._clock() - self._last >= self.interval

    def feed(self, *, force: bool = False) -> bool:
        """Send ``WATCHDOG=1`` when one is due (or ``force``). True when a ping was sent."""
        if not self.enabled or not (force or self.due()):
            return False
        sent = self.notifier.watchdog()
        if sent:
            self._last = self._clock()
        return sent

    async def run(self, healthy: Callable[[], bool] | None = None) -> None:
        """Feed from the running event loop until cancelled; skip a ping while ``healthy()`` is False."""
        if not self.enabled:
            return
        assert self.interval is not None
        # Wake a few times per interval so a late ping never misses the deadline.
        tick = max(min(self.interval / 2, 5.0), 0.01)
        while True:
            if healthy is None or healthy():
                self.feed()
            await asyncio.sleep(tick)
