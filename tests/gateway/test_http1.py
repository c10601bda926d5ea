"""The gateway listener's HTTP/1.1 server, over real loopback sockets.

Each test starts an ``Http1Server`` with a small handler and speaks raw HTTP to it, so framing,
keep-alive, pipelining, back-pressure and the error answers are checked byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest

from gateway.http1 import Http1Server, Request, Response, StreamResponse

Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


class Listener:
    """An Http1Server on a loopback port; ``connect()`` opens a raw client connection."""

    def __init__(self, server: Http1Server, listener: asyncio.Server) -> None:
        self.server = server
        self.listener = listener
        self.port = listener.sockets[0].getsockname()[1]
        self.clients: list[asyncio.StreamWriter] = []

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.clients.append(writer)
        return reader, writer


Serve = Callable[..., Awaitable[Listener]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    opened: list[Listener] = []

    async def start(handler: Handler, **limits: float) -> Listener:
        server = Http1Server(handler, **limits)  # type: ignore[arg-type]
        listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
        opened.append(Listener(server, listener))
        return opened[-1]

    yield start
    for one in opened:
        for writer in one.clients:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        one.listener.close()
        await one.server.shutdown(0.5)


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One answer, framed by Content-Length or chunked coding."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await asyncio.wait_for(reader.read(), 5)
    return status, headers, body


async def echo(request: Request) -> Response:
    body = await request.read()
    info = {
        "method": request.method, "path": request.path, "raw_path": request.raw_path,
        "host": request.host, "version": list(request.version), "body": body.decode(),
        "remote": request.remote, "length": request.content_length,
    }  # fmt: skip
    return Response(200, orjson.dumps(info), {"Content-Type": "application/json"})


async def test_keep_alive_answers_several_requests_on_one_connection(serve: Serve) -> None:
    listener = await serve(echo)
    reader, writer = await listener.connect()
    for n in range(3):
        writer.write(f"GET /n/{n}?q=1 HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        status, headers, body = await read_answer(reader)
        assert status == 200
        assert "connection" not in headers
        assert "date" in headers
        info = orjson.loads(body)
        assert (info["path"], info["raw_path"], info["host"]) == (f"/n/{n}", f"/n/{n}?q=1", "gw")
    writer.close()


async def test_pipelined_requests_are_answered_in_order(serve: Serve) -> None:
    async def slow_first(request: Request) -> Response:
        if request.path == "/1":
            await asyncio.sleep(0.05)
        return Response(200, request.path.encode())

    listener = await serve(slow_first)
    reader, writer = await listener.connect()
    writer.write(b"".join(f"GET /{n} HTTP/1.1\r\nHost: gw\r\n\r\n".encode() for n in (1, 2, 3)))
    assert [(await read_answer(reader))[2] for _ in range(3)] == [b"/1", b"/2", b"/3"]
    writer.close()


async def test_http10_closes_unless_keep_alive_asked(serve: Serve) -> None:
    listener = await serve(echo)
    reader, writer = await listener.connect()
    writer.write(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    status, headers, body = await read_answer(reader)
    assert headers["connection"] == "keep-alive"
    assert orjson.loads(body)["host"] == "127.0.0.1"  # no Host field: the local address
    writer.write(b"GET /b HTTP/1.0\r\n\r\n")
    status, headers, _ = await read_answer(reader)
    assert (status, headers["connection"]) == (200, "close")
    assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_chunked_request_body_is_reassembled(serve: Serve) -> None:
    listener = await serve(echo)
    reader, writer = await listener.connect()
    writer.write(
        b"POST /c HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    _, _, body = await read_answer(reader)
    assert orjson.loads(body)["body"] == "hello world"
    assert orjson.loads(body)["length"] is None
    writer.close()


async def test_streamed_answer_is_chunked_and_ends(serve: Serve) -> None:
    async def stream(request: Request) -> StreamResponse:
        resp = StreamResponse(200, None, {"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for n in range(3):
            await resp.write(f"data: {n}\n\n".encode())
        await resp.write_eof()
        return resp

    listener = await serve(stream)
    reader, writer = await listener.connect()
    writer.write(b"GET /s HTTP/1.1\r\nHost: gw\r\n\r\n")
    _, headers, body = await read_answer(reader)
    assert headers["transfer-encoding"] == "chunked"
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    writer.write(b"HEAD /s HTTP/1.1\r\nHost: gw\r\n\r\n")  # same connection: framing held
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding" not in head.lower()
    writer.close()


async def test_head_answer_keeps_length_and_sends_no_body(serve: Serve) -> None:
    async def sized(request: Request) -> Response:
        return Response(200, b"x" * 10)

    listener = await serve(sized)
    reader, writer = await listener.connect()
    writer.write(b"HEAD / HTTP/1.1\r\nHost: gw\r\n\r\nGET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"Content-Length: 10\r\n" in head
    status, _, body = await read_answer(reader)  # the next answer starts right after the head
    assert (status, body) == (200, b"x" * 10)
    writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [(b"GET /" + b"a" * 300 + b" HTTP/1.1\r\n\r\n", 414),
     (b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 300 + b"\r\n\r\n", 431),
     (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(20)) + b"\r\n", 431),
     (b"NOT HTTP AT ALL\r\n\r\n", 400),
     (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
     # request smuggling's tools (RFC 9112 §6.3): CL with TE, TE not ending in chunked
     (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
      b"\r\n0\r\n\r\n", 400),
     (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
     (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n folded\r\n\r\n", 400),  # obs-fold
     (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),  # whitespace before the colon
     (b"GET / HTTP/1.1\r\nX: 1\r\n\r\n", 400),  # no Host (RFC 9112 §3.2)
     (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400)],  # two Hosts
)  # fmt: skip
async def test_bad_requests_get_problem_json_and_close(
    serve: Serve, request_bytes: bytes, status: int
) -> None:
    listener = await serve(echo, max_line=200, max_field=200, max_headers=10)
    reader, writer = await listener.connect()
    writer.write(request_bytes)
    got, headers, body = await read_answer(reader)
    assert got == status
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert orjson.loads(body)["status"] == status
    assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_endless_header_section_is_cut_at_the_limit(serve: Serve) -> None:
    listener = await serve(echo, max_line=200, max_field=200, max_headers=10)
    reader, writer = await listener.connect()
    writer.write(b"GET / HTTP/1.1\r\nX-Endless: ")
    for _ in range(20):  # one field value, never finished, past max_line + 10 * 200 bytes
        writer.write(b"v" * 200)
    status, _, _ = await read_answer(reader)
    assert status == 431


async def test_unread_body_is_discarded_so_the_client_reads_the_answer(serve: Serve) -> None:
    async def refuse(request: Request) -> Response:
        return Response(413, b"too large")  # answers without reading the body

    listener = await serve(refuse)
    reader, writer = await listener.connect()
    size = 4 * 1024 * 1024
    writer.write(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % size)
    status, headers, body = await read_answer(reader)
    assert (status, body, headers["connection"]) == (413, b"too large", "close")
    writer.write(b"z" * size)  # the server drops it, then closes: no reset
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_large_body_streams_with_back_pressure(serve: Serve) -> None:
    seen: list[int] = []

    async def count(request: Request) -> Response:
        async for chunk in request.content.iter_any():
            seen.append(len(chunk))
            await asyncio.sleep(0.001)  # a slow consumer: reading pauses meanwhile
        return Response(200, str(sum(seen)).encode())

    listener = await serve(count)
    reader, writer = await listener.connect()
    size = 8 * 1024 * 1024
    writer.write(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % size)
    writer.write(b"y" * size)
    _, _, body = await read_answer(reader)
    assert int(body) == size
    assert max(seen) <= 2 * 1024 * 1024  # never the whole body in memory at once
    writer.close()


async def test_client_leaving_cancels_the_handler(serve: Serve) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hang(request: Request) -> Response:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response(200)

    listener = await serve(hang)
    _, writer = await listener.connect()
    writer.write(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    await asyncio.wait_for(started.wait(), 5)
    writer.close()
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_idle_connection_closes_after_keepalive_timeout(serve: Serve) -> None:
    listener = await serve(echo, keepalive_timeout=0.2)
    reader, writer = await listener.connect()
    writer.write(b"GET / HTTP/1.1\r\nHo")  # a header section that never completes
    assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_draining_says_close_and_close_idle_closes_idle_ones(serve: Serve) -> None:
    listener = await serve(echo)
    idle_reader, idle_writer = await listener.connect()
    idle_writer.write(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    await read_answer(idle_reader)
    listener.server.draining = True
    assert listener.server.close_idle() == 1
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""
    reader, writer = await listener.connect()
    writer.write(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    _, headers, _ = await read_answer(reader)
    assert headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_header_injection_in_an_answer_is_refused(serve: Serve) -> None:
    async def inject(request: Request) -> Response:
        return Response(200, b"", {"X-Evil": "a\r\nSet-Cookie: b"})

    listener = await serve(inject)
    reader, writer = await listener.connect()
    writer.write(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 5) == b""  # nothing of it went out


async def test_a_large_whole_answer_arrives_intact(serve: Serve) -> None:
    body = bytes(range(256)) * 8192  # 2 MiB: written without joining it to the head

    async def large(request: Request) -> Response:
        return Response(200, body, {"Content-Type": "application/octet-stream"})

    listener = await serve(large)
    reader, writer = await listener.connect()
    for _ in range(2):  # the connection stays usable after it
        writer.write(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        status, headers, got = await read_answer(reader)
        assert (status, int(headers["content-length"]), got == body) == (200, len(body), True)
