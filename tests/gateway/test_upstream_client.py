"""UpstreamClient against real loopback servers: scripted raw HTTP/1.1 ones, and aiohttp's."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.errors import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout
from gateway.upstream_client import READ_HIGH_WATER, UpstreamClient
from tests.netutil import self_signed, unresponsive_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    """One request: (request line, fields by lower-case name, decoded body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    line, *fields = head[:-4].split(b"\r\n")
    headers = {}
    for field in fields:
        name, _, value = field.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readexactly(2)
    return line, headers, body


class RawServer:
    """A loopback server that runs ``handler(reader, writer, n)`` per accepted connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.requests: list[tuple[bytes, dict[str, str], bytes]] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(reader, writer, self.accepted)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self.tasks.discard(task)

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.server.wait_closed()


def keep_alive_server(answer: bytes = OK) -> RawServer:
    """Answers every request on a connection with ``answer`` until the client closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            server.requests.append(await read_request(reader))
            writer.write(answer)
            await writer.drain()

    server = RawServer(handler)
    return server


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient(limit=10, keepalive_timeout=30.0)
    yield c
    await c.close()


def later(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def get(
    c: UpstreamClient, origin: str, target: str = "/", method: str = "GET", **kw: Any
) -> tuple[int, bytes]:
    resp = await c.request(origin, method, target, {}, connect_timeout=2, deadline=later(5), **kw)
    body = await resp.read(later(5))
    return resp.status, body


# --- pooling --------------------------------------------------------------------------------


async def test_keep_alive_connection_is_reused(client: UpstreamClient) -> None:
    server = keep_alive_server()
    async with server as origin:
        for _ in range(3):
            assert await get(client, origin) == (200, b"ok")
        assert server.accepted == 1
        assert client.idle_count(origin) == 1
        assert client.in_use == 0
        line, headers, _ = server.requests[0]
        assert line == b"GET / HTTP/1.1"
        assert headers["host"] == origin.removeprefix("http://")
        assert "content-length" not in headers  # GET without a body: no framing fields


async def test_connection_close_answer_is_not_reused(client: UpstreamClient) -> None:
    server = keep_alive_server(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    )
    async with server as origin:
        assert await get(client, origin) == (200, b"ok")
        assert await get(client, origin) == (200, b"ok")
        assert server.accepted == 2
        assert client.idle_count(origin) == 0


async def test_http10_answer_without_keep_alive_is_not_reused(client: UpstreamClient) -> None:
    server = keep_alive_server(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    async with server as origin:
        resp = await client.request(origin, "GET", "/", {}, connect_timeout=2, deadline=later(5))
        assert resp.version == (1, 0)
        assert await resp.read() == b"ok"
        assert client.idle_count(origin) == 0


async def test_unread_answer_released_mid_body_closes_the_connection(
    client: UpstreamClient,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await reader.read()  # until the client closes

    async with RawServer(handler) as origin:
        resp = await client.request(origin, "GET", "/", {}, connect_timeout=2, deadline=later(5))
        assert await resp.readany() == b"abc"
        resp.release()  # the answer did not end: never back to the pool
        assert client.idle_count(origin) == 0
        assert client.in_use == 0


async def test_limit_per_endpoint_makes_the_second_request_wait() -> None:
    server = keep_alive_server()
    c = UpstreamClient(limit=10, limit_per_endpoint=1)
    try:
        async with server as origin:
            first = await c.request(origin, "GET", "/", {}, connect_timeout=2, deadline=later(5))
            second = asyncio.create_task(get(c, origin))
            await asyncio.sleep(0.05)
            assert not second.done()  # no slot until the first answer is released
            assert await first.read() == b"ok"
            assert await second == (200, b"ok")
            assert server.accepted == 1  # the waiter took the released connection
    finally:
        await c.close()


async def test_close_idle_closes_pooled_connections_of_the_origin(client: UpstreamClient) -> None:
    server = keep_alive_server()
    async with server as origin:
        await get(client, origin)
        assert client.close_idle([origin]) == 1
        assert client.idle_count(origin) == 0
        await get(client, origin)
        assert server.accepted == 2


async def test_idle_connection_expires_after_keepalive_timeout() -> None:
    server = keep_alive_server()
    c = UpstreamClient(keepalive_timeout=0.05)
    try:
        async with server as origin:
            await get(c, origin)
            assert c.idle_count(origin) == 1
            await asyncio.sleep(0.2)
            assert c.idle_count(origin) == 0
            await get(c, origin)
            assert server.accepted == 2
    finally:
        await c.close()


# --- message framing ------------------------------------------------------------------------


async def test_chunked_answer_streams_chunk_by_chunk(client: UpstreamClient) -> None:
    step = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await step.wait()
            step.clear()
            writer.write(b"6\r\nsecond\r\n0\r\n\r\n")

    server = RawServer(handler)
    async with server as origin:
        resp = await client.request(origin, "GET", "/", {}, connect_timeout=2, deadline=later(5))
        assert resp.content_length is None
        assert await resp.readany() == b"first"  # before the rest was even sent
        step.set()
        assert await resp.readany() == b"second"
        assert await resp.readany() == b""
        resp.release()
        assert client.idle_count(origin) == 1  # a chunked answer that ended keeps the connection
        step.set()
        assert await get(client, origin) == (200, b"firstsecond")
        assert server.accepted == 1


async def test_answer_delimited_by_close_ends_at_eof(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil")
        await writer.drain()
        writer.write(b" close")

    async with RawServer(handler) as origin:
        assert await get(client, origin) == (200, b"until close")
        assert client.idle_count(origin) == 0


async def test_head_answer_has_no_body_despite_its_content_length(client: UpstreamClient) -> None:
    server = keep_alive_server(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    async with server as origin:
        resp = await client.request(origin, "HEAD", "/", {}, connect_timeout=2, deadline=later(1))
        assert resp.content_length == 1234
        assert await resp.read(later(1)) == b""


async def test_interim_1xx_answer_is_skipped(client: UpstreamClient) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    server = keep_alive_server(early + b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    async with server as origin:
        resp = await client.request(origin, "GET", "/", {}, connect_timeout=2, deadline=later(5))
        assert (resp.status, resp.reason) == (201, "Created")
        assert "Link" not in resp.headers
        assert await resp.read() == b"ok"


async def test_bytes_body_goes_with_content_length(client: UpstreamClient) -> None:
    server = keep_alive_server()
    async with server as origin:
        resp = await client.request(
            origin, "POST", "/v1?x=1", {"Content-Length": "999", "X-A": "1"}, b"hello",
            connect_timeout=2, deadline=later(5),
        )  # fmt: skip
        await resp.read()
        empty = await client.request(origin, "POST", "/", {}, connect_timeout=2, deadline=later(5))
        await empty.read()
    (line, headers, body), (_, empty_headers, _) = server.requests
    assert line == b"POST /v1?x=1 HTTP/1.1"
    assert (headers["content-length"], body, headers["x-a"]) == ("5", b"hello", "1")
    assert empty_headers["content-length"] == "0"  # RFC 9110 §8.6


async def test_streamed_body_without_length_is_sent_chunked() -> None:
    seen: dict[str, Any] = {}

    async def echo(request: web.Request) -> web.Response:
        seen["te"] = request.headers.get("Transfer-Encoding")
        seen["body"] = await request.read()
        return web.Response(body=b"done")

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"one ", b"", b"two ", b"three" * 10000):
            await asyncio.sleep(0)
            yield part

    app = web.Application()
    app.router.add_post("/up", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    c = UpstreamClient()
    try:
        origin = f"http://127.0.0.1:{port}"
        for _ in range(2):
            resp = await c.request(
                origin, "POST", "/up", {}, parts(), connect_timeout=2, deadline=later(5)
            )
            assert await resp.read() == b"done"
            assert seen == {"te": "chunked", "body": b"one two " + b"three" * 10000}
        assert c.idle_count(origin) == 1  # the body was sent whole: the connection is kept
    finally:
        await c.close()
        await runner.cleanup()


async def test_streamed_body_with_content_length_is_sent_as_is(client: UpstreamClient) -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b"cd"

    server = keep_alive_server()
    async with server as origin:
        resp = await client.request(
            origin, "PUT", "/", {"Content-Length": "4"}, parts(),
            connect_timeout=2, deadline=later(5),
        )  # fmt: skip
        await resp.read()
    [(_, headers, body)] = server.requests
    assert (headers["content-length"], body) == ("4", b"abcd")
    assert "transfer-encoding" not in headers


async def test_failing_body_source_fails_the_request(client: UpstreamClient) -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"ab"
        raise ValueError("the client's body broke")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reader.read()

    async with RawServer(handler) as origin:
        with pytest.raises(UpstreamProtocolError) as caught:
            await client.request(
                origin, "POST", "/", {}, parts(), connect_timeout=2, deadline=later(5)
            )
    assert isinstance(caught.value.__cause__, ValueError)
    assert client.in_use == 0


async def test_header_injection_is_refused(client: UpstreamClient) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        await client.request(
            "http://127.0.0.1:9", "GET", "/", {"X-A": "1\r\nX-Evil: 1"},
            connect_timeout=1, deadline=later(1),
        )  # fmt: skip


# --- failures -------------------------------------------------------------------------------


async def test_refused_connection_is_a_connect_error(client: UpstreamClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UpstreamConnectError):
        await get(client, f"http://127.0.0.1:{port}")
    assert client.in_use == 0


async def test_invalid_http_is_a_protocol_error(client: UpstreamClient) -> None:
    server = keep_alive_server(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    async with server as origin:
        with pytest.raises(UpstreamProtocolError, match="invalid HTTP"):
            await get(client, origin)
    assert client.in_use == 0


async def test_reset_mid_body_is_a_protocol_error(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()

    async with RawServer(handler) as origin:
        resp = await client.request(origin, "GET", "/", {}, connect_timeout=2, deadline=later(5))
        with pytest.raises(UpstreamProtocolError, match="mid-answer"):
            await resp.read(later(5))
    assert client.in_use == 0


def stale_after_first_answer() -> RawServer:
    """Connection 1 answers once, then reads the next request and closes without answering;
    later connections answer normally."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        server.requests.append(await read_request(reader))
        writer.write(OK)
        await writer.drain()
        if n == 1:
            await read_request(reader)
            return  # closed: the kept-alive connection went stale under the request
        while True:
            server.requests.append(await read_request(reader))
            writer.write(OK)

    server = RawServer(handler)
    return server


async def test_stale_pooled_connection_is_retried_once_when_safe(client: UpstreamClient) -> None:
    server = stale_after_first_answer()
    async with server as origin:
        assert await get(client, origin) == (200, b"ok")
        assert await get(client, origin, retry_stale=True) == (200, b"ok")
        assert server.accepted == 2


async def test_stale_pooled_connection_is_not_retried_when_unsafe(client: UpstreamClient) -> None:
    server = stale_after_first_answer()
    async with server as origin:
        assert await get(client, origin) == (200, b"ok")
        with pytest.raises(UpstreamProtocolError, match="kept-alive"):
            await get(client, origin, method="POST", retry_stale=False)
        assert server.accepted == 1
    assert client.in_use == 0


async def test_first_byte_timeout(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reader.read()  # never answers

    async with RawServer(handler) as origin:
        with pytest.raises(UpstreamTimeout) as caught:
            await client.request(origin, "GET", "/", {}, connect_timeout=2, deadline=later(0.05))
    assert caught.value.phase == "first_byte"
    assert client.in_use == 0


async def test_total_phase_is_reported_as_the_caller_names_it(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reader.read()

    async with RawServer(handler) as origin:
        with pytest.raises(UpstreamTimeout) as caught:
            await client.request(
                origin, "GET", "/", {}, connect_timeout=2, deadline=later(0.05), phase="total"
            )
    assert caught.value.phase == "total"


async def test_idle_timeout_while_reading_the_body(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await reader.read()

    async with RawServer(handler) as origin:
        resp = await client.request(origin, "GET", "/", {}, connect_timeout=2, deadline=later(5))
        with pytest.raises(UpstreamTimeout) as caught:
            await resp.read(later(0.05))
    assert caught.value.phase == "idle"
    assert client.in_use == 0
    assert client.idle_count(origin) == 0


async def test_connect_timeout() -> None:
    with unresponsive_port() as port:
        c = UpstreamClient()
        try:
            with pytest.raises(UpstreamTimeout) as caught:
                await c.request(
                    f"http://127.0.0.1:{port}", "GET", "/", {}, connect_timeout=0.1,
                    deadline=later(5),
                )  # fmt: skip
            assert caught.value.phase == "connect"
            assert c.in_use == 0
        finally:
            await c.close()


# --- backpressure ---------------------------------------------------------------------------


async def test_reading_pauses_while_the_reader_is_behind(client: UpstreamClient) -> None:
    size = 16 * READ_HIGH_WATER

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // 16384):
            writer.write(b"x" * 16384)
            await writer.drain()
        await reader.read()  # keep the connection open

    async with RawServer(handler) as origin:
        resp = await client.request(origin, "GET", "/", {}, connect_timeout=2, deadline=later(5))
        total = 0
        while chunk := await resp.readany():
            # at most one socket read (asyncio's is up to 256 KiB) past the mark
            assert len(chunk) <= READ_HIGH_WATER + 256 * 1024
            total += len(chunk)
            await asyncio.sleep(0.005)  # a slow client
        resp.release()
        assert total == size
        assert client.idle_count(origin) == 1


# --- names and TLS --------------------------------------------------------------------------


class StubResolver:
    """Stands in for TTLResolver: answers every name with 127.0.0.1 and records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
        self.calls.append((host, port))
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]  # fmt: skip


async def test_names_go_through_the_resolver_and_ip_literals_do_not() -> None:
    server = keep_alive_server()
    resolver = StubResolver()
    c = UpstreamClient(resolver=resolver)  # type: ignore[arg-type]
    try:
        async with server as origin:
            port = int(origin.rsplit(":", 1)[1])
            assert await get(c, origin) == (200, b"ok")
            assert resolver.calls == []
            assert await get(c, f"http://upstream.test:{port}") == (200, b"ok")
            assert resolver.calls == [("upstream.test", port)]
            assert server.requests[1][1]["host"] == f"upstream.test:{port}"
    finally:
        await c.close()


async def test_https_origin_speaks_tls_and_verifies_the_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "upstream")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"tls={request.secure}")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    origin = f"https://127.0.0.1:{port}"
    trusting = UpstreamClient(ssl_context=ssl.create_default_context(cafile=str(cert)))
    default = UpstreamClient()
    try:
        for _ in range(2):
            assert await get(trusting, origin) == (200, b"tls=True")
        assert trusting.idle_count(origin) == 1
        with pytest.raises(UpstreamConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await get(default, origin)  # the system's CAs do not know the self-signed cert
    finally:
        await trusting.close()
        await default.close()
        await runner.cleanup()
