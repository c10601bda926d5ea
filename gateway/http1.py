"""The gateway listener's HTTP/1.1 server: llhttp (httptools) parsing, one write per answer.

aiohttp's web server spent about a quarter of the gateway's CPU per proxied request (request
and response objects, header preparation, writer layers; bench/RESULTS.md has the profile).
The gateway listener needs none of the web framework, so this module serves it directly on an
``asyncio.Protocol``:

* requests are parsed by llhttp through httptools (the parser uvicorn uses), which refuses
  what request smuggling needs (Content-Length with Transfer-Encoding, two Content-Lengths,
  obsolete line folding, bare LF; RFC 9112 §6.3, §5.2); an HTTP/1.1 request without Host,
  or any with two, is refused (RFC 9112 §3.2); limits are checked in the parser callbacks:
  a request line longer than ``max_line`` bytes -> 414 (RFC 9110 §15.5.15), a header field
  line longer than ``max_field`` bytes or more than ``max_headers`` fields -> 431 (RFC 6585
  §5), anything llhttp rejects -> 400; all as problem+json with ``Connection: close``;
* keep-alive and pipelining (RFC 9112 §9.3): requests on a connection are answered in order,
  one at a time; reading pauses while one waits behind another;
* a whole answer (``Response``) goes out in one ``transport.write`` (head and body); a streamed
  one (``StreamResponse``) is length-delimited when the handler gives a Content-Length,
  chunked otherwise (close-delimited to an HTTP/1.0 client), and waits while the client's
  socket is full (back-pressure);
* the request body streams in with back-pressure: reading pauses above ``BODY_HIGH_WATER``
  buffered bytes, unless the handler reads it whole;
* the handler task is cancelled when the client disconnects (aiohttp's
  ``handler_cancellation``); an unread request body is discarded before the connection
  closes, for up to ``LINGER`` seconds (nginx's lingering close), so the client still reads
  the answer;
* a connection idle for ``keepalive_timeout`` seconds closes (checked once a ``TICK``); the
  deadline runs from the previous answer (or the accept) until a request's header section is
  complete, so it also bounds a client that trickles its headers (slowloris);
* ``draining``: every answer says ``Connection: close`` and the connection closes after it
  (RFC 9112 §9.6); ``close_idle()`` closes the idle ones now.

The admin listener stays on aiohttp's web framework, where its routing is wanted.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from email.utils import formatdate
from typing import Any, cast

import httptools
from aiohttp import HttpVersion, HttpVersion10, HttpVersion11
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.errors import (
    PROBLEM_CONTENT_TYPE,
    BadRequest,
    GatewayError,
    HeaderFieldsTooLarge,
)
from gateway.exchange import new_request_id
from gateway.headers import encode_head, without_field

__all__ = [
    "BODY_HIGH_WATER",
    "LINGER",
    "Http1Server",
    "Request",
    "RequestBody",
    "Response",
    "StreamResponse",
    "UriTooLong",
    "problem_response",
]

log = logging.getLogger("geogate.http1")

BODY_HIGH_WATER = 256 * 1024  # bytes of request body buffered before reading pauses
LINGER = 10.0  # seconds an unread request body is discarded for before the connection closes

Headers = Mapping[str, str] | CIMultiDict[str] | CIMultiDictProxy[str]
Handler = Callable[["Request"], Awaitable["Response | StreamResponse"]]

_NO_BODY_STATUSES = frozenset({204, 304})
_REASONS = {s.value: s.phrase for s in http.HTTPStatus}
_HEADER_CODEC = ("utf-8", "surrogateescape")  # as aiohttp and the upstream client decode


class UriTooLong(BadRequest):
    """The request line is longer than the listener's limit (414, RFC 9110 §15.5.15)."""

    status = 414
    slug = "uri-too-long"
    title = "Request line too long"


def problem_response(err: GatewayError, request_id: str | None) -> Response:
    """``err`` as an RFC 9457 problem+json answer, with X-Request-Id when there is one."""
    headers: dict[str, str] = {"Content-Type": PROBLEM_CONTENT_TYPE}
    if request_id:
        headers["X-Request-Id"] = request_id
    headers.update(err.headers())
    return Response(err.status, err.to_problem(request_id), headers)


class _DateCache:
    """The IMF-fixdate ``Date`` field value (RFC 9110 §6.6.1); each server's once-a-second
    tick refreshes it, so no answer pays for reading the clock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = ""
        self.refresh()

    def refresh(self) -> None:
        self.value = formatdate(time.time(), usegmt=True)


_DATE = _DateCache()
_JOIN_LIMIT = 64 * 1024  # bytes of body copied after the head for a single write
TICK = 1.0  # seconds between sweeps for idle connections (timeouts fire up to this late)


def _status_line(status: int, reason: str | None) -> str:
    return f"HTTP/1.1 {status} {reason or _REASONS.get(status, '')}"


def _date_line(headers: Headers) -> list[str]:
    """The extra lines every answer starts with: Date, unless the handler set one."""
    return [] if "Date" in headers else [f"Date: {_DATE.value}\r\n"]


class Response:
    """A whole answer: status, header fields and body, written in one go.

    Content-Length is set from ``body`` (a given one is replaced), except in an answer to
    HEAD, which keeps a given Content-Length (the size a GET would have had; RFC 9110 §9.3.2)
    and sends no body, and in 204 and 304 answers, which have no body (RFC 9110 §15.3.5,
    §15.4.5).

    Args:
        status: the status code.
        body: the body bytes.
        headers: the header fields; a multidict keeps repeated fields.
        reason: the reason phrase; None: the standard one.
    """

    __slots__ = ("body", "headers", "prepared", "reason", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        headers: Headers | None = None,
        reason: str | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers: Headers = headers if headers is not None else {}
        self.reason = reason
        self.prepared = False

    @property
    def content_length(self) -> int:
        """Body bytes (what Content-Length says for a GET)."""
        return len(self.body)

    def encode(self, method: str, version: HttpVersion, closing: bool) -> tuple[bytes, bytes]:
        """Head and body (empty when none is sent) for the answer to a ``method`` request.

        Args:
            method: the request's method (HEAD gets no body).
            version: the request's HTTP version.
            closing: the connection ends after this answer (``Connection: close``).

        Raises:
            ValueError: a field holds CR or LF.
        """
        status = self.status
        headers = self.headers
        fields: Iterable[tuple[str, str]] = headers.items()
        count = len(headers)
        extra = _date_line(headers)
        body = self.body
        given = headers.get("Content-Length")
        if status in _NO_BODY_STATUSES or status < 200:
            body = b""
            if status != 304 and given is not None:
                fields = without_field(fields, "content-length")
                count = len(fields)
        elif method == "HEAD":
            body = b""
            if given is None:
                extra.append(f"Content-Length: {len(self.body)}\r\n")
        elif given != str(len(body)):
            if given is not None:
                fields = without_field(fields, "content-length")
                count = len(fields)
            extra.append(f"Content-Length: {len(body)}\r\n")
        _connection_line(extra, version, closing)
        head = encode_head(_status_line(status, self.reason), fields, count, extra)
        return head, body


def _connection_line(lines: list[str], version: HttpVersion, closing: bool) -> None:
    if closing:
        lines.append("Connection: close\r\n")
    elif version is HttpVersion10:
        lines.append("Connection: keep-alive\r\n")  # an HTTP/1.0 client asked for it


class StreamResponse:
    """An answer written as it comes: ``prepare`` sends the head, ``write`` each chunk.

    Framing (RFC 9112 §6): the handler's Content-Length when it gives one, else chunked
    transfer coding to an HTTP/1.1 client, else (HTTP/1.0) the end of the connection. No
    body goes to a HEAD request or with a 204 or 304.

    Args:
        status: the status code.
        reason: the reason phrase; None: the standard one.
        headers: the header fields.
    """

    __slots__ = (
        "_chunked",
        "_conn",
        "_no_body",
        "content_length",
        "headers",
        "prepared",
        "reason",
        "status",
    )

    def __init__(self, status: int, reason: str | None = None, headers: Headers | None = None):
        self.status = status
        self.reason = reason
        self.headers: Headers = headers if headers is not None else {}
        self.prepared = False
        self.content_length: int | None = None
        self._conn: Http1Protocol | None = None
        self._chunked = False
        self._no_body = False

    async def prepare(self, request: Request) -> None:
        """Write the head to ``request``'s connection.

        Raises:
            ConnectionResetError: the client has gone.
            ValueError: a field holds CR or LF.
        """
        conn = request.connection
        self._conn = conn
        headers = self.headers
        extra = _date_line(headers)
        given = headers.get("Content-Length")
        closing = conn.closing_after(request)
        if given is not None:
            with contextlib.suppress(ValueError):
                self.content_length = int(given)
        if request.method == "HEAD" or self.status in _NO_BODY_STATUSES or self.status < 200:
            self._no_body = True
        elif given is None:
            if request.version is HttpVersion10:
                closing = conn.must_close = True  # close-delimited
            else:
                extra.append("Transfer-Encoding: chunked\r\n")
                self._chunked = True
        _connection_line(extra, request.version, closing)
        self.prepared = True
        status_line = _status_line(self.status, self.reason)
        await conn.send(encode_head(status_line, headers.items(), len(headers), extra))

    async def write(self, data: bytes) -> None:
        """Send ``data`` as (part of) the body; waits while the client's socket is full.

        Raises:
            ConnectionResetError: the client has gone.
        """
        conn = self._conn
        assert conn is not None, "prepare() first"
        if self._no_body or not data:
            return
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        await conn.send(data)

    async def write_eof(self) -> None:
        """End the body (the last chunk when chunked)."""
        conn = self._conn
        assert conn is not None, "prepare() first"
        if self._chunked:
            self._chunked = False
            await conn.send(b"0\r\n\r\n")


class RequestBody:
    """A request body as it arrives: read whole, or chunk by chunk with back-pressure.

    Reading pauses while more than ``BODY_HIGH_WATER`` bytes wait unread, unless ``read()``
    asked for the whole body (the caller has bounded its size by then).
    """

    __slots__ = ("_buffer", "_conn", "_error", "_size", "_waiter", "_whole", "eof", "received")

    def __init__(self, conn: Http1Protocol) -> None:
        self._conn = conn
        self._buffer: deque[bytes] = deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._whole = False
        self.eof = False
        self.received = 0  # body bytes received so far

    def feed(self, data: bytes) -> None:
        self._buffer.append(data)
        self._size += len(data)
        self.received += len(data)
        if not self._whole and self._size > BODY_HIGH_WATER:
            self._conn.pause_body()
        self._wake()

    def feed_eof(self) -> None:
        self.eof = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        """End the body with ``error`` (the client left, or broke the chunked coding)."""
        if not self.eof:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        await waiter

    async def read(self) -> bytes:
        """The whole body.

        Raises:
            BadRequest: the chunked coding broke (400).
            ConnectionResetError: the client left before the end.
        """
        self._whole = True
        self._conn.resume_body()
        while not self.eof:
            if self._error is not None:
                raise self._error
            await self._wait()
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._size = 0
        return data

    async def readany(self) -> bytes:
        """The next received part of the body; ``b""`` at its end.

        Raises:
            BadRequest: the chunked coding broke (400).
            ConnectionResetError: the client left before the end.
        """
        while not self._buffer:
            if self.eof:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()
        if len(self._buffer) == 1:
            data = self._buffer.popleft()
        else:
            data = b"".join(self._buffer)
            self._buffer.clear()
        self._size = 0
        self._conn.resume_body()
        return data

    async def iter_any(self) -> AsyncIterator[bytes]:
        """Each part of the body as it arrives (what ``readany`` returns), until the end."""
        while chunk := await self.readany():
            yield chunk


class Request:
    """One parsed request, as the pipeline reads it.

    The attribute names are aiohttp's ``BaseRequest`` ones, so stages read either.

    Attributes:
        method: the method, upper case as sent.
        raw_path: the request target as sent (origin form: path and query).
        path: the target's path, percent-decoded.
        headers: the header fields (case-insensitive, repeated fields kept).
        version: ``HttpVersion(1, 1)`` or ``HttpVersion(1, 0)``.
        host: the Host field; for an absolute-form target its host; without either the
            address the connection arrived on.
        scheme: ``https`` on a TLS listener, else ``http``.
        remote: the client's address as text; None on a Unix socket.
        transport: the connection's transport.
        content_length: the Content-Length, or None (chunked or none).
        body_exists: True when the request has a body (a length above 0, or chunked).
        content: the body as it arrives (``RequestBody``).
        should_close: the client wants the connection closed after the answer.

    Raises:
        BadRequest: an HTTP/1.1 request without Host, or any with two (RFC 9112 §3.2).
    """

    __slots__ = (
        "_absolute",
        "_body",
        "_rel_url",
        "body_exists",
        "connection",
        "content",
        "content_length",
        "headers",
        "host",
        "method",
        "path",
        "raw_path",
        "remote",
        "scheme",
        "should_close",
        "transport",
        "version",
    )

    def __init__(
        self,
        conn: Http1Protocol,
        method: str,
        target: str,
        headers: CIMultiDictProxy[str],
        version: HttpVersion,
        should_close: bool,
    ) -> None:
        self.connection = conn
        self.transport = conn.transport
        self.remote = conn.remote
        self.scheme = conn.scheme
        self.method = method
        self.raw_path = target
        self.headers = headers
        self.version = version
        self.should_close = should_close
        self._body: bytes | None = None
        self._rel_url: URL | None = None
        self._absolute: URL | None = None
        hosts = headers.getall("Host", ())
        if len(hosts) > 1 or (not hosts and version is HttpVersion11):
            # RFC 9112 §3.2: an HTTP/1.1 request without Host, or any with two, gets a 400
            raise BadRequest("an HTTP/1.1 request needs exactly one Host field")
        host = hosts[0] if hosts else None
        if target[:1] == "/":
            path = target.partition("?")[0].partition("#")[0]
            self.path = URL.build(path=path, encoded=True).path if "%" in path else path
        else:  # absolute form (RFC 9112 §3.2.2), authority form (CONNECT), asterisk form
            try:
                url = self._absolute = URL(target, encoded=True)
                self.path = url.path
                if url.absolute:
                    host = url.host
            except ValueError:
                self.path = target
        self.host = host if host is not None else conn.local_host
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None else None  # llhttp checked it
        self.body_exists = bool(self.content_length) or "Transfer-Encoding" in headers
        self.content = RequestBody(conn)

    @property
    def rel_url(self) -> URL:
        """The target as a relative URL (path and query, still percent-encoded)."""
        if self._rel_url is None:
            if self._absolute is not None:
                self._rel_url = self._absolute.relative()
            else:
                self._rel_url = URL(self.raw_path.partition("#")[0], encoded=True)
        return self._rel_url

    @property
    def url(self) -> URL:
        """The absolute URL the request names (scheme, host, path and query)."""
        return URL(f"{self.scheme}://{self.host}{self.rel_url.raw_path_qs}", encoded=True)

    async def read(self) -> bytes:
        """The whole body (kept, so later callers get it again); ``b""`` without one.

        Raises:
            BadRequest: the chunked coding broke (400).
            ConnectionResetError: the client left before the end.
        """
        if self._body is None:
            self._body = await self.content.read() if self.body_exists else b""
        return self._body


class Http1Protocol(asyncio.Protocol):
    """One client connection of the gateway listener (see the module docstring)."""

    def __init__(self, server: Http1Server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.local_host = ""
        self.scheme = "http"
        self.must_close = False  # the connection ends after the current answer
        self._parser = httptools.HttpRequestParser(self)
        self._url: list[bytes] = []
        self._url_size = 0
        self._fields: list[tuple[str, str]] = []
        self._head_size = 0  # bytes received of the header section being parsed
        self._in_head = False
        self._parsing: Request | None = None  # between headers complete and message complete
        self._queue: deque[Request] = deque()  # pipelined, waiting for their turn
        self._current: Request | None = None  # the one being answered
        self._task: asyncio.Task[None] | None = None
        self._pending_error: GatewayError | None = None  # answered after the current one
        self._stopped = False  # no more requests are parsed on this connection
        self._after_last = False  # the request that said Connection: close has arrived
        self._discarding = False  # the answer went out; the rest of its body is dropped
        self._reading_paused = False
        self._body_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._close_at: float | None = None  # monotonic seconds; the server's tick closes

    # --- connection events ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast("asyncio.Transport", transport)  # uvloop's is not
        # an asyncio.Transport subclass, but has its methods
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, (tuple, list)) else None
        sock = transport.get_extra_info("sockname")
        self.local_host = str(sock[0]) if isinstance(sock, (tuple, list)) else ""
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        self.server.connections.add(self)
        self._arm_timer(self.server.keepalive_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.server.connections.discard(self)
        self._cancel_timer()
        self._stopped = True
        gone = ConnectionResetError("the client closed the connection")
        for request in (self._current, self._parsing):
            if request is not None:
                request.content.fail(gone)
        if self._task is not None and not self._task.done():
            self._task.cancel()  # aiohttp's handler_cancellation: the client left
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(gone)
        self.transport = None

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def eof_received(self) -> bool:
        # as aiohttp: a client that ends its side has left; the transport closes, which
        # cancels the answer in progress (an SSE stream must not run on for nobody)
        return False

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        if self._in_head or self._parsing is None:
            self._head_size += len(data)
            if self._head_size > self.server.max_head:
                self._parse_failed(HeaderFieldsTooLarge("the header section is too large"))
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade and CONNECT are not relayed: the request is answered, then we close
            self._stopped = True
            last = self._queue[-1] if self._queue else self._current
            if last is not None:
                last.should_close = True
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            error = cause if isinstance(cause, GatewayError) else BadRequest(
                f"malformed HTTP request: {exc}"
            )  # fmt: skip
            self._parse_failed(error)

    # --- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = []
        self._url_size = 0
        self._fields = []

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._url_size += len(url)
        if self._url_size > self.server.max_line:
            raise UriTooLong(f"request line longer than {self.server.max_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        fields = self._fields
        if len(name) + len(value) + 2 > self.server.max_field:
            raise HeaderFieldsTooLarge(
                f"a header field is longer than {self.server.max_field} bytes"
            )
        if len(fields) >= self.server.max_headers:
            raise HeaderFieldsTooLarge("too many header fields")
        fields.append((name.decode(*_HEADER_CODEC), value.decode(*_HEADER_CODEC)))

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._in_head = False
        self._head_size = 0
        version = HttpVersion11 if parser.get_http_version() == "1.1" else HttpVersion10
        target = b"".join(self._url).decode(*_HEADER_CODEC)
        request = Request(
            self,
            parser.get_method().decode("ascii"),
            target,
            CIMultiDictProxy(CIMultiDict(self._fields)),
            version,
            not parser.should_keep_alive(),
        )
        self._parsing = request
        if self._current is None:
            self._cancel_timer()
            self._start(request)
        else:
            self._queue.append(request)
            self._pause_reading()  # one waiting request at a time is enough

    def on_body(self, body: bytes) -> None:
        if self._discarding:
            return
        request = self._parsing
        if request is not None:
            request.content.feed(body)

    def on_message_complete(self) -> None:
        request = self._parsing
        self._parsing = None
        if request is not None:
            request.content.feed_eof()
            if request.should_close:
                self._stopped = self._after_last = True  # nothing follows a "close" request
        if self._discarding:
            self._discarding = False
            self._close()

    # --- answering --------------------------------------------------------------------------

    def _start(self, request: Request) -> None:
        self._current = request
        self._task = self.loop.create_task(self._answer(request))

    async def _answer(self, request: Request) -> None:
        try:
            response = await self.server.handler(request)
            if not response.prepared:
                assert isinstance(response, Response)
                await self.respond(request, response)
        except asyncio.CancelledError:
            self._close()
            return
        except ConnectionError:
            self._close()
            return
        except Exception:
            log.exception("unhandled error answering %s %s", request.method, request.raw_path)
            self._close()
            return
        self._done(request)

    async def respond(self, request: Request, response: Response) -> None:
        """Write the whole ``response`` to ``request`` in one write.

        Raises:
            ConnectionResetError: the client has gone.
            ValueError: a field holds CR or LF.
        """
        response.prepared = True
        closing = self.closing_after(request)
        head, body = response.encode(request.method, request.version, closing)
        if len(body) <= _JOIN_LIMIT:
            await self.send(head + body if body else head)  # one write, one small copy
        else:
            await self.send(head, body)  # a large body is not copied

    def closing_after(self, request: Request) -> bool:
        """True when the connection ends after ``request``'s answer (which then says so)."""
        if (
            self.must_close
            or request.should_close
            or self.server.draining
            or self._pending_error is not None
            or not request.content.eof
        ):
            self.must_close = True
        return self.must_close

    def _done(self, request: Request) -> None:
        self._current = None
        self._task = None
        if self.transport is None:
            return
        if self._pending_error is not None:
            self._write_problem(self._pending_error)
            return
        if self.must_close:
            if not request.content.eof and request is self._parsing and not self._stopped:
                # drop the unread body so the client reads the answer, not a reset
                self._discarding = True
                self._resume_reading()
                self._arm_timer(LINGER)
                return
            self._close()
            return
        if self._queue:
            self._start(self._queue.popleft())
            self._resume_reading()
            return
        self._resume_reading()
        self._arm_timer(self.server.keepalive_timeout)

    def _parse_failed(self, error: GatewayError) -> None:
        if self._after_last:
            return  # llhttp refuses data after a Connection: close request; we ignore it
        self._stopped = True
        log.debug("malformed request from %s: %s", self.remote, error)
        parsing = self._parsing
        if parsing is not None:  # the body broke: its reader fails, the answer says close
            parsing.content.fail(error)
            self.must_close = True
            return
        if self._current is not None:
            self._pending_error = error  # answered when its turn comes: close after
            return
        self._write_problem(error)

    def _write_problem(self, error: GatewayError) -> None:
        """Answer a request that could not be parsed, then close."""
        self._cancel_timer()
        self.must_close = True
        if self.transport is not None:
            response = problem_response(error, new_request_id())
            head, body = response.encode("GET", HttpVersion11, True)
            self.transport.write(head + body)
        self._close()

    async def send(self, data: bytes, more: bytes = b"") -> None:
        """Write ``data`` (then ``more``); wait while the transport's buffer is above its
        high-water mark.

        Raises:
            ConnectionResetError: the client has gone.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if more:
            transport.writelines((data, more))  # one vectored write, no concatenation
        else:
            transport.write(data)
        if self._writing_paused:
            waiter = self._drain_waiter
            if waiter is None:
                waiter = self._drain_waiter = self.loop.create_future()
            await waiter

    # --- flow control and timers ------------------------------------------------------------

    def pause_body(self) -> None:
        if not self._body_paused:
            self._body_paused = True
            self._pause_reading()

    def resume_body(self) -> None:
        if self._body_paused:
            self._body_paused = False
            if not self._queue:
                self._resume_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()

    def _arm_timer(self, delay: float) -> None:
        # a deadline the server's tick checks: cheaper than a loop timer per answer
        self._close_at = time.monotonic() + delay

    def _cancel_timer(self) -> None:
        self._close_at = None

    def expire(self, now: float) -> None:
        """Close the connection if its keep-alive or linger deadline is before ``now``."""
        if self._close_at is not None and now >= self._close_at:
            self._close()

    def _close(self) -> None:
        self._cancel_timer()
        self._stopped = True
        if self.transport is not None:
            self.transport.close()

    @property
    def idle(self) -> bool:
        """No request is being answered or waits on this connection."""
        return self._current is None and not self._queue and not self._in_head

    def close_now(self) -> None:
        """Close the connection at once (the answer in progress, if any, is cut)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.transport is not None:
            self.transport.abort() if self._current is not None else self.transport.close()


class Http1Server:
    """The gateway listener's protocol factory, with its limits and its open connections.

    Args:
        handler: answers one request: returns a ``Response`` (written here) or a
            ``StreamResponse`` it has written itself.
        max_line: request line bytes before 414.
        max_field: bytes of one header field line before 431.
        max_headers: header fields before 431.
        keepalive_timeout: seconds an idle connection (or one sending its header section)
            stays open; aiohttp's default, 75 s.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        max_line: int = 8190,
        max_field: int = 8190,
        max_headers: int = 100,
        keepalive_timeout: float = 75.0,
    ) -> None:
        self.handler = handler
        self.max_line = max_line
        self.max_field = max_field
        self.max_headers = max_headers
        self.max_head = max_line + max_field * max_headers  # whole header section, bytes
        self.keepalive_timeout = keepalive_timeout
        self.loop = asyncio.get_running_loop()
        self.connections: set[Http1Protocol] = set()
        self.draining = False
        self._ticker = self.loop.call_later(TICK, self._tick)

    def _tick(self) -> None:
        """Once a second: refresh the Date value, close connections past their deadline."""
        _DATE.refresh()
        now = time.monotonic()
        for conn in list(self.connections):
            conn.expire(now)
        self._ticker = self.loop.call_later(TICK, self._tick)

    def __call__(self) -> Http1Protocol:
        return Http1Protocol(self)

    def close_idle(self) -> int:
        """Close the connections with no request in progress; returns how many."""
        idle = [conn for conn in self.connections if conn.idle]
        for conn in idle:
            conn.close_now()
        return len(idle)

    async def shutdown(self, within: float) -> None:
        """Wait up to ``within`` seconds for answers in progress, then cut what is left."""
        self._ticker.cancel()
        busy: list[asyncio.Task[Any]] = [
            conn._task for conn in self.connections if conn._task is not None
        ]
        if busy:
            await asyncio.wait(busy, timeout=within)
        for conn in list(self.connections):
            conn.close_now()
        await asyncio.sleep(0)
