"""Cache stage, ``http`` policy: an RFC 9111 shared cache in front of the forwarder.

Decisions come from ``gateway.httpcache`` (pure); entries live in ``gateway.cachestore``
(L1 in process, L2 in the Redis of the request's zone). This stage wires them into the
request path:

* lookup (GET/HEAD): the primary key includes the residency zone, so an entry is only ever
  found by requests of its own zone; among the key's variants the one whose Vary'd request
  fields match is chosen (§4.1);
* fresh (or allowed stale): answered here with ``Age`` and ``Cache-Status: geogate; hit``;
  a client's own If-None-Match / If-Modified-Since is evaluated against it (RFC 9111 §4.3.2:
  304), and a single byte Range of a stored 200 gets a 206 (RFC 9110 §14);
* stale with a validator: the request goes forward with If-None-Match / If-Modified-Since;
  a 304 refreshes the entry's headers (§4.3.4) and the stored body is served;
* ``only-if-cached`` with nothing usable: 504 (§5.2.1.7);
* identical concurrent misses are coalesced: one goes upstream, the others wait (bounded)
  for its entry (``Cache-Status: ...; collapsed``);
* a storable answer (§3) is captured while it streams to the client (bounded by
  ``max_entry_bytes``) and stored when complete;
* an unsafe method's non-error answer invalidates the target URI and same-origin
  Location / Content-Location (§4.4);
* when the upstream fails (no region of the zone available, connect error, timeout), a stale
  entry within its stale-if-error window (RFC 5861 §4) is served instead of the error.

Every forwarded answer on a cached route carries ``Cache-Status`` (RFC 9211).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.cachekey import http_key, vary_key
from gateway.cachestore import CacheEntry, ZoneCaches
from gateway.errors import GatewayError, UpstreamError, UpstreamTimeout
from gateway.http1 import Response
from gateway.httpcache import (
    Outcome,
    StoredResponse,
    byte_range,
    cache_status,
    invalidates,
    is_storable,
    lookup_decision,
    not_modified,
    not_modified_headers,
    request_cache_control,
    stale_if_error_allows,
)
from gateway.pipeline import LocalReply

if TYPE_CHECKING:
    from gateway.config import RouteCacheConfig
    from gateway.exchange import Exchange
    from gateway.metrics import Metrics
    from gateway.pipeline import BackgroundTasks

__all__ = ["CacheStage", "Fetch", "ResponseCapture"]

Fetch = Callable[..., Awaitable["tuple[int, CIMultiDictProxy[str], bytes] | None"]]

COALESCE_WAIT = 10.0  # seconds a coalesced request waits for the leader before going itself
STALE_KEEP = 86400.0  # seconds an entry is kept past its freshness (for revalidation, stale)
_SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class ResponseCapture:
    """The forwarder's copy of an answer, for the cache: headers at once, body as it streams.

    Args:
        limit: bytes kept at most; past it the answer is not stored.
    """

    __slots__ = ("_chunks", "_size", "complete", "headers", "limit", "response_time", "status")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.response_time = 0.0
        self.complete = False
        self._chunks: list[bytes] = []
        self._size = 0

    def start(self, status: int, headers: Mapping[str, str] | CIMultiDict[str]) -> None:
        """Headers received (epoch ``response_time`` is taken now)."""
        self.status = status
        self.headers = CIMultiDict(headers)
        self.response_time = time.time()

    def feed(self, chunk: bytes) -> None:
        """A body chunk went to the client; keep it while under the limit."""
        if self._size <= self.limit:
            self._size += len(chunk)
            if self._size <= self.limit:
                self._chunks.append(chunk)

    def finish(self) -> None:
        """The body ended cleanly (a cut stream never calls this)."""
        self.complete = True

    @property
    def body(self) -> bytes | None:
        """The whole body, or None when it passed the limit or did not end cleanly."""
        if not self.complete or self._size > self.limit:
            return None
        return b"".join(self._chunks)


@dataclass(slots=True)
class _Lookup:
    key: str
    stored: StoredResponse | None
    entry: CacheEntry | None


class CacheStage:
    """The ``http`` cache policy for routes that name it.

    Args:
        caches: L1 and the per-zone L2 stores.
        routes: route prefix -> its cache config, for routes with ``cache: http``
            (``max_entry_bytes``, ``stale_if_disconnected``).
        metrics: lookups by result and zone.
        tasks: background work (L2 writes, stale-while-revalidate refreshes).
        fetch: the forwarder's ``fetch`` (a GET inside the request's zone), for
            stale-while-revalidate refreshes; None: stale entries are served, not refreshed.
    """

    name = "cache"

    def __init__(
        self,
        caches: ZoneCaches,
        routes: Mapping[str, RouteCacheConfig],
        *,
        metrics: Metrics,
        tasks: BackgroundTasks,
        fetch: Fetch | None = None,
    ) -> None:
        self._caches = caches
        self._routes = dict(routes)
        self._metrics = metrics
        self._tasks = tasks
        self._fetch = fetch
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._refreshing: set[str] = set()

    def _key(self, ex: Exchange) -> str:
        request = ex.request
        assert ex.route is not None
        return http_key(
            zone=ex.zone or "",
            route=ex.route.prefix,
            method="GET",
            scheme=request.scheme,
            host=request.host,
            target=request.raw_path,
        )

    async def _find(self, ex: Exchange, key: str) -> _Lookup:
        zone = ex.zone or ""
        entries = await self._caches.variants(zone, key)
        if not entries:
            entry = await self._caches.get(zone, key, "")  # the common no-Vary case, via L2
            entries = [entry] if entry is not None else []
        for entry in entries:
            stored = _stored_of(entry)
            if stored is not None and stored.vary_matches(ex.request.headers):
                return _Lookup(key, stored, entry)
        return _Lookup(key, None, None)

    async def on_request(self, ex: Exchange) -> LocalReply | None:
        """Answer from the cache, or prepare the forwarded request for storing/revalidating.

        Raises:
            UpstreamTimeout: ``only-if-cached`` and nothing usable is stored (504).
        """
        route = ex.route
        if route is None or route.prefix not in self._routes:
            return None
        method = ex.request.method
        if method not in ("GET", "HEAD"):
            ex.cache_state = {"unsafe": method not in _SAFE}
            return None
        key = self._key(ex)
        found = await self._find(ex, key)
        now = time.time()
        decision = lookup_decision(method, ex.request.headers, found.stored, now)
        collapsed = False
        if decision.outcome in (Outcome.MUST_FORWARD,) and found.stored is None:
            leader = self._inflight.get(key)
            if leader is not None:  # an identical miss is on its way: wait for its entry
                with contextlib.suppress(TimeoutError):  # then it goes forward itself
                    await asyncio.wait_for(asyncio.shield(leader), COALESCE_WAIT)
                found = await self._find(ex, key)
                decision = lookup_decision(method, ex.request.headers, found.stored, time.time())
                collapsed = True
        if decision.outcome.serves_stored and found.entry is not None:
            self._count(ex, "coalesced" if collapsed else "hit")
            status = cache_status("hit", ttl=decision.ttl, collapsed=collapsed)
            if decision.outcome is Outcome.STALE_WHILE_REVALIDATE:
                status += "; detail=stale-while-revalidate"
                self._refresh_in_background(ex, key, found)
            return _answer(ex, found.entry, found.stored, decision.age, status)
        if decision.outcome is Outcome.ONLY_IF_CACHED:
            self._count(ex, "miss")
            raise UpstreamTimeout("only-if-cached: nothing usable is stored", phase="cache")
        state: dict[str, Any] = {
            "key": key,
            "fwd": decision.fwd or "miss",
            "request_time": now,
            "entry": found.entry,
            "stored": found.stored,
        }
        if decision.outcome is Outcome.REVALIDATE and found.entry is not None:
            ex.upstream_extra_headers.extend(decision.conditional)
            state["revalidating"] = True
        if found.stored is None and key not in self._inflight:
            self._inflight[key] = asyncio.get_running_loop().create_future()
            state["leader"] = True
        ex.cache_state = state
        ex.capture = ResponseCapture(self._routes[route.prefix].max_entry_bytes)
        ex.response_hook = self._on_upstream_response
        return None

    def _refresh_in_background(self, ex: Exchange, key: str, found: _Lookup) -> None:
        """RFC 5861 §3: after serving a stale entry, revalidate it off the request path."""
        if self._fetch is None or key in self._refreshing or found.entry is None:
            return
        assert found.stored is not None
        request = ex.request
        headers = {name: value for name, value in found.stored.conditional_headers()}
        for name, value in found.stored.vary:  # the variant's own request fields
            if value is not None:
                headers[name] = value
        self._refreshing.add(key)
        self._tasks.spawn(
            self._refresh(key, found.entry, found.stored, tuple(ex.regions), ex.zone or "",
                          request.raw_path, headers)
        )  # fmt: skip

    async def _refresh(
        self,
        key: str,
        entry: CacheEntry,
        stored: StoredResponse,
        regions: tuple[str, ...],
        zone: str,
        target: str,
        headers: dict[str, str],
    ) -> None:
        assert self._fetch is not None
        try:
            request_time = time.time()
            got = await self._fetch(
                regions, target, headers, zone=zone, within=10.0,
                limit=policy.max_entry_bytes if (policy := self._routes.get(entry.route)) else 0,
            )  # fmt: skip
            if got is None:
                return
            status, resp_headers, body = got
            response_time = time.time()
            if status == 304:
                fresh = stored.freshened(
                    list(resp_headers.items()), request_time=request_time,
                    response_time=response_time,
                )  # fmt: skip
                updated = _entry_of(entry, fresh) if fresh is not None else None
            elif is_storable("GET", status, list(headers.items()), resp_headers):
                new = StoredResponse.capture(
                    "GET", status, list(headers.items()), resp_headers,
                    body_length=len(body), request_time=request_time,
                    response_time=response_time,
                )  # fmt: skip
                updated = _entry_of(entry, new, body=body)
            else:
                updated = None
            if updated is not None:
                self._caches.put_l1(updated)
                await self._caches.put_l2(updated)
        finally:
            self._refreshing.discard(key)

    def _on_upstream_response(
        self, ex: Exchange, status: int, headers: CIMultiDictProxy[str]
    ) -> Response | None:
        """A 304 to our revalidation: refresh the entry, serve its body (§4.3.4)."""
        state = ex.cache_state or {}
        entry: CacheEntry | None = state.get("entry")
        stored: StoredResponse | None = state.get("stored")
        if status != 304 or not state.get("revalidating") or entry is None or stored is None:
            ex.response_headers["Cache-Status"] = cache_status(
                "fwd", fwd=state.get("fwd", "miss"), fwd_status=status,
                stored=is_storable(ex.request.method, status, ex.request.headers, headers),
            )  # fmt: skip
            return None
        fresh = stored.freshened(
            list(headers.items()), request_time=state["request_time"], response_time=time.time()
        )
        if fresh is None:  # validators disagree: the 304 is not about our entry
            return None
        updated = _entry_of(entry, fresh)
        self._caches.put_l1(updated)
        self._tasks.spawn(self._caches.put_l2(updated))
        self._count(ex, "revalidated")
        status_field = cache_status("fwd", fwd="stale", fwd_status=304, stored=True)
        reply = _answer(ex, updated, fresh, 0, status_field)
        ex.status = reply.status
        return Response(reply.status, reply.body, reply.headers)

    def on_error(self, ex: Exchange, err: GatewayError) -> LocalReply | None:
        """Serve a stale entry instead of a gateway error: within its stale-if-error, or,
        when no answer came from the upstream at all (``UpstreamError``: refused, reset,
        timed out, no region of the zone available), within the route's
        ``stale_if_disconnected`` (``stale_if_error_allows``)."""
        state = ex.cache_state or {}
        entry: CacheEntry | None = state.get("entry")
        stored: StoredResponse | None = state.get("stored")
        if entry is None or stored is None or err.status < 500 or ex.route is None:
            return None
        policy = self._routes.get(ex.route.prefix)
        disconnected = policy.stale_if_disconnected if policy is not None else 0.0
        now = time.time()
        if not stale_if_error_allows(
            stored,
            now,
            request_cache_control(ex.request.headers),
            disconnected_window=disconnected if isinstance(err, UpstreamError) else 0.0,
        ):
            return None
        self._count(ex, "stale")
        age = int(stored.current_age(now))
        field = cache_status("hit", ttl=stored.lifetime - age, detail=f"stale-if-error {err.slug}")
        return _reply(entry, age, field)

    def on_complete(self, ex: Exchange) -> None:
        """Store a complete storable answer; invalidate after unsafe methods; wake waiters."""
        state = ex.cache_state
        if state is None:
            return
        if ex.cache_result is None:
            self._count(ex, "bypass" if "unsafe" in state else "miss")
        capture = ex.capture
        try:
            if state.get("unsafe") and ex.status is not None and ex.status < 400:
                self._invalidate(ex)
            elif capture is not None and capture.body is not None and ex.zone is not None:
                self._store(ex, state, capture)
        finally:
            if state.get("leader"):
                future = self._inflight.pop(state["key"], None)
                if future is not None and not future.done():
                    future.set_result(None)

    def _store(self, ex: Exchange, state: dict[str, Any], capture: ResponseCapture) -> None:
        request = ex.request
        if not is_storable(request.method, capture.status, request.headers, capture.headers):
            return
        body = capture.body
        assert body is not None
        assert ex.route is not None
        assert ex.zone is not None
        stored = StoredResponse.capture(
            request.method, capture.status, request.headers, capture.headers,
            body_length=len(body), request_time=state["request_time"],
            response_time=capture.response_time,
        )  # fmt: skip
        entry = CacheEntry(
            key=state["key"],
            variant=vary_key([n for n, _ in stored.vary], request.headers),
            zone=ex.zone,
            route=ex.route.prefix,
            tenant=ex.tenant.id if ex.tenant else None,
            status=stored.status,
            headers=stored.headers,
            body=body,
            meta=_meta_of(stored),
            stored_at=capture.response_time,
            expires_at=capture.response_time + max(0.0, stored.lifetime) + STALE_KEEP,
        )
        if self._caches.put_l1(entry):
            self._tasks.spawn(self._caches.put_l2(entry))
            self._metrics.cache_stores.labels(ex.zone).inc()

    def _invalidate(self, ex: Exchange) -> None:
        request = ex.request
        assert ex.route is not None
        targets = invalidates(
            request.method, ex.status or 0, str(request.url), ex.upstream_headers or ()
        )
        for target in targets:
            key = http_key(
                zone=ex.zone or "", route=ex.route.prefix, method="GET",
                scheme=request.scheme, host=request.host, target=target,
            )  # fmt: skip
            self._tasks.spawn(self._caches.invalidate(ex.zone or "", key))

    def _count(self, ex: Exchange, result: str) -> None:
        ex.cache_result = result
        self._metrics.cache_lookups.labels(result, ex.zone or "none").inc()


def _meta_of(stored: StoredResponse) -> dict[str, Any]:
    return {
        "request_time": stored.request_time,
        "response_time": stored.response_time,
        "vary": [list(v) for v in stored.vary],
        "method": stored.method,
    }


def _stored_of(entry: CacheEntry) -> StoredResponse | None:
    meta = entry.meta
    try:
        return StoredResponse(
            status=entry.status,
            headers=tuple(entry.headers),
            body_length=len(entry.body),
            request_time=float(meta["request_time"]),
            response_time=float(meta["response_time"]),
            vary=tuple((str(n), v if v is None else str(v)) for n, v in meta["vary"]),
            method=str(meta.get("method", "GET")),
        )
    except (KeyError, TypeError, ValueError):
        return None  # an entry this version cannot read: a miss


def _entry_of(
    entry: CacheEntry, stored: StoredResponse, *, body: bytes | None = None
) -> CacheEntry:
    return CacheEntry(
        key=entry.key, variant=entry.variant, zone=entry.zone, route=entry.route,
        tenant=entry.tenant, status=stored.status, headers=stored.headers,
        body=entry.body if body is None else body,
        meta=_meta_of(stored), stored_at=stored.response_time,
        expires_at=stored.response_time + max(0.0, stored.lifetime) + STALE_KEEP,
    )  # fmt: skip


def _answer(
    ex: Exchange, entry: CacheEntry, stored: StoredResponse | None, age: int, status_field: str
) -> LocalReply:
    """The stored answer shaped for this request: a 304 when the client's own validators match
    (RFC 9111 §4.3.2, fields per RFC 9110 §15.4.5), a 206 with Content-Range for a single byte
    range of a stored 200 (RFC 9110 §14.1.2, §15.3.7), else the whole stored response."""
    request = ex.request
    if stored is None:
        return _reply(entry, age, status_field)
    if not_modified(request.method, request.headers, stored):
        headers = CIMultiDict(not_modified_headers(stored))
        headers["Age"] = str(max(0, age))
        headers["Cache-Status"] = status_field
        return LocalReply(304, b"", headers)
    span = byte_range(request.method, request.headers, stored, len(entry.body))
    if span is None:
        return _reply(entry, age, status_field)
    first, last = span
    headers = _stored_headers(entry, age, status_field)
    headers["Content-Range"] = f"bytes {first}-{last}/{len(entry.body)}"
    return LocalReply(206, entry.body[first : last + 1], headers)


def _reply(entry: CacheEntry, age: int, status_field: str) -> LocalReply:
    """The stored answer with Age (§5.1) and Cache-Status; the listener leaves the body out for
    HEAD while keeping the GET's Content-Length (RFC 9110 §9.3.2)."""
    return LocalReply(entry.status, entry.body, _stored_headers(entry, age, status_field))


def _stored_headers(entry: CacheEntry, age: int, status_field: str) -> CIMultiDict[str]:
    headers = CIMultiDict(entry.headers)
    headers.popall("Age", None)
    headers.popall("Content-Length", None)
    headers["Age"] = str(max(0, age))
    headers["Cache-Status"] = status_field
    return headers
