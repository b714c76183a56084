"""The HTTP/1.1 client of the provider calls: keep-alive connections per origin, answers parsed by httptools.

The gateway used aiohttp's client first. Measured on one keep-alive connection to the fake provider (uvloop,
one call at a time, the same request; ``bench/upstream_client_bench.py``), aiohttp's took 0.37 to 0.41 ms per
call at p50 and 190 to 215 us of CPU, this one 0.26 to 0.29 ms and 97 to 111 us: a call is one ``writev`` of
the request and a parser in C over what comes back, where aiohttp builds a request object, a URL, header
dictionaries, timers and a task to write the body.

What it does: HTTP/1.1 over TCP or TLS (the system's trust store, the host name verified); one request at a
time per connection; idle connections kept per origin (scheme, host, port) for ``keepalive`` seconds, at most
``limit_per_origin`` open per origin (callers beyond it wait their turn); request bodies sent whole with their
``Content-Length``; answers delimited by length, by chunks or by the end of the connection; gzip, deflate and
brotli answers decoded as they arrive (the encoding the client asked for in ``Accept-Encoding``). What it does
not do: proxies, redirects (the gateway passes them back), cookies, HTTP/2, ``Expect: 100-continue``.

Timeouts: ``connect`` to open a connection (a TLS handshake included): past it the provider counts as
unreachable, nothing was sent; ``read`` for each wait for bytes of the answer; ``total`` for the whole call
once it has a connection, headers and body.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ssl
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final, cast
from urllib.parse import urlsplit

import brotli
import httptools

#: What the gateway asks providers for; each is decoded on the way back.
ACCEPT_ENCODING: Final = b"gzip, deflate, br"
#: Answer bytes queued for a slow reader before the connection stops reading.
_HIGH_WATER: Final = 256 * 1024
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}

Header = tuple[bytes, bytes]
_Decoder = Callable[[bytes], bytes]


class UpstreamError(Exception):
    """The provider could not be reached, or its answer was malformed or broke off."""


class UpstreamUnreachableError(UpstreamError):
    """No connection to the provider could be opened: nothing was sent."""


class UpstreamTimeoutError(UpstreamError, TimeoutError):
    """The provider's answer did not come in time (it may have done the work)."""


def _decoder(encoding: bytes) -> _Decoder | None:
    """The decoder of a ``Content-Encoding`` the gateway asked for (None: not one of them)."""
    name = encoding.strip().lower()
    if name in (b"gzip", b"x-gzip", b"deflate"):
        return zlib.decompressobj(wbits=47).decompress  # 32 + 15: a gzip or zlib header, told apart
    if name == b"br":
        process: _Decoder = brotli.Decompressor().process
        return process
    return None


class UpstreamResponse:
    """An answer whose status and headers have arrived; its body is read with :meth:`read` or
    :meth:`iter_chunks`, then the connection goes back with :meth:`release` (or is dropped by :meth:`close`).
    """

    __slots__ = ("_connection", "decoded", "headers", "status")

    def __init__(self, connection: _Connection, status: int, headers: list[Header], decoded: bool) -> None:
        self._connection = connection
        self.status = status
        #: The answer's headers as they came (names in their case, values raw).
        self.headers = headers
        #: Whether the body is handed out decoded (the provider used an encoding asked for).
        self.decoded = decoded

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    async def read(self) -> bytes:
        """The whole body (decoded)."""
        connection = self._connection
        parts = []
        while (chunk := await connection.next_chunk()) is not None:
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (decoded)."""
        connection = self._connection
        while True:
            chunk = await connection.next_chunk()
            if chunk is None:
                return
            if chunk:
                yield chunk

    def release(self) -> None:
        """Give the connection back for another call when the body was read whole; else close it."""
        self._connection.release()

    def close(self) -> None:
        """Drop the connection (the provider sees it closed, and stops)."""
        self._connection.close()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an origin, one request at a time."""

    def __init__(self, pool: _Origin) -> None:
        self._pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._counted = True  # holds one of the origin's places until it closes
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._head: list[Header] = []
        self._head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._body_waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._error: BaseException | None = None
        self._decode: _Decoder | None = None
        self._framed = False  # the answer says where it ends (a length, chunks, or a status without body)
        self._head_only = False  # a HEAD request's answer: no body, whatever its headers say
        self._interim = False  # a 1xx answer is being read: the real one follows
        self._reusable = False
        self._paused = False
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0

    # -- the call -------------------------------------------------------------------------------------

    def send(
        self, head: bytes, body: bytes, *, head_only: bool, deadline: float
    ) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self._head = []
        self._chunks.clear()
        self._queued = 0
        self._complete = self._reusable = self._framed = self._interim = False
        self._error = None
        self._decode = None
        self._head_only = head_only
        self._deadline = deadline
        self._last_data = self.loop.time()
        waiter = self._head_waiter = self.loop.create_future()
        self.transport.writelines((head, body) if body else (head,))
        self._arm()
        return waiter

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body (decoded; b"" when a piece decoded to nothing), or None at its end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return None
            self._body_waiter = self.loop.create_future()
            self._last_data = self.loop.time()  # the read timeout counts from the start of each wait
            self._arm()
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None
        chunk = self._chunks.popleft()
        self._queued -= len(chunk)
        if self._paused and self._queued < _HIGH_WATER // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        if self._decode is None:
            return chunk
        try:
            return self._decode(chunk)
        except (zlib.error, brotli.error) as exc:
            self._error = UpstreamError(f"the provider's answer cannot be decoded: {exc}")
            self.close()
            raise self._error from None

    def release(self) -> None:
        self._disarm()
        if self._complete and self._reusable and self._error is None and not self.closed:
            self._pool.put_back(self)
        else:
            self.close()

    def close(self) -> None:
        self._disarm()
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self._leave()

    def _leave(self) -> None:
        if self._counted:
            self._counted = False
            self._pool.forget(self)

    # -- timeouts -------------------------------------------------------------------------------------

    def _arm(self) -> None:
        """Make sure a timer watches the wait (one timer per wait, not per piece of data)."""
        if self._timer is None:
            self._timer = self.loop.call_at(self._due(), self._check_time)

    def _due(self) -> float:
        return min(self._last_data + self._pool.read_timeout, self._deadline)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_time(self) -> None:
        self._timer = None
        if self._head_waiter is None and self._body_waiter is None:
            return  # nobody waits: the next wait arms again
        due = self._due()
        if self.loop.time() < due:
            self._timer = self.loop.call_at(due, self._check_time)
            return
        what = "for the whole call" if due >= self._deadline else "for the next bytes of the answer"
        self._fail(UpstreamTimeoutError(f"the provider did not answer in time ({what})"))
        self.close()

    # -- asyncio.Protocol -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        parser = self._parser
        if parser is None or self._complete:
            # Bytes after the answer ended (or before a request): the connection cannot be trusted again.
            self._reusable = False
            if self._complete and self._body_waiter is None and self._head_waiter is None:
                self.close()
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the provider switched protocols"))
            self.close()
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the provider's answer is not valid HTTP ({exc})"))
            self.close()

    def eof_received(self) -> bool | None:
        if self._head_waiter is None and self._parser is not None and not self._framed and not self._complete:
            self._finish(reusable=False)  # an answer that ends with the connection: this is its end
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        self._leave()
        if self._parser is not None and not self._complete:
            detail = f": {exc}" if exc else ""
            self._fail(UpstreamError(f"the provider closed the connection before the answer ended{detail}"))

    # -- httptools callbacks --------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._complete:
            self._head.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        if parser is None or self._complete:
            self._reusable = False
            return
        status = parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (101 is refused as an upgrade): the real one follows
            self._interim = True
            self._head = []
            return
        decoded = False
        for name, value in self._head:
            lowered = name.lower()
            if lowered == b"content-encoding":
                self._decode = _decoder(value)
                decoded = self._decode is not None
            elif lowered in (b"content-length", b"transfer-encoding"):
                self._framed = True
        if status in (204, 304) or self._head_only:
            self._framed = True
        waiter, self._head_waiter = self._head_waiter, None
        response = UpstreamResponse(self, status, self._head, decoded)
        if self._head_only:
            self._finish(reusable=False)  # a HEAD answer's length describes a body that is not sent
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self._complete:
            return
        self._chunks.append(body)
        self._queued += len(body)
        if self._queued > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if not self._complete:
            parser = self._parser
            self._finish(reusable=parser is not None and parser.should_keep_alive())

    # -- state ----------------------------------------------------------------------------------------

    def _finish(self, *, reusable: bool) -> None:
        self._complete = True
        self._reusable = reusable
        self._disarm()
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._complete:
            self._error = error
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Origin:
    """The connections of one origin: idle ones to reuse (most recent first), and a limit on how many."""

    def __init__(self, client: UpstreamClient, scheme: str, host: str, port: int) -> None:
        self.client = client
        self.scheme = scheme
        self.host = host
        self.port = port
        self.read_timeout = client.read_timeout
        self.idle: collections.deque[_Connection] = collections.deque()
        self.open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> _Connection:
        while self.idle:
            connection = self.idle.pop()
            if connection.closed or connection.transport is None or connection.transport.is_closing():
                continue
            if connection.loop.time() - connection.idle_since > self.client.keepalive:
                connection.close()
                continue
            return connection
        loop = asyncio.get_running_loop()
        while self.open >= self.client.limit_per_origin:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled: the turn passes to the next in line
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if self.idle:
                return await self.acquire()
        self.open += 1
        try:
            return await self._connect()
        except BaseException:
            self.open -= 1
            self._wake_one()
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self.client.tls_context if self.scheme == "https" else None
        try:
            async with asyncio.timeout(self.client.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=tls,
                    server_hostname=self.host if tls is not None else None,
                )
        except TimeoutError:
            raise UpstreamUnreachableError(
                f"no connection to {self.host}:{self.port} within {self.client.connect_timeout:g} s"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamUnreachableError(f"no connection to {self.host}:{self.port}: {exc}") from None
        return connection

    def put_back(self, connection: _Connection) -> None:
        connection.idle_since = connection.loop.time()
        self.idle.append(connection)
        self._wake_one()

    def forget(self, connection: _Connection) -> None:
        """A connection closed (called once for each): it no longer counts, and takes no more calls."""
        if connection in self.idle:
            self.idle.remove(connection)
        self.open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


@functools.lru_cache(maxsize=4096)
def _split(url: str) -> tuple[tuple[str, str, int], str, str]:
    """The origin (scheme, host, port), the ``Host`` header and the request target of ``url`` (remembered:
    a gateway calls the same few URLs again and again)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except (KeyError, ValueError):
        port = 0
    if not port or not parts.hostname:
        raise UpstreamUnreachableError(f"cannot call {url!r}: an http or https URL with a host is needed")
    host = parts.netloc.rpartition("@")[2]
    if parts.port == _DEFAULT_PORTS[scheme]:
        host = host.rpartition(":")[0]
    target = parts.path or "/"
    if parts.query:
        target = f"{target}?{parts.query}"
    return (scheme, parts.hostname, port), host, target


class UpstreamClient:
    """Keep-alive HTTP/1.1 calls to the providers (see the module's docstring)."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        total_timeout: float,
        keepalive: float = 15.0,
        limit_per_origin: int = 500,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.total_timeout = total_timeout
        self.keepalive = keepalive
        self.limit_per_origin = limit_per_origin
        if tls_context is None:
            tls_context = ssl.create_default_context()
            tls_context.set_alpn_protocols(["http/1.1"])
        self.tls_context = tls_context
        self._origins: dict[tuple[str, str, int], _Origin] = {}

    async def request(
        self, method: str, url: str, headers: Sequence[Header], body: bytes = b""
    ) -> UpstreamResponse:
        """Send the request and return once the answer's status and headers are in (the body follows).

        ``url`` is absolute and already encoded; ``headers`` go out as given, after ``Host`` and before the
        ``Content-Length`` and ``Accept-Encoding`` this client sets (the caller leaves those out).
        """
        key, host, target = _split(url)
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = _Origin(self, *key)
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n".encode("latin-1")]
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")
        if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"Accept-Encoding: " + ACCEPT_ENCODING + b"\r\n\r\n")
        head = b"".join(lines)
        connection = await origin.acquire()
        deadline = connection.loop.time() + self.total_timeout
        try:
            return await connection.send(head, body, head_only=method == "HEAD", deadline=deadline)
        except BaseException:
            connection.close()
            raise

    async def close(self) -> None:
        for origin in self._origins.values():
            origin.close()
        self._origins.clear()
