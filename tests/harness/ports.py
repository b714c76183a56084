"""Free TCP ports on the loopback interface.

Ports are picked at random *below* the kernel's ephemeral range: a port handed out by binding
port 0 comes from the ephemeral range, where any outgoing connection (our own clients included)
may take it again before a service binds it, or before a stopped service is restarted on it.
A port is checked by binding it (without ``SO_REUSEADDR``, so a port that still has sockets in
``TIME_WAIT`` counts as busy), and the same port is never handed out twice by one process.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

LOOPBACK = "127.0.0.1"

_FALLBACK_EPHEMERAL = (32768, 60999)
_LOWEST = 20000
_lock = threading.Lock()
_handed_out: set[int] = set()
_rng = random.SystemRandom()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (``net.ipv4.ip_local_port_range``)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return _FALLBACK_EPHEMERAL


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when nothing is bound to ``host:port`` (TCP) right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_accepts(port: int, host: str = LOOPBACK, timeout: float = 0.2) -> bool:
    """True when a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _kernel_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` now and was not handed out before by this process."""
    low, _high = ephemeral_range()
    with _lock:
        if low - 1 > _LOWEST + 1000:
            for _ in range(500):
                port = _rng.randint(_LOWEST, low - 1)
                if port not in _handed_out and port_is_free(port, host):
                    _handed_out.add(port)
                    return port
        # The range below the ephemeral ports is crowded or too small: let the kernel choose.
        for _ in range(100):
            port = _kernel_port(host)
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError(f"could not find a free TCP port on {host}")


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct free ports (see :func:`free_port`)."""
    return [free_port(host) for _ in range(count)]
