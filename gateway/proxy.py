"""The forwarder: stream a request to an upstream endpoint and its answer back.

Rule: this is the only module that talks HTTP to upstreams. aiohttp client errors are
translated here, at the adapter edge, into GatewayErrors (``map_upstream_errors``).

Backpressure: aiohttp pauses the upstream socket once its reader holds twice ``read_bufsize``
and ``resp.write()`` waits while the client socket is full, so a streamed body holds only a few
chunks in memory, whatever its length. Small bodies with a known Content-Length (at most
``BUFFER_LIMIT`` bytes) are read whole, which costs fewer system calls and loop iterations
than chunked relaying; everything else (chunked, SSE, large) is relayed chunk by chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import (
    PayloadTooLarge,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from gateway.headers import (
    GATEWAY_SET_FIELDS,
    forwarded_element,
    strip_hop_by_hop,
    via_value,
)

if TYPE_CHECKING:
    from gateway.exchange import Exchange
    from gateway.routing import Route, RouteTable
    from gateway.upstreams import Upstreams

__all__ = ["BUFFER_LIMIT", "HttpForwarder", "map_upstream_errors"]

log = logging.getLogger("geogate.proxy")

BUFFER_LIMIT = 64 * 1024  # bytes: bodies up to this size with a Content-Length are read whole
_NO_BODY_STATUSES = frozenset({204, 304})
_FORWARDING_FIELDS = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Forwarded")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _BodyState:
    __slots__ = ("too_large",)

    def __init__(self) -> None:
        self.too_large = False


async def _limited_body(
    content: aiohttp.StreamReader, limit: int, state: _BodyState
) -> AsyncIterator[bytes]:
    """Relay a request body chunk by chunk, stopping once it passes ``limit`` bytes."""
    seen = 0
    async for chunk in content.iter_any():
        seen += len(chunk)
        if seen > limit:
            state.too_large = True
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        yield chunk


class _Attempt:
    """What one forwarding attempt has reached: its phase, and the response once prepared."""

    __slots__ = ("phase", "prepared")

    def __init__(self) -> None:
        self.phase = "first_byte"
        self.prepared: web.StreamResponse | None = None


@contextlib.contextmanager
def map_upstream_errors(attempt: _Attempt) -> Iterator[None]:
    """Translate aiohttp client errors into GatewayErrors, raised ``from`` the original.

    Our own timeout scopes surface as TimeoutError outside this block (``asyncio.timeout``
    converts the cancellation at its own exit); ``forward`` maps those.

    Args:
        attempt: the attempt, whose ``phase`` names a timeout raised inside the client.

    Raises:
        UpstreamTimeout: connect (aiohttp's sock_connect) ran out, or the client raised a
            timeout of its own (504).
        UpstreamConnectError: no connection could be made, DNS included (502).
        UpstreamProtocolError: the upstream reset, closed or spoke broken HTTP (502).
    """
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise UpstreamTimeout("connecting to the upstream timed out", phase="connect") from exc
    except aiohttp.ServerTimeoutError as exc:
        raise UpstreamTimeout("upstream read timed out", phase=attempt.phase) from exc
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamConnectError(f"cannot connect to the upstream: {exc.os_error}") from exc
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
        raise UpstreamProtocolError(f"the upstream broke the response: {exc}") from exc
    except aiohttp.ClientResponseError as exc:
        raise UpstreamProtocolError(f"the upstream sent invalid HTTP: {exc.message}") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamProtocolError(f"upstream connection failed: {exc}") from exc


class HttpForwarder:
    """The terminal stage: forward to the chosen endpoint over a pooled ClientSession.

    Args:
        session: the process's one ClientSession (``auto_decompress=False``).
        upstreams: the endpoints by region.
        routes: the compiled routes (per-route socket timeouts are prepared from them).
        via: the Via pseudonym (RFC 9110 §7.6.3).
    """

    def __init__(
        self, session: aiohttp.ClientSession, upstreams: Upstreams, routes: RouteTable, via: str
    ) -> None:
        self._session = session
        self._upstreams = upstreams
        self._via = via
        self._socket_timeouts = {
            r.index: aiohttp.ClientTimeout(total=None, sock_connect=r.connect_timeout)
            for r in routes.routes
        }

    def _upstream_headers(self, ex: Exchange) -> CIMultiDict[str]:
        request = ex.request
        headers = strip_hop_by_hop(request.headers, GATEWAY_SET_FIELDS)
        peer = request.remote
        proto = request.scheme
        host = request.host
        if ex.peer_trusted:
            # keep the trusted chain, extend it with our own hop
            prior_xff = ",".join(request.headers.getall("X-Forwarded-For", ()))
            xff = f"{prior_xff}, {peer}" if prior_xff else (peer or "")
            proto = request.headers.get("X-Forwarded-Proto", proto)
            host = request.headers.get("X-Forwarded-Host", host)
            prior_fwd = ", ".join(request.headers.getall("Forwarded", ()))
        else:
            # an untrusted peer's forwarding headers are its own claims: drop them
            for name in _FORWARDING_FIELDS:
                headers.popall(name, None)
            xff, prior_fwd = peer or "", ""
        element = forwarded_element(peer, proto=request.scheme, host=request.host)
        headers["X-Forwarded-For"] = xff
        headers["X-Forwarded-Proto"] = proto
        headers["X-Forwarded-Host"] = host
        headers["Forwarded"] = f"{prior_fwd}, {element}" if prior_fwd else element
        via = via_value(request.version, self._via)
        prior_via = ", ".join(headers.popall("Via", ()))
        headers["Via"] = f"{prior_via}, {via}" if prior_via else via
        headers["X-Request-Id"] = ex.request_id
        if ex.zone is not None:
            headers["X-Residency-Zone"] = ex.zone
        return headers

    def _response_headers(self, ex: Exchange, upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
        headers = strip_hop_by_hop(upstream.headers)
        via = via_value(upstream.version or (1, 1), self._via)
        prior_via = ", ".join(headers.popall("Via", ()))
        headers["Via"] = f"{prior_via}, {via}" if prior_via else via
        headers["X-Request-Id"] = ex.request_id
        if ex.zone is not None:
            headers["X-Residency-Zone"] = ex.zone  # tells the client which zone served it
        return headers

    async def _request_body(
        self, ex: Exchange, route: Route, state: _BodyState
    ) -> bytes | AsyncIterator[bytes] | None:
        request = ex.request
        length = request.content_length
        if length is not None and length > route.max_body_bytes:
            raise PayloadTooLarge(
                f"request body of {length} bytes exceeds the limit of {route.max_body_bytes}"
            )
        if not request.body_exists:
            return None
        expects = request.headers.get("Expect", "").lower() == "100-continue"
        if expects and request.transport is not None:
            # RFC 9110 §10.1.1: we decided to read the body, so invite the client to send it
            request.transport.write(_CONTINUE)
        if length is not None and length <= BUFFER_LIMIT:
            return await request.read()
        return _limited_body(request.content, route.max_body_bytes, state)

    async def forward(self, ex: Exchange) -> web.StreamResponse:
        """Stream ``ex.request`` to an endpoint of ``ex.regions`` and its answer back.

        ``route.first_byte_timeout`` bounds the wait for response headers, ``idle_timeout`` the
        gap between body chunks, ``total_timeout`` the whole exchange (seconds; loop clock).

        Raises:
            PayloadTooLarge: the body passes ``route.max_body_bytes`` (413).
            UpstreamConnectError, UpstreamProtocolError: see ``map_upstream_errors`` (502).
            UpstreamTimeout: a phase ran out of time (504).
            asyncio.CancelledError: the client left; the upstream connection is closed.
        """
        route = ex.route
        assert route is not None
        request = ex.request
        endpoint = self._upstreams.choose(ex.regions, zone=ex.zone or "")
        ex.endpoint = endpoint
        ex.attempts += 1
        state = _BodyState()
        body = await self._request_body(ex, route, state)
        target = request.raw_path
        if not target.startswith("/"):  # absolute-form (RFC 9112 §3.2.2): keep path + query
            target = request.rel_url.raw_path_qs
        url = URL(endpoint.origin + target, encoded=True)
        loop = asyncio.get_running_loop()
        deadline = ex.start + route.total_timeout
        attempt = _Attempt()
        endpoint.in_flight += 1
        try:
            try:
                async with asyncio.timeout_at(
                    min(loop.time() + route.first_byte_timeout, deadline)
                ) as timer:
                    return await self._relay(ex, route, url, body, state, timer, attempt, deadline)
            except TimeoutError as exc:
                phase = "total" if loop.time() >= deadline else attempt.phase
                err: UpstreamTimeout | UpstreamProtocolError = UpstreamTimeout(
                    f"upstream {phase} timeout", phase=phase
                )
                err.__cause__ = exc
            except (UpstreamTimeout, UpstreamProtocolError) as exc:
                err = exc
            if attempt.prepared is None:
                raise err
            # Headers already went out: a status can no longer say it. Cut the connection so
            # the client sees an incomplete body instead of a clean end that looks like success.
            log.warning("upstream failed mid-body: %s (request %s)", err, ex.request_id)
            if request.transport is not None:
                request.transport.close()
            return attempt.prepared
        finally:
            endpoint.in_flight -= 1

    async def _relay(
        self,
        ex: Exchange,
        route: Route,
        url: URL,
        body: bytes | AsyncIterator[bytes] | None,
        state: _BodyState,
        timer: asyncio.Timeout,
        attempt: _Attempt,
        deadline: float,
    ) -> web.StreamResponse:
        request = ex.request
        loop_time = asyncio.get_running_loop().time
        with map_upstream_errors(attempt):
            try:
                upstream = await self._session.request(
                    request.method,
                    url,
                    headers=self._upstream_headers(ex),
                    data=body,
                    allow_redirects=False,
                    timeout=self._socket_timeouts[route.index],
                )
            except Exception:
                if state.too_large:
                    raise PayloadTooLarge(
                        f"request body exceeds {route.max_body_bytes} bytes"
                    ) from None
                raise
        try:
            ex.upstream_status = upstream.status
            attempt.phase = "idle"
            idle = route.idle_timeout
            timer.reschedule(min(loop_time() + idle, deadline))
            headers = self._response_headers(ex, upstream)
            length = upstream.content_length
            if (
                length is not None
                and length <= BUFFER_LIMIT
                and request.method != "HEAD"
                and upstream.status not in _NO_BODY_STATUSES
            ):
                with map_upstream_errors(attempt):
                    data = await upstream.read()
                del headers["Content-Length"]
                ex.status = upstream.status
                return web.Response(
                    status=upstream.status, reason=upstream.reason, body=data, headers=headers
                )
            prepared = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=headers
            )
            ex.status = upstream.status
            await prepared.prepare(request)
            attempt.prepared = prepared
            reader = upstream.content
            with map_upstream_errors(attempt):
                while chunk := await reader.readany():
                    await prepared.write(chunk)
                    timer.reschedule(min(loop_time() + idle, deadline))
            await prepared.write_eof()
            return prepared
        except BaseException:
            upstream.close()  # not returned to the pool half-read
            raise
        finally:
            upstream.release()
