"""A lean HTTP/1.1 client for the forwarder: pooled keep-alive connections, llhttp parsing.

aiohttp's ClientSession does much per request that a reverse proxy does not need (cookie
jar, redirects, payload registry, auto headers, a task per body write, a timeout context per
await); in a profile it was over a third of the gateway's CPU. This client does only what
forwarding needs:

* One ``_Connection`` (an ``asyncio.Protocol``) per TCP connection, feeding
  ``httptools.HttpResponseParser`` (llhttp, the parser Node.js uses). The request goes out in
  one ``transport.write`` (request line, fields and a ``bytes`` body); a streamed body is sent
  by a task, chunk by chunk, honouring ``pause_writing``/``resume_writing``.
* Per-origin keep-alive pools with the limits of aiohttp's ``TCPConnector``: ``limit``
  connections in use in all, ``limit_per_endpoint`` per origin (0: none), idle ones closed
  after ``keepalive_timeout`` seconds. Names go through the gateway's ``TTLResolver``; IP
  literals skip it. ``https`` origins use TLS (``ssl.create_default_context()`` unless given).
* Timeouts are ``loop.call_at`` handles on the one future a wait uses, not a timeout context
  per await. Errors are the gateway's own: ``UpstreamConnectError`` (no connection),
  ``UpstreamProtocolError`` (reset, early close, broken HTTP), ``UpstreamTimeout`` (``phase``).

Message framing follows RFC 9112 §6: a request body of known length goes with Content-Length,
a streamed one without it with ``Transfer-Encoding: chunked`` (§7.1); the response body length
is llhttp's (§6.3: HEAD, 1xx, 204 and 304 have none; chunked; Content-Length; else until
close). A connection goes back to the pool only when its response ended cleanly, its request
body was sent whole and keep-alive applies (§9.3: HTTP/1.1 default, no ``Connection: close``);
it is never reused mid-response. A request that fails on a reused connection before any byte
of the answer arrived is sent again once on a new connection when the caller says it is safe
(RFC 9112 §9.3.1; the stale keep-alive race, which aiohttp and browsers retry the same way).

Rule: only ``gateway.proxy`` sends requests through it (the server makes and closes the one
client, a reload closes idle connections to removed endpoints); it never logs per request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping
from itertools import chain
from typing import TYPE_CHECKING, Any, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.errors import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout
from gateway.headers import encode_head, without_field

if TYPE_CHECKING:
    from gateway.dns import TTLResolver

__all__ = ["READ_HIGH_WATER", "UpstreamClient", "UpstreamResponse"]

READ_HIGH_WATER = 128 * 1024  # bytes buffered from a streamed response before reading pauses
_NO_BODY_STATUSES = frozenset({204, 304})
_EMPTY_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
# Methods whose requests carry a meaning for content: an empty one is sent as Content-Length: 0
# (RFC 9110 §8.6: a user agent SHOULD send it when there is no Transfer-Encoding).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class _StaleConnection(UpstreamProtocolError):
    """A reused connection closed or reset before any byte of the answer arrived."""


def _expire(fut: asyncio.Future[Any], phase: str) -> None:
    if not fut.done():
        fut.set_exception(UpstreamTimeout(f"upstream {phase} timeout", phase=phase))


class _Origin:
    """One ``scheme://host:port`` origin: its pool of idle connections and its counts."""

    __slots__ = (
        "host",
        "host_header",
        "idle",
        "in_use",
        "is_ip",
        "key",
        "port",
        "tls",
    )

    def __init__(self, key: str) -> None:
        url = URL(key)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"not an http(s) origin: {key!r}")
        self.key = key
        self.host = url.host
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.tls = url.scheme == "https"
        self.host_header = url.host_port_subcomponent or url.host  # RFC 9110 §7.2
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            self.is_ip = False
        else:
            self.is_ip = True
        self.idle: collections.deque[_Connection] = collections.deque()
        self.in_use = 0


class UpstreamResponse:
    """An upstream's answer: status and fields at once, the body read on demand.

    Attributes:
        status: the status code (final: 1xx interim answers are skipped).
        reason: the reason phrase, possibly empty.
        version: the HTTP version as ``(major, minor)``.
        headers: the fields as received (CIMultiDictProxy, case-insensitive, repeats kept).
        content_length: the Content-Length in bytes, or None when absent.

    Call ``release()`` (connection back to the pool if the answer ended cleanly) or
    ``close()`` (connection closed) when done; both are idempotent.
    """

    __slots__ = ("_conn", "content_length", "headers", "reason", "status", "version")

    def __init__(
        self,
        conn: _Connection,
        status: int,
        reason: str,
        version: tuple[int, int],
        headers: CIMultiDictProxy[str],
        content_length: int | None,
    ) -> None:
        self._conn: _Connection | None = conn
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.content_length = content_length

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} {self.reason}>"

    @property
    def content_type(self) -> str:
        """The media type of Content-Type, lower case, without parameters (``""`` if none)."""
        value = self.headers.get("Content-Type")
        if not value:
            return ""
        return value.partition(";")[0].strip().lower()

    async def read(self, deadline: float | None = None, phase: str = "idle") -> bytes:
        """The whole body (``b""`` for none), then the connection goes back to its pool.

        Args:
            deadline: loop time (seconds) by which the body must have ended; None: no limit.
            phase: the ``UpstreamTimeout.phase`` reported when ``deadline`` passes.

        Raises:
            UpstreamProtocolError: the upstream closed or broke the body before its end.
            UpstreamTimeout: ``deadline`` passed (the connection is closed).
            RuntimeError: the response was already released or closed.
        """
        conn = self._conn
        if conn is None:
            raise RuntimeError("the response was released")
        conn.unbounded = True
        if conn.reading_paused:
            conn.resume_reading()
        try:
            while not conn.complete:
                await conn.wait_data(deadline, phase)
        except BaseException:
            self.close()
            raise
        buffer = conn.buffer
        body = b"".join(buffer) if len(buffer) != 1 else buffer[0]
        buffer.clear()
        conn.buffered = 0
        self.release()
        return body

    async def readany(self) -> bytes:
        """The body bytes received since the last call, waiting for some; ``b""`` at its end.

        The connection reads ahead at most ``READ_HIGH_WATER`` bytes: past that it pauses
        reading the socket (TCP backpressure) until this is called again. No timer of its own:
        the caller bounds the wait (``asyncio.timeout``).

        Raises:
            UpstreamProtocolError: the upstream closed or broke the body before its end.
            RuntimeError: the response was already released or closed.
        """
        conn = self._conn
        if conn is None:
            raise RuntimeError("the response was released")
        buffer = conn.buffer
        while not buffer:
            if conn.complete:
                return b""
            await conn.wait_data(None, "idle")
        chunk = b"".join(buffer) if len(buffer) != 1 else buffer[0]
        buffer.clear()
        conn.buffered = 0
        if conn.reading_paused:
            conn.resume_reading()
        return chunk

    def release(self) -> None:
        """Done with this answer: its connection goes back to the pool when the answer ended
        cleanly and keep-alive applies, and is closed otherwise."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.finish(reuse=True)

    def close(self) -> None:
        """Done with this answer: close its connection, whatever state it is in."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.finish(reuse=False)


class _Connection(asyncio.Protocol):
    """One upstream TCP (or TLS) connection and the exchange in flight on it."""

    __slots__ = (
        "buffer",
        "buffered",
        "client",
        "closed",
        "complete",
        "drain_waiter",
        "exc",
        "got_bytes",
        "head",
        "headers_waiter",
        "idle_since",
        "in_use",
        "informational",
        "keep_alive",
        "loop",
        "origin",
        "parser",
        "raw_headers",
        "reading_paused",
        "reason",
        "response",
        "reused",
        "transport",
        "unbounded",
        "waiter",
        "writer",
        "writing_paused",
    )

    def __init__(self, client: UpstreamClient, origin: _Origin) -> None:
        self.client = client
        self.origin = origin
        self.loop = client.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.in_use = True  # counted in the limits (made for a request)
        self.reused = False
        self.idle_since = 0.0
        self.writing_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.reading_paused = False
        self.writer: asyncio.Task[None] | None = None
        self._reset(head=False)

    def _reset(self, *, head: bool) -> None:
        self.head = head
        self.response: UpstreamResponse | None = None
        self.headers_waiter: asyncio.Future[UpstreamResponse] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.raw_headers: list[tuple[str, str]] = []
        self.reason = b""
        self.informational = False
        self.got_bytes = False
        self.complete = False
        self.keep_alive = True
        self.exc: BaseException | None = None
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.unbounded = False

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client._forget(self)
        if self.response is not None and not self.complete and exc is None and self.body_to_eof():
            self.complete = True  # RFC 9112 §6.3 rule 8: the body ends where the connection does
            self.keep_alive = False
            self._wake()
        elif not self.complete and (self.headers_waiter is not None or self.response is not None):
            if not self.got_bytes and self.reused:
                err: UpstreamProtocolError = _StaleConnection(
                    "the upstream closed a kept-alive connection before answering"
                )
            elif exc is None:
                err = UpstreamProtocolError("the upstream closed the connection mid-answer")
            else:
                err = UpstreamProtocolError(f"the upstream connection failed: {exc}")
            err.__cause__ = exc
            self.fail(err)
        drain = self.drain_waiter
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("the upstream connection closed"))
        self.drain_waiter = None

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        drain = self.drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        if (self.headers_waiter is None and self.response is None) or self.complete:
            # bytes nobody asked for (idle, or past the end of an answer): never reuse
            self.keep_alive = False
            self.close()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(UpstreamProtocolError("the upstream switched protocols unasked"))
        except httptools.HttpParserError as exc:
            if self.head and self.response is not None:
                return  # _HeadDone: the parser waits for a body a HEAD answer does not have
            self.fail(UpstreamProtocolError(f"the upstream sent invalid HTTP: {exc}"))

    # --- httptools callbacks ----------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                raise UpstreamProtocolError("the upstream switched protocols unasked")
            self.informational = True  # 1xx: skipped; the final answer follows (RFC 9110 §15.2)
            return
        headers = CIMultiDictProxy(CIMultiDict(self.raw_headers))
        length_field = headers.get("Content-Length")
        length = None
        if length_field is not None:
            with contextlib.suppress(ValueError):
                length = int(length_field)  # llhttp already rejected a bad or repeated one
        version = (1, 1) if parser.get_http_version() == "1.1" else (1, 0)
        self.keep_alive = parser.should_keep_alive()
        response = UpstreamResponse(
            self, status, self.reason.decode("latin-1"), version, headers, length
        )
        self.response = response
        if self.head:
            # httptools cannot tell llhttp to skip the body of a HEAD answer; the parser
            # would wait for Content-Length bytes that never come, so the answer ends here
            # and the connection is not reused.
            self.complete = True
            self.keep_alive = False
        waiter = self.headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        if self.head:
            raise _HeadDone

    def on_body(self, body: bytes) -> None:
        self.buffer.append(body)
        self.buffered += len(body)
        self._wake()
        if self.buffered > READ_HIGH_WATER and not self.unbounded and not self.reading_paused:
            self.reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            self.raw_headers = []
            self.reason = b""
            return
        self.complete = True
        self._wake()

    # --- the exchange -----------------------------------------------------------------------

    def body_to_eof(self) -> bool:
        """The answer's body is delimited by the connection closing (RFC 9112 §6.3 rule 8)."""
        response = self.response
        if response is None or self.head or response.status in _NO_BODY_STATUSES:
            return False
        if response.content_length is not None:
            return False
        te = response.headers.get("Transfer-Encoding", "")
        return not te.lower().rstrip().endswith("chunked")

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, exc: BaseException) -> None:
        """The exchange broke: wake whoever waits with ``exc`` and close the connection."""
        if self.exc is None:
            self.exc = exc
        self.keep_alive = False
        waiter = self.headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        waiter2 = self.waiter
        if waiter2 is not None and not waiter2.done():
            waiter2.set_exception(exc)
        self.close()

    def close(self) -> None:
        """Close the transport (``connection_lost`` follows) and stop a body being sent."""
        writer = self.writer
        if writer is not None and not writer.done() and writer is not asyncio.current_task():
            writer.cancel()
        transport = self.transport
        if transport is not None and not self.closed:
            transport.close()

    def resume_reading(self) -> None:
        """Undo ``pause_reading`` once the reader took the buffered bytes."""
        self.reading_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    async def wait_data(self, deadline: float | None, phase: str) -> None:
        """Wait for more of the body, its end, or its failure (raised)."""
        if self.exc is not None:
            raise self.exc
        fut: asyncio.Future[None] = self.loop.create_future()
        self.waiter = fut
        timer = None if deadline is None else self.loop.call_at(deadline, _expire, fut, phase)
        try:
            await fut
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    async def exchange(
        self,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        chunked: bool,
        deadline: float,
        phase: str,
    ) -> UpstreamResponse:
        """Send one request and wait for its answer's header section.

        Raises:
            _StaleConnection: the reused connection closed before any answer byte.
            UpstreamProtocolError, UpstreamTimeout: see ``UpstreamClient.request``.
        """
        transport = self.transport
        assert transport is not None
        loop = self.loop
        waiter: asyncio.Future[UpstreamResponse] = loop.create_future()
        self.headers_waiter = waiter
        if self.closed:
            if self.reused:
                raise _StaleConnection("the kept-alive connection closed before use")
            raise UpstreamProtocolError("the upstream connection closed before use")
        if body is None:
            transport.write(head)
        elif isinstance(body, bytes):
            transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                transport.write(body)
        else:
            transport.write(head)
            self.writer = loop.create_task(self._send_body(body, chunked))
        timer = loop.call_at(deadline, _expire, waiter, phase)
        try:
            return await waiter
        except BaseException:
            self.keep_alive = False
            self.close()
            raise
        finally:
            timer.cancel()
            self.headers_waiter = None

    async def _send_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        """Relay a streamed request body (chunked when ``chunked``, RFC 9112 §7.1)."""
        transport = self.transport
        assert transport is not None
        try:
            async for chunk in body:
                if self.closed:
                    return
                if not chunk:
                    continue
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                if self.writing_paused:
                    drain: asyncio.Future[None] = self.loop.create_future()
                    self.drain_waiter = drain
                    await drain
            if chunked and not self.closed:
                transport.write(b"0\r\n\r\n")
        except (asyncio.CancelledError, ConnectionResetError):
            self.keep_alive = False
            self.close()
        except Exception as exc:  # the client's body broke (or passed its limit)
            err = UpstreamProtocolError(f"the request body could not be sent: {exc}")
            err.__cause__ = exc
            self.fail(err)
        finally:
            self.drain_waiter = None

    def finish(self, *, reuse: bool) -> None:
        """The caller is done with the answer: pool the connection or close it."""
        writer = self.writer
        if writer is not None:
            self.writer = None
            if not writer.done():
                writer.cancel()
                reuse = False  # the request body was not sent whole
        if not (reuse and self.complete and self.keep_alive and not self.closed):
            self.keep_alive = False
            self.close()
            self.client._release(self, pool=False)
            return
        if self.reading_paused:
            self.resume_reading()
        self._reset(head=False)
        self.client._release(self, pool=True)


class _HeadDone(Exception):  # a signal, not an error
    """Raised from on_headers_complete to stop llhttp after a HEAD answer's header section."""


class UpstreamClient:
    """Pooled HTTP/1.1 client for the forwarder (one per process, shared by generations).

    Usage::

        client = UpstreamClient(resolver=resolver, limit=1000, keepalive_timeout=30.0)
        resp = await client.request("http://10.0.0.7:9201", "POST", "/v1/chat", headers,
                                    body, connect_timeout=2.0, deadline=loop.time() + 30)
        body = await resp.read(deadline=loop.time() + 60)  # or readany() + release()
        await client.close()

    Args:
        resolver: resolves host names (IP literals skip it); None: the loop's getaddrinfo.
        limit: connections in use (or being made) at most, all origins; 0: no limit.
        limit_per_endpoint: the same per origin; 0: no limit.
        keepalive_timeout: seconds an idle pooled connection is kept.
        ssl_context: for ``https`` origins; None: ``ssl.create_default_context()``.

    Raises:
        RuntimeError: no event loop is running.
    """

    def __init__(
        self,
        *,
        resolver: TTLResolver | None = None,
        limit: int = 1000,
        limit_per_endpoint: int = 0,
        keepalive_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._resolver = resolver
        self._limit = limit
        self._limit_per_endpoint = limit_per_endpoint
        self._keepalive = keepalive_timeout
        self._ssl = ssl_context
        self._origins: dict[str, _Origin] = {}
        self._in_use = 0
        self._waiters: collections.deque[tuple[_Origin, asyncio.Future[None]]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._connections: set[_Connection] = set()
        self.closed = False

    def __repr__(self) -> str:
        idle = sum(len(o.idle) for o in self._origins.values())
        return f"<UpstreamClient origins={len(self._origins)} in_use={self._in_use} idle={idle}>"

    @property
    def in_use(self) -> int:
        """Connections in use or being made, all origins."""
        return self._in_use

    def idle_count(self, origin: str) -> int:
        """Idle pooled connections to ``origin`` (``scheme://host:port``)."""
        pool = self._origins.get(origin)
        return len(pool.idle) if pool is not None else 0

    async def request(
        self,
        origin: str,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes | AsyncIterator[bytes] | None = None,
        *,
        connect_timeout: float,
        deadline: float,
        phase: str = "first_byte",
        retry_stale: bool = False,
    ) -> UpstreamResponse:
        """Send a request and return its answer once the header section arrived.

        Args:
            origin: ``scheme://host[:port]`` of the endpoint, e.g. ``"http://10.0.0.7:9201"``.
            method: the request method, e.g. ``"POST"``.
            target: origin-form request target (path and query, RFC 9112 §3.2.1).
            headers: fields to send; Host, Content-Length (for ``bytes``) and
                Transfer-Encoding are the client's, hop-by-hop fields must already be gone.
            body: ``bytes`` (sent with Content-Length), an async iterator of chunks (sent as
                they come: with the caller's Content-Length when it gives one, else chunked),
                or None.
            connect_timeout: seconds for making a connection (``UpstreamTimeout`` phase
                ``connect``), within ``deadline``.
            deadline: loop time (seconds) by which the header section must have arrived.
            phase: the ``UpstreamTimeout.phase`` reported when ``deadline`` passes.
            retry_stale: send again once, on a new connection, when a reused one closes
                before any answer byte (only for a request that is safe to repeat: idempotent,
                and with a body that can be sent again, RFC 9112 §9.3.1).

        Raises:
            UpstreamConnectError: no connection could be made, DNS and TLS included (502).
            UpstreamTimeout: ``connect`` or ``phase`` ran out (504).
            UpstreamProtocolError: the upstream reset, closed or spoke broken HTTP (502).
            ValueError: a field holds CR or LF, or ``origin`` is not an http(s) origin.
        """
        pool = self._origins.get(origin)
        if pool is None:
            pool = self._origins[origin] = _Origin(origin)
        head, chunked = _serialize(method, target, pool.host_header, headers, body)
        head_only = method == "HEAD"
        conn = self._take_idle(pool)
        if conn is None:
            conn = await self._connect(pool, connect_timeout, deadline, phase)
        conn.head = head_only
        try:
            return await conn.exchange(head, body, chunked, deadline, phase)
        except _StaleConnection as exc:
            self._release(conn, pool=False)
            if not retry_stale:
                raise UpstreamProtocolError(str(exc)) from exc
        except BaseException:
            self._release(conn, pool=False)
            raise
        conn = await self._connect(pool, connect_timeout, deadline, phase)
        conn.head = head_only
        try:
            return await conn.exchange(head, body, chunked, deadline, phase)
        except BaseException:
            self._release(conn, pool=False)
            raise

    # --- the pool ---------------------------------------------------------------------------

    def _take_idle(self, pool: _Origin) -> _Connection | None:
        idle = pool.idle
        if not idle or (self._limit and self._in_use >= self._limit):
            return None
        limit_here = self._limit_per_endpoint
        if limit_here and pool.in_use >= limit_here:
            return None
        oldest_ok = self.loop.time() - self._keepalive
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be stale
            transport = conn.transport
            if (
                conn.closed
                or transport is None
                or transport.is_closing()
                or conn.idle_since < oldest_ok
            ):
                conn.close()
                continue
            conn.in_use = True
            conn.reused = True
            pool.in_use += 1
            self._in_use += 1
            return conn
        return None

    async def _connect(
        self, pool: _Origin, connect_timeout: float, deadline: float, phase: str
    ) -> _Connection:
        """A slot within the limits (waiting for one), then a new connection in it."""
        if self.closed:
            raise UpstreamConnectError("the upstream client is closed")
        loop = self.loop
        connect_deadline = min(loop.time() + connect_timeout, deadline)
        try:
            async with asyncio.timeout_at(connect_deadline):
                while not self._has_slot(pool):
                    fut: asyncio.Future[None] = loop.create_future()
                    entry = (pool, fut)
                    self._waiters.append(entry)
                    try:
                        await fut
                    finally:
                        with contextlib.suppress(ValueError):
                            self._waiters.remove(entry)
                    if self.closed:
                        raise UpstreamConnectError("the upstream client is closed")
                    if (conn := self._take_idle(pool)) is not None:
                        return conn
                pool.in_use += 1
                self._in_use += 1
                conn = _Connection(self, pool)
                try:
                    await self._open(pool, conn)
                except BaseException:
                    conn.in_use = False
                    pool.in_use -= 1
                    self._in_use -= 1
                    self._wake_waiter()
                    raise
        except TimeoutError as exc:
            late = "connect" if connect_deadline < deadline else phase
            raise UpstreamTimeout(f"upstream {late} timeout", phase=late) from exc
        self._connections.add(conn)
        return conn

    def _has_slot(self, pool: _Origin) -> bool:
        if self._limit and self._in_use >= self._limit:
            return False
        return not (self._limit_per_endpoint and pool.in_use >= self._limit_per_endpoint)

    async def _open(self, pool: _Origin, conn: _Connection) -> None:
        loop = self.loop
        tls: ssl.SSLContext | None = None
        if pool.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        if pool.is_ip or self._resolver is None:
            targets: list[tuple[str, int, int]] = [(pool.host, socket.AF_UNSPEC, 0)]
        else:
            try:
                found = await self._resolver.resolve(pool.host, pool.port, socket.AF_UNSPEC)
            except OSError as exc:
                raise UpstreamConnectError(
                    f"cannot resolve the upstream {pool.host}: {exc.strerror or exc}"
                ) from exc
            targets = [(r["host"], r["family"], socket.AI_NUMERICHOST) for r in found]
        last: OSError | None = None
        for host, family, flags in targets:
            try:
                await loop.create_connection(
                    lambda: conn,
                    host,
                    pool.port,
                    family=family,
                    flags=flags,
                    ssl=tls,
                    server_hostname=pool.host if tls is not None else None,
                )
            except OSError as exc:  # refused, unreachable, TLS failures (ssl.SSLError)
                last = exc
                continue
            return
        raise UpstreamConnectError(f"cannot connect to the upstream {pool.key}: {last}") from last

    def _release(self, conn: _Connection, *, pool: bool) -> None:
        """``conn`` is no longer in use: back to the idle list when ``pool``, else closed."""
        origin = conn.origin
        if conn.in_use:
            conn.in_use = False
            origin.in_use -= 1
            self._in_use -= 1
        if pool and not conn.closed and not self.closed:
            conn.idle_since = self.loop.time()
            origin.idle.append(conn)
            if self._sweeper is None:
                self._sweeper = self.loop.call_later(self._keepalive, self._sweep)
        else:
            conn.close()
        if self._waiters:
            self._wake_waiter()

    def _forget(self, conn: _Connection) -> None:
        """``conn`` closed (connection_lost): out of the idle list and the counts."""
        self._connections.discard(conn)
        idle = conn.origin.idle
        if not conn.in_use and idle:
            with contextlib.suppress(ValueError):
                idle.remove(conn)

    def _wake_waiter(self) -> None:
        for pool, fut in self._waiters:
            if not fut.done() and (pool.idle or self._has_slot(pool)):
                fut.set_result(None)
                return

    def _sweep(self) -> None:
        """Close connections idle for ``keepalive_timeout``; run again while any is idle."""
        self._sweeper = None
        oldest_ok = self.loop.time() - self._keepalive
        first = None
        for pool in self._origins.values():
            for conn in [c for c in pool.idle if c.idle_since <= oldest_ok]:
                pool.idle.remove(conn)
                conn.close()
            for conn in pool.idle:
                first = conn.idle_since if first is None else min(first, conn.idle_since)
        if first is not None and not self.closed:
            self._sweeper = self.loop.call_at(first + self._keepalive, self._sweep)

    def close_idle(self, origins: Iterable[str]) -> int:
        """Close the idle pooled connections to ``origins`` (endpoints a reload removed).

        Connections in use are untouched; they return to the pool when their answer ends, so
        call again once the requests that use them are done.

        Args:
            origins: ``scheme://host:port`` origins, as configured.

        Returns:
            The number of connections closed.
        """
        closed = 0
        for origin in origins:
            pool = self._origins.get(origin)
            if pool is None:
                continue
            while pool.idle:
                pool.idle.pop().close()
                closed += 1
        return closed

    async def close(self) -> None:
        """Close every connection, idle or in use, and refuse new requests. Idempotent."""
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._connections):
            conn.close()
        for pool in self._origins.values():
            pool.idle.clear()
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        await asyncio.sleep(0)  # let connection_lost run


def _serialize(
    method: str,
    target: str,
    host: str,
    headers: Mapping[str, str],
    body: bytes | AsyncIterator[bytes] | None,
) -> tuple[bytes, bool]:
    """The request line and header section; True when the body is to be sent chunked.

    Raises:
        ValueError: a field name or value, the method or the target holds CR or LF (a header
            injection; RFC 9110 §5.5 forbids them).
    """
    # Host first (RFC 9112 §3.2: it SHOULD be the first field line)
    fields: Iterable[tuple[str, str]] = chain((("Host", host),), headers.items())
    count = len(headers) + 1
    extra: list[str] = []
    chunked = False
    if isinstance(body, bytes):
        declared = headers.get("Content-Length")
        if declared != str(len(body)):
            if declared is not None:
                fields = without_field(fields, "content-length")
                count = len(fields)
            extra.append(f"Content-Length: {len(body)}\r\n")
    elif body is not None:
        if "Content-Length" not in headers:
            extra.append("Transfer-Encoding: chunked\r\n")
            chunked = True
    elif method in _BODY_METHODS and "Content-Length" not in headers:
        extra.append("Content-Length: 0\r\n")
    return encode_head(f"{method} {target} HTTP/1.1", fields, count, extra), chunked
