"""Exchange: the per-request state that every stage reads and adds to."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ipaddress import IPv4Address, IPv6Address

    from multidict import CIMultiDictProxy

    from gateway.cache import ResponseCapture
    from gateway.http1 import Request, Response, StreamResponse
    from gateway.routing import Route
    from gateway.tenants import Tenant
    from gateway.tracecontext import TraceContext
    from gateway.upstreams import Endpoint

__all__ = ["Exchange", "ResponseHook", "new_request_id"]

ResponseHook = Callable[
    ["Exchange", int, "CIMultiDictProxy[str]"], "Response | StreamResponse | None"
]

_ID_PREFIX = os.urandom(8).hex()  # this process's; workers are separate interpreters
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """A new request id: 32 lower-case hex characters, unique across processes and restarts.

    16 hex of randomness drawn once per process, then a 64-bit counter: as unique as a
    uuid4 for a request id (which needs uniqueness, not secrecy) at a fraction of its cost on
    the hot path (no ``os.urandom`` system call per request).
    """
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


class Exchange:
    """One request's journey through the pipeline.

    Each stage fills the fields it owns, in pipeline order: ``route`` (route stage),
    ``tenant`` (identify stage),
    ``client_ip``/``country``/``zone``/``zone_source``/``regions`` (locate stage),
    ``endpoint``/``upstream_status``/``attempts`` and the upstream timestamps (forwarder),
    ``headers_sent``/``bytes_out`` (whoever writes the response). Times are
    ``time.monotonic()`` seconds: the clock the loop's deadlines run on (uvloop's
    ``loop.time()`` reads it in 1 ms steps, too coarse for sub-millisecond timings); a
    timestamp is None until its event happened.

    Attributes:
        request: the parsed request (``gateway.http1.Request``).
        request_id: echoed as X-Request-Id both ways, and in problem details.
        start: monotonic time the handler started, seconds.
        trace: the W3C trace context (TraceContext); set by the server before any stage.
        first_sent: monotonic time the first upstream attempt was sent.
        attempt_sent: monotonic time the latest attempt was sent.
        upstream_headers_at: monotonic time the answering attempt's response headers arrived.
        upstream_end: monotonic time the answering attempt's body ended (or broke off).
        headers_sent: monotonic time the response headers went to the client.
        bytes_in: request body bytes relayed upstream as a stream; None: the Content-Length.
        bytes_out: response bytes written to the client; None until known.
    """

    __slots__ = (
        "attempt_sent",
        "attempts",
        "body_override",
        "bytes_in",
        "bytes_out",
        "cache_result",
        "cache_state",
        "capture",
        "client_ip",
        "country",
        "endpoint",
        "first_sent",
        "headers_sent",
        "peer_trusted",
        "ratelimit_result",
        "regions",
        "request",
        "request_id",
        "response_headers",
        "response_hook",
        "route",
        "slot_lease",
        "start",
        "status",
        "strip_usage_chunk",
        "tenant",
        "token_reservation",
        "trace",
        "upstream_end",
        "upstream_extra_headers",
        "upstream_headers",
        "upstream_headers_at",
        "upstream_status",
        "usage_tokens",
        "zone",
        "zone_source",
    )

    def __init__(self, request: Request, request_id: str, start: float) -> None:
        self.request = request
        self.request_id = request_id
        self.start = start
        self.route: Route | None = None
        self.tenant: Tenant | None = None
        self.peer_trusted = False
        self.client_ip: IPv4Address | IPv6Address | None = None
        self.country: str | None = None
        self.zone: str | None = None
        self.zone_source: str | None = None
        self.regions: tuple[str, ...] = ()
        self.endpoint: Endpoint | None = None
        self.upstream_status: int | None = None
        self.status: int | None = None
        self.attempts = 0
        self.response_headers: dict[str, str] = {}  # stages' additions to the answer
        self.ratelimit_result: str | None = None
        self.slot_lease: tuple[str, str] | None = None  # (key, lease) of a concurrency slot
        self.token_reservation = 0  # LLM tokens reserved at admission
        self.usage_tokens: int | None = None  # total tokens the upstream reported using
        self.body_override: bytes | None = None  # a stage rewrote the request body
        self.strip_usage_chunk = False  # the gateway asked for a usage chunk the client did not
        self.cache_state: dict[str, Any] | None = None  # the cache stage's notes on this request
        self.cache_result: str | None = None  # hit, miss, stale, revalidated, coalesced, ...
        self.capture: ResponseCapture | None = None  # the cache's copy of the answer
        self.response_hook: ResponseHook | None = None  # may answer instead (a 304 -> the entry)
        self.upstream_extra_headers: list[tuple[str, str]] = []  # e.g. If-None-Match
        self.upstream_headers: CIMultiDictProxy[str] | None = None  # the answer's, as received
        self.trace: TraceContext | None = None
        self.first_sent: float | None = None
        self.attempt_sent: float | None = None
        self.upstream_headers_at: float | None = None
        self.upstream_end: float | None = None
        self.headers_sent: float | None = None
        self.bytes_in: int | None = None
        self.bytes_out: int | None = None

    def __repr__(self) -> str:
        route = self.route.prefix if self.route else None
        endpoint = self.endpoint.origin if self.endpoint else None
        return (
            f"<Exchange {self.request_id} {self.request.method} {self.request.path} "
            f"route={route} zone={self.zone} endpoint={endpoint} status={self.status}>"
        )
