"""The providers' HTTP client against real servers on loopback: each server below answers in one way a provider
can (lengths, chunks, the end of the connection, encodings, interim answers, TLS), or misbehaves as one can
(silence, a trickle, a broken body, nonsense, a closed connection)."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import brotli
import pytest

from caracald.gateway.http_client import (
    UpstreamClient,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnreachableError,
)
from tests.harness.ports import free_port
from tests.harness.tls import self_signed

Handler = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A loopback server that reads each request (head and ``Content-Length`` body) and lets ``handler``
    answer it; counts connections, and the most open at once."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[bytes] = []
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, tls: ssl.SSLContext | None = None) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def url(self, path: str = "/v1/thing", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + (await reader.readexactly(length) if length else b"")
                self.requests.append(request)
                await self.handler(request, reader, writer)
                if writer.is_closing():
                    return
        finally:
            self.open -= 1
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def answer(body: bytes, status: str = "200 OK", *headers: str) -> Handler:
    async def handle(_request: bytes, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()

    return handle


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    servers: list[Server] = []

    async def start(handler: Handler, tls: ssl.SSLContext | None = None) -> Server:
        server = await Server(handler).start(tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    made = UpstreamClient(connect_timeout=2, read_timeout=2, total_timeout=5)
    yield made
    await made.close()


# -- answers as providers give them ------------------------------------------------------------------------


async def test_a_request_goes_out_as_given_and_its_answer_comes_back(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    server = await serve(answer(b'{"ok": true}', "201 Created", "Content-Type: application/json"))
    response = await client.request(
        "POST", server.url("/v1/chat?x=1"), [(b"authorization", b"Bearer sk-1")], b'{"a": 1}'
    )
    assert response.status == 201
    assert response.header(b"content-type") == b"application/json"
    assert await response.read() == b'{"ok": true}'
    response.release()
    request = server.requests[0]
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat?x=1 HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}".encode() in lines
    assert b"authorization: Bearer sk-1" in lines
    assert b"Content-Length: 8" in lines
    assert b"Accept-Encoding: gzip, deflate, br" in lines
    assert body == b'{"a": 1}'


async def test_connections_are_kept_and_reused(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    server = await serve(answer(b"hello"))
    for _ in range(5):
        response = await client.request("GET", server.url(), [])
        assert await response.read() == b"hello"
        response.release()
    assert server.connections == 1


async def test_a_connection_the_server_closed_while_idle_is_not_used_again(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    async def once_then_close(
        request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await answer(b"bye")(request, reader, writer)
        writer.close()

    server = await serve(once_then_close)
    for _ in range(3):
        response = await client.request("GET", server.url(), [])
        assert await response.read() == b"bye"
        response.release()
        await asyncio.sleep(0.05)  # the server's close reaches the idle connection
    assert server.connections == 3


async def test_a_chunked_answer_is_handed_out_as_it_arrives(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    go_on = asyncio.Event()

    async def chunked(_request: bytes, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await go_on.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()

    server = await serve(chunked)
    response = await client.request("GET", server.url(), [])
    chunks = response.iter_chunks()
    assert await anext(chunks) == b"first"  # before the rest was even sent
    go_on.set()
    assert [chunk async for chunk in chunks] == [b"second"]
    response.release()
    again = await client.request("GET", server.url(), [])
    assert await again.read() == b"firstsecond"
    assert server.connections == 1


async def test_an_answer_that_ends_with_the_connection(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    async def until_close(
        _request: bytes, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    server = await serve(until_close)
    response = await client.request("GET", server.url(), [])
    assert await response.read() == b"all of it"
    response.release()


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("br", brotli.compress),
    ],
)
async def test_encoded_answers_are_decoded(
    serve: Callable[..., Awaitable[Server]],
    client: UpstreamClient,
    encoding: str,
    encode: Callable[[bytes], bytes],
) -> None:
    text = b'{"usage": {"prompt_tokens": 3}}' * 200
    server = await serve(answer(encode(text), "200 OK", f"Content-Encoding: {encoding}"))
    response = await client.request("GET", server.url(), [])
    assert response.decoded
    assert await response.read() == text


async def test_an_encoding_not_asked_for_passes_as_it_came(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    server = await serve(answer(b"\x28\xb5\x2f\xfd opaque", "200 OK", "Content-Encoding: zstd"))
    response = await client.request("GET", server.url(), [])
    assert not response.decoded
    assert await response.read() == b"\x28\xb5\x2f\xfd opaque"


async def test_an_answer_that_claims_gzip_but_is_not_fails_cleanly(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    server = await serve(answer(b"not gzip at all", "200 OK", "Content-Encoding: gzip"))
    response = await client.request("GET", server.url(), [])
    with pytest.raises(UpstreamError, match="cannot be decoded"):
        await response.read()


async def test_head_and_no_content_answers_have_no_body(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    async def head_or_empty(
        request: bytes, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if request.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    server = await serve(head_or_empty)
    head = await client.request("HEAD", server.url(), [])
    assert head.status == 200
    assert await asyncio.wait_for(head.read(), 1) == b""
    head.release()
    empty = await client.request("DELETE", server.url(), [])
    assert empty.status == 204
    assert await asyncio.wait_for(empty.read(), 1) == b""
    empty.release()


async def test_an_interim_answer_is_skipped(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    async def interim(_request: bytes, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
        await writer.drain()

    server = await serve(interim)
    response = await client.request("POST", server.url(), [], b"{}")
    assert response.status == 200
    assert await response.read() == b"done"


async def test_a_large_answer_read_slowly_arrives_whole(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    body = bytes(range(256)) * 8192  # 2 MiB: more than the client queues before it stops reading
    server = await serve(answer(body))
    response = await client.request("GET", server.url(), [])
    received = bytearray()
    async for chunk in response.iter_chunks():
        received += chunk
        await asyncio.sleep(0)
    assert bytes(received) == body
    response.release()


# -- limits -------------------------------------------------------------------------------------------------


async def test_calls_beyond_the_origin_limit_wait_their_turn(serve: Callable[..., Awaitable[Server]]) -> None:
    async def slowly(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.05)
        await answer(b"ok")(request, reader, writer)

    server = await serve(slowly)
    limited = UpstreamClient(connect_timeout=2, read_timeout=2, total_timeout=5, limit_per_origin=2)
    try:

        async def call() -> bytes:
            response = await limited.request("GET", server.url(), [])
            try:
                return await response.read()
            finally:
                response.release()

        assert await asyncio.gather(*(call() for _ in range(8))) == [b"ok"] * 8
        assert server.most_open <= 2
        assert len(server.requests) == 8
    finally:
        await limited.close()


# -- failures -----------------------------------------------------------------------------------------------


async def test_nobody_listening_is_unreachable(client: UpstreamClient) -> None:
    with pytest.raises(UpstreamUnreachableError):
        await client.request("GET", f"http://127.0.0.1:{free_port()}/", [])


async def test_a_url_without_a_usable_scheme_is_unreachable(client: UpstreamClient) -> None:
    with pytest.raises(UpstreamUnreachableError, match="http or https"):
        await client.request("GET", "ftp://127.0.0.1/file", [])


async def test_silence_is_a_timeout(serve: Callable[..., Awaitable[Server]]) -> None:
    async def silent(_request: bytes, reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up

    server = await serve(silent)
    impatient = UpstreamClient(connect_timeout=1, read_timeout=0.3, total_timeout=10)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamTimeoutError):
            await impatient.request("POST", server.url(), [], b"{}")
        assert 0.25 < asyncio.get_running_loop().time() - started < 2
    finally:
        await impatient.close()


async def test_a_trickle_is_cut_at_the_total_timeout(serve: Callable[..., Awaitable[Server]]) -> None:
    async def trickle(_request: bytes, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while not writer.is_closing():
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)

    server = await serve(trickle)
    bounded = UpstreamClient(connect_timeout=1, read_timeout=1, total_timeout=0.6)
    try:
        response = await bounded.request("GET", server.url(), [])
        with pytest.raises(UpstreamTimeoutError):
            await response.read()
    finally:
        await bounded.close()


async def test_a_body_that_breaks_off_is_an_error(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    async def broken(_request: bytes, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.close()

    server = await serve(broken)
    response = await client.request("GET", server.url(), [])
    with pytest.raises(UpstreamError, match="closed the connection"):
        await response.read()


async def test_a_connection_closed_before_the_answer_is_an_error(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    async def hang_up(_request: bytes, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await serve(hang_up)
    with pytest.raises(UpstreamError):
        await client.request("POST", server.url(), [], b"{}")


async def test_nonsense_instead_of_http_is_an_error(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    async def nonsense(_request: bytes, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()

    server = await serve(nonsense)
    with pytest.raises(UpstreamError, match="not valid HTTP"):
        await client.request("GET", server.url(), [])


# -- TLS ----------------------------------------------------------------------------------------------------


async def test_tls_with_a_trusted_certificate_and_not_with_an_unknown_one(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient, tmp_path: Path
) -> None:
    cert_file, key_file = self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert_file, key_file)
    server = await serve(answer(b"secret"), server_tls)
    trusting = ssl.create_default_context(cafile=str(cert_file))
    trusted = UpstreamClient(connect_timeout=2, read_timeout=2, total_timeout=5, tls_context=trusting)
    try:
        response = await trusted.request("GET", server.url(scheme="https"), [])
        assert await response.read() == b"secret"
    finally:
        await trusted.close()
    with pytest.raises(
        UpstreamUnreachableError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"
    ):
        await client.request("GET", server.url(scheme="https"), [])


async def test_a_caller_cancelled_while_waiting_for_its_turn_does_not_keep_it(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    server = await serve(answer(b"ok"))
    single = UpstreamClient(connect_timeout=2, read_timeout=5, total_timeout=10, limit_per_origin=1)
    try:

        async def call() -> bytes:
            response = await single.request("GET", server.url(), [])
            try:
                return await response.read()
            finally:
                response.release()

        first = await single.request("GET", server.url(), [])  # the one place this origin has
        impatient = asyncio.ensure_future(call())
        patient = asyncio.ensure_future(call())
        await asyncio.sleep(0.05)  # both wait their turn, the impatient one first
        assert await first.read() == b"ok"
        first.release()  # the impatient caller's turn comes...
        impatient.cancel()  # ...as it is cancelled, before it could take it: the turn must pass on
        assert await asyncio.wait_for(patient, 2) == b"ok"
        assert server.connections == 1
    finally:
        await single.close()
