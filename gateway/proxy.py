"""The forwarder: stream a request to an upstream endpoint and its answer back.

Rule: this is the only module that talks HTTP to upstreams, through its own lean client
(``gateway.upstream_client``: pooled HTTP/1.1 connections parsed by llhttp), which raises
GatewayErrors itself (connect, protocol, timeout with its phase).

Backpressure: the client pauses the upstream socket once it holds ``READ_HIGH_WATER`` bytes
the forwarder has not taken, and ``resp.write()`` waits while the client socket is full, so a
streamed body holds only a few chunks in memory, whatever its length. Small bodies with a
known Content-Length (at most ``BUFFER_LIMIT`` bytes) are read whole, which costs fewer system
calls and loop iterations than chunked relaying; everything else (chunked, SSE, large) is
relayed chunk by chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.budget import RetryBudget, backoff_delay, parse_retry_after
from gateway.errors import (
    GatewayError,
    NoHealthyUpstream,
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
from gateway.http1 import RequestBody, Response, StreamResponse
from gateway.tenants import KEY_HEADERS
from gateway.usage import SseUsageTap, usage_from_json

if TYPE_CHECKING:
    from gateway.exchange import Exchange
    from gateway.metrics import Metrics
    from gateway.routing import Route, RouteTable
    from gateway.upstream_client import UpstreamClient, UpstreamResponse
    from gateway.upstreams import Endpoint, Lease, Region, Upstreams

__all__ = [
    "BUFFER_LIMIT",
    "IDEMPOTENT_METHODS",
    "HttpForwarder",
    "sse_error_event",
]

log = logging.getLogger("geogate.proxy")

BUFFER_LIMIT = 64 * 1024  # bytes: bodies up to this size with a Content-Length are read whole
_NO_BODY_STATUSES = frozenset({204, 304})
_FORWARDING_FIELDS = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Forwarded")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})  # RFC 9110


class _BodyState:
    __slots__ = ("relayed", "started", "too_large")

    def __init__(self) -> None:
        self.started = False  # a streamed body began to be sent: it cannot be replayed
        self.too_large = False
        self.relayed = 0  # bytes of a streamed body relayed so far


def _result_of(err: GatewayError) -> str:
    if isinstance(err, UpstreamTimeout):
        return "timeout"
    if isinstance(err, UpstreamConnectError):
        return "connect_error"
    return "protocol_error"


def _retry_reason(err: GatewayError, *, idempotent: bool) -> str | None:
    """Why ``err`` may be retried on another endpoint, or None when it may not."""
    if isinstance(err, UpstreamConnectError) or (
        isinstance(err, UpstreamTimeout) and err.phase == "connect"
    ):
        return "connect"  # nothing reached the upstream: safe for every method
    if isinstance(err, UpstreamProtocolError) and idempotent:
        return "reset"
    return None


def sse_error_event(path: str, err: GatewayError, request_id: str) -> bytes:
    """An SSE event that tells the client its stream failed, in the stream's own dialect.

    LangServe streams (``.../stream``) get ``event: error`` with ``{"status_code", "message"}``
    (LangServe's wire format); others get OpenAI's ``data: {"error": {...}}``, which the
    openai client raises as an APIError.
    """
    if path.endswith("/stream") or path.endswith("/stream_log"):
        data = orjson.dumps({"status_code": err.status, "message": str(err)})
        return b"event: error\r\ndata: " + data + b"\r\n\r\n"
    payload = {
        "error": {
            "message": f"{err} (request {request_id})",
            "type": "upstream_error",
            "code": err.slug,
        }
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def _limited_body(
    content: RequestBody, limit: int, state: _BodyState
) -> AsyncIterator[bytes]:
    """Relay a request body chunk by chunk, stopping once it passes ``limit`` bytes."""
    state.started = True
    async for chunk in content.iter_any():
        state.relayed += len(chunk)
        if state.relayed > limit:
            state.too_large = True
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        yield chunk


class HttpForwarder:
    """The terminal stage: forward to the chosen endpoint over pooled upstream connections.

    Args:
        client: the process's one UpstreamClient (keep-alive pools per endpoint).
        upstreams: the endpoints by region.
        routes: the compiled routes (per-route socket timeouts are prepared from them).
        via: the Via pseudonym (RFC 9110 §7.6.3).
        budget: the process's retry budget.
        metrics: where attempts, retries and refusals are counted.
        retry_after: seconds sent as Retry-After when the zone has no available region.
    """

    def __init__(
        self,
        client: UpstreamClient,
        upstreams: Upstreams,
        routes: RouteTable,
        via: str,
        *,
        budget: RetryBudget,
        metrics: Metrics,
        retry_after: int = 2,
    ) -> None:
        self._client = client
        self._upstreams = upstreams
        self._via = via
        self._budget = budget
        self._metrics = metrics
        self._retry_after = retry_after

    def _upstream_headers(self, ex: Exchange) -> CIMultiDict[str]:
        request = ex.request
        route = ex.route
        extra: tuple[str, ...] = GATEWAY_SET_FIELDS
        if route is not None and route.auth != "none":
            extra = GATEWAY_SET_FIELDS + KEY_HEADERS  # the tenant's key stays at the gateway
        headers = strip_hop_by_hop(request.headers, extra)
        if ex.tenant is not None:
            headers["X-Tenant-Id"] = ex.tenant.id
        if ex.body_override is not None:
            headers["Content-Length"] = str(len(ex.body_override))
        for name, value in ex.upstream_extra_headers:  # e.g. the cache's If-None-Match
            headers[name] = value
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
        trace = ex.trace
        if trace is not None:  # W3C Trace Context: same trace, the gateway's span as parent
            headers["traceparent"] = trace.traceparent()
            if trace.tracestate is None:
                headers.popall("tracestate", None)
            else:
                headers["tracestate"] = trace.tracestate
        return headers

    def _response_headers(self, ex: Exchange, upstream: UpstreamResponse) -> CIMultiDict[str]:
        headers = strip_hop_by_hop(upstream.headers)
        via = via_value(upstream.version, self._via)
        prior_via = ", ".join(headers.popall("Via", ()))
        headers["Via"] = f"{prior_via}, {via}" if prior_via else via
        headers["X-Request-Id"] = ex.request_id
        if ex.zone is not None:
            headers["X-Residency-Zone"] = ex.zone  # tells the client which zone served it
        if ex.response_headers:
            headers.update(ex.response_headers)
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
        if ex.body_override is not None:
            return ex.body_override
        if not request.body_exists:
            return None
        expects = request.headers.get("Expect", "").lower() == "100-continue"
        if expects and request.transport is not None:
            # RFC 9110 §10.1.1: we decided to read the body, so invite the client to send it
            request.transport.write(_CONTINUE)
        if length is not None and length <= BUFFER_LIMIT:
            return await request.read()
        return _limited_body(request.content, route.max_body_bytes, state)

    async def forward(self, ex: Exchange) -> Response | StreamResponse:
        """Send ``ex.request`` to an endpoint of its zone, retrying on another one when safe,
        and stream the answer back.

        ``route.first_byte_timeout`` bounds each attempt's wait for response headers,
        ``idle_timeout`` the gap between body chunks, ``total_timeout`` the whole exchange
        with its retries and backoff (seconds; loop clock). An attempt is retried, on an
        endpoint this request has not tried yet, only before any byte went to the client,
        within ``route.retry_attempts`` and the retry budget, and only: after a connect
        failure (nothing was sent: any method), or after a reset before the response or a
        status in ``route.retry_statuses`` for idempotent methods (RFC 9110 §9.2.2), POST and
        PATCH included when the route allows or the request has an ``Idempotency-Key``.

        Raises:
            NoHealthyUpstream: no region of the zone is available, or all are full (503).
            PayloadTooLarge: the body passes ``route.max_body_bytes`` (413).
            UpstreamConnectError: no connection could be made, DNS and TLS included (502).
            UpstreamProtocolError: the upstream reset, closed or spoke broken HTTP (502).
            UpstreamTimeout: a phase ran out of time (504; ``connect`` is
                ``route.connect_timeout``).
            asyncio.CancelledError: the client left; the upstream connection is closed.
        """
        route = ex.route
        assert route is not None
        request = ex.request
        zone = ex.zone or ""
        regions = self._upstreams.candidates(ex.regions)
        if not regions:
            self._metrics.residency_blocked.labels(zone).inc()
            raise NoHealthyUpstream(
                f"no region of residency zone {zone!r} is available; the request was not "
                "sent anywhere else",
                zone=zone,
                retry_after=self._retry_after,
            )
        state = _BodyState()
        body = await self._request_body(ex, route, state)
        target = request.raw_path
        if not target.startswith("/"):  # absolute-form (RFC 9112 §3.2.2): keep path + query
            target = request.rel_url.raw_path_qs
        deadline = ex.start + route.total_timeout
        replayable = body is None or isinstance(body, bytes)
        idempotent = (
            request.method in IDEMPOTENT_METHODS
            or route.retry_non_idempotent
            or "Idempotency-Key" in request.headers
        )
        headers = self._upstream_headers(ex)
        tried: set[Endpoint] = set()
        budget = self._budget
        budget.request_started()
        holding_retry = False
        lease = self._upstreams.acquire(regions, tried)
        try:
            if lease is None:
                if self._upstreams.is_bulkhead_full(regions):
                    self._metrics.bulkhead_rejections.labels(zone).inc()
                    raise NoHealthyUpstream(
                        "every endpoint of the zone is at its concurrency limit",
                        zone=zone,
                        retry_after=1,
                    )
                self._metrics.residency_blocked.labels(zone).inc()
                raise NoHealthyUpstream(
                    f"no endpoint of residency zone {zone!r} can take the request",
                    zone=zone,
                    retry_after=self._retry_after,
                )
            while True:
                endpoint = lease.endpoint
                tried.add(endpoint)
                ex.endpoint = endpoint
                ex.attempts += 1
                ex.attempt_sent = sent_at = time.monotonic()
                if ex.first_sent is None:
                    ex.first_sent = sent_at
                ex.upstream_headers_at = ex.upstream_end = None  # of an earlier attempt
                try:
                    upstream = await self._send(
                        ex, route, endpoint.origin, target, headers, body, state, deadline,
                        retry_stale=idempotent and replayable,
                    )  # fmt: skip
                    ex.upstream_headers_at = answered = time.monotonic()
                    data = await self._read_small(ex, route, upstream, deadline)
                    if data is not None:
                        ex.upstream_end = done = time.monotonic()
                        self._metrics.observe_upstream_duration(endpoint.region, done - sent_at)
                except (UpstreamConnectError, UpstreamTimeout, UpstreamProtocolError) as err:
                    self._finish(lease, success=False, result=_result_of(err))
                    reason = _retry_reason(err, idempotent=idempotent)
                    if reason is None or not (
                        replayable or (reason == "connect" and not state.started)
                    ):
                        raise
                    retry = await self._next_attempt(
                        ex, route, regions, tried, reason, deadline, holding_retry
                    )
                    if retry is None:
                        raise
                    lease, holding_retry = retry, holding_retry or reason != "connect"
                    continue
                except BaseException:
                    lease.release(None)
                    raise
                self._record_first_byte(endpoint, answered - sent_at)
                status = upstream.status
                if status in route.retry_statuses and idempotent and replayable:
                    retry_after = parse_retry_after(
                        upstream.headers.get("Retry-After"), now_epoch=time.time()
                    )
                    if retry_after:
                        self._upstreams.hold(endpoint, retry_after)
                    retry = await self._next_attempt(
                        ex, route, regions, tried, f"status_{status}", deadline, holding_retry,
                        discard=upstream,
                    )  # fmt: skip
                    if retry is not None:
                        self._finish(lease, success=False, result=f"status_{status // 100}xx")
                        lease, holding_retry = retry, True
                        continue
                ex.upstream_headers = upstream.headers
                if ex.response_hook is not None:
                    local = ex.response_hook(ex, status, upstream.headers)
                    if local is not None:  # answered from elsewhere (a 304 -> the entry)
                        upstream.release()
                        if ex.upstream_end is None:
                            ex.upstream_end = time.monotonic()
                        self._finish(lease, success=True, result=f"status_{status // 100}xx")
                        return local
                return await self._stream_back(ex, route, upstream, data, lease, deadline)
        finally:
            if holding_retry:
                budget.release_retry()
            budget.request_finished()
            if state.started:
                ex.bytes_in = state.relayed

    async def _next_attempt(
        self,
        ex: Exchange,
        route: Route,
        regions: list[Region],
        tried: set[Endpoint],
        reason: str,
        deadline: float,
        holding: bool,
        discard: UpstreamResponse | None = None,
    ) -> Lease | None:
        """Decide on one more attempt: take another endpoint and the budget, wait the backoff.

        Returns None (keeping ``discard``, the answer the client then gets) when the route's
        attempts are used up, no other endpoint of the zone is free, the retry budget is
        exhausted, or the backoff would pass the deadline.
        """
        if ex.attempts >= route.retry_attempts:
            return None
        loop = asyncio.get_running_loop()
        delay = backoff_delay(ex.attempts, base=route.backoff_base, cap=route.backoff_cap)
        if loop.time() + delay >= deadline:
            return None
        lease = self._upstreams.acquire(regions, tried)
        if lease is None:
            return None
        # A retry after a refused connection costs the upstreams nothing (nothing reached
        # them), so it takes no budget: the budget guards overloaded upstreams against retry
        # storms, and charging it here would turn a killed replica into failed requests.
        if reason != "connect" and not holding and not self._budget.try_acquire_retry():
            lease.release(None)
            self._metrics.retry_budget_exhausted.labels(route.prefix).inc()
            return None
        self._metrics.retries.labels(route.prefix, reason).inc()
        if discard is not None:
            discard.close()
        try:
            await asyncio.sleep(delay)
        except BaseException:
            lease.release(None)
            raise
        return lease

    async def fetch(
        self,
        regions: tuple[str, ...],
        target: str,
        headers: Mapping[str, str],
        *,
        zone: str,
        within: float,
        limit: int,
    ) -> tuple[int, CIMultiDictProxy[str], bytes] | None:
        """One GET on behalf of the gateway itself (a cache refresh), inside ``zone``.

        The endpoint is chosen exactly as for client requests: only among ``regions``
        (``ResidencyRules.regions_for(zone)``), available ones first, and the outcome feeds
        outlier detection and the breaker. No retry.

        Args:
            regions: the zone's regions.
            target: path and query, e.g. ``"/docs/a?x=1"``.
            headers: request fields to send (validators, Vary'd fields); X-Residency-Zone is
                set here.
            zone: the residency zone.
            within: seconds for the whole exchange.
            limit: bytes of body read at most; a longer body gives None.

        Returns:
            (status, headers, body), or None when nothing could be fetched.
        """
        candidates = self._upstreams.candidates(regions)
        lease = self._upstreams.acquire(candidates) if candidates else None
        if lease is None:
            return None
        out_headers = {**headers, "X-Residency-Zone": zone, "Via": f"1.1 {self._via}"}
        success: bool | None = None
        deadline = asyncio.get_running_loop().time() + within
        upstream: UpstreamResponse | None = None
        try:
            upstream = await self._client.request(
                lease.endpoint.origin, "GET", target, out_headers,
                connect_timeout=within, deadline=deadline, phase="total", retry_stale=True,
            )  # fmt: skip
            async with asyncio.timeout_at(deadline):
                chunks: list[bytes] = []
                size = 0
                while chunk := await upstream.readany():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > limit:
                        success = upstream.status < 500
                        return None
            success = upstream.status < 500
            return upstream.status, upstream.headers, b"".join(chunks)
        except (TimeoutError, UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout) as exc:
            success = False
            log.info("background fetch of %s failed: %s", target, exc)
            return None
        finally:
            if upstream is not None:
                upstream.release()  # closes the connection unless the body ended cleanly
            self._finish(lease, success=success, result="background")

    def _finish(self, lease: Lease, *, success: bool | None, result: str) -> None:
        if lease.release(success):
            self._metrics.ejections.labels(lease.region.name, lease.endpoint.origin).inc()
        metrics = self._metrics
        metrics.upstream_attempts.labels(lease.region.name, result).inc()

    def _record_first_byte(self, endpoint: Endpoint, seconds: float) -> None:
        self._upstreams.record_rtt(endpoint, seconds)
        self._metrics.observe_upstream_first_byte(endpoint.region, seconds)

    async def _send(
        self,
        ex: Exchange,
        route: Route,
        origin: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
        state: _BodyState,
        deadline: float,
        *,
        retry_stale: bool,
    ) -> UpstreamResponse:
        """One attempt up to the response headers (``first_byte`` bounds connect + send + wait).

        Args:
            retry_stale: the request may be sent again on a new connection when a reused
                one closes before answering (idempotent and replayable).

        Raises:
            UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout: from the client.
            PayloadTooLarge: the streamed body passed the limit while being sent.
        """
        first_byte = self._client.loop.time() + route.first_byte_timeout
        phase = "total" if deadline <= first_byte else "first_byte"
        try:
            return await self._client.request(
                origin, ex.request.method, target, headers, body,
                connect_timeout=route.connect_timeout, deadline=min(first_byte, deadline),
                phase=phase, retry_stale=retry_stale,
            )  # fmt: skip
        except GatewayError:
            if state.too_large:
                raise PayloadTooLarge(
                    f"request body exceeds {route.max_body_bytes} bytes"
                ) from None
            raise

    async def _read_small(
        self, ex: Exchange, route: Route, upstream: UpstreamResponse, deadline: float
    ) -> bytes | None:
        """Read a body of at most BUFFER_LIMIT bytes with a Content-Length whole, before any
        byte goes to the client, so that a reset while reading can still be retried.

        Returns:
            The body, or None when it is to be streamed (unknown or large length, HEAD,
            204/304).

        Raises:
            UpstreamProtocolError: the upstream broke the body (502; retryable if idempotent).
            UpstreamTimeout: ``idle`` ran out (504).
        """
        length = upstream.content_length
        if (
            length is None
            or length > BUFFER_LIMIT
            or ex.request.method == "HEAD"
            or upstream.status in _NO_BODY_STATUSES
        ):
            return None
        idle = self._client.loop.time() + route.idle_timeout
        if deadline <= idle:
            return await upstream.read(deadline, "total")  # closes the connection on failure
        return await upstream.read(idle, "idle")

    async def _stream_back(
        self,
        ex: Exchange,
        route: Route,
        upstream: UpstreamResponse,
        data: bytes | None,
        lease: Lease,
        deadline: float,
    ) -> Response | StreamResponse:
        """Relay the upstream's answer to the client; release the lease with its outcome.

        A failure after the headers went out cannot change the status any more: an SSE
        stream gets an explicit error event in its own dialect (OpenAI ``data: {"error":...}``
        or LangServe ``event: error``), then the connection is cut, so no client mistakes a
        broken answer for a complete one.
        """
        ex.upstream_status = status = upstream.status
        success: bool | None = status < 500
        result = f"status_{status // 100}xx"
        if data is not None:  # read whole already: nothing left to wait for, so no timer
            try:
                headers = self._response_headers(ex, upstream)
                del headers["Content-Length"]
                capture = ex.capture
                if capture is not None:
                    capture.start(status, upstream.headers)  # as received, not as sent
                    capture.feed(data)
                    capture.finish()
                if ex.token_reservation:
                    ex.usage_tokens = usage_from_json(data)
                ex.status = status
                return Response(status, data, headers, upstream.reason)
            except BaseException:
                success, result = None, "cancelled"
                raise
            finally:
                upstream.release()
                self._finish(lease, success=success, result=result)
        request = ex.request
        loop = asyncio.get_running_loop()
        prepared: StreamResponse | None = None
        idle = route.idle_timeout
        try:
            async with asyncio.timeout_at(min(loop.time() + idle, deadline)) as timer:
                headers = self._response_headers(ex, upstream)
                capture = ex.capture
                if capture is not None:
                    capture.start(status, upstream.headers)  # as received, not as sent
                prepared = StreamResponse(status, upstream.reason, headers)
                ex.status = status
                await prepared.prepare(request)
                ex.headers_sent = time.monotonic()
                ex.bytes_out = 0  # body bytes, in case the stream breaks before write_eof
                tap = None
                if ex.token_reservation and upstream.content_type == "text/event-stream":
                    tap = SseUsageTap(strip=ex.strip_usage_chunk)
                while chunk := await upstream.readany():
                    if tap is not None:
                        chunk = tap.feed(chunk)
                    if chunk:
                        await prepared.write(chunk)
                        ex.bytes_out += len(chunk)
                        if capture is not None:
                            capture.feed(chunk)
                    timer.reschedule(min(loop.time() + idle, deadline))
                ex.upstream_end = done = time.monotonic()
                if ex.attempt_sent is not None and ex.endpoint is not None:
                    self._metrics.observe_upstream_duration(
                        ex.endpoint.region, done - ex.attempt_sent
                    )
                if tap is not None:
                    if rest := tap.flush():
                        await prepared.write(rest)
                        ex.bytes_out += len(rest)
                        if capture is not None:
                            capture.feed(rest)
                    ex.usage_tokens = tap.usage
                await prepared.write_eof()
                if capture is not None:
                    capture.finish()
                return prepared
        except TimeoutError as exc:
            phase = "total" if loop.time() >= deadline else "idle"
            err: GatewayError = UpstreamTimeout(f"upstream {phase} timeout", phase=phase)
            err.__cause__ = exc
            success, result = False, "timeout"
        except (UpstreamTimeout, UpstreamProtocolError) as exc:
            err = exc
            success, result = False, _result_of(exc)
        except BaseException:
            success, result = None, "cancelled"  # the client left: not the upstream's fault
            upstream.close()
            raise
        finally:
            upstream.release()
            if ex.upstream_end is None:  # the body broke off, or the client left
                ex.upstream_end = time.monotonic()
            self._finish(lease, success=success, result=result)
        if prepared is None:
            raise err
        await self._abort_stream(ex, prepared, upstream, err)
        return prepared

    async def _abort_stream(
        self,
        ex: Exchange,
        prepared: StreamResponse,
        upstream: UpstreamResponse,
        err: GatewayError,
    ) -> None:
        """End a response whose headers went out: an SSE error event, then cut."""
        request = ex.request
        region = ex.endpoint.region if ex.endpoint else ""
        self._metrics.stream_aborts.labels(region, err.slug).inc()
        log.warning("upstream failed mid-body: %s (request %s)", err, ex.request_id)
        if upstream.content_type == "text/event-stream":
            event = sse_error_event(request.path, err, ex.request_id)
            with contextlib.suppress(ConnectionError, RuntimeError):
                async with asyncio.timeout(1.0):
                    await prepared.write(event)
        if request.transport is not None:
            request.transport.close()
