"""Route table: host + longest path prefix -> route.

Rule: this module decides from plain strings; it never reads a socket. A request no route
matches is refused (404): the gateway is never an open proxy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.config import LimitsConfig, RouteConfig

__all__ = ["DEFAULT_METHODS", "AnyMethodExcept", "Route", "RouteTable"]


@dataclass(frozen=True, slots=True)
class AnyMethodExcept:
    """The methods of a route that lists none: every method but ``excluded``.

    Extension methods (e.g. ``M-SEARCH``, WebDAV's ``PROPFIND``) are proxied like any other
    (RFC 9110 §9.1: the method set is extensible); ``CONNECT`` and ``TRACE`` are not: a
    gateway is no tunnel, and TRACE would echo the client's credentials back (RFC 9110
    §9.3.8). ``"GET" in DEFAULT_METHODS`` is True; ``"TRACE" in DEFAULT_METHODS`` is False.
    """

    excluded: frozenset[str]

    def __contains__(self, method: object) -> bool:
        return method not in self.excluded


DEFAULT_METHODS = AnyMethodExcept(frozenset({"CONNECT", "TRACE"}))


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled route: what the request path needs, precomputed at config load.

    Attributes:
        index: position in the config's ``routes`` list (for messages and metrics).
        prefix: path prefix, e.g. ``"/v1/"``; also the metrics label.
        host: lower-case host without port, or None for any host.
        methods: upper-case methods allowed.
        connect_timeout, first_byte_timeout, idle_timeout, total_timeout: seconds.
        max_body_bytes: request body limit, bytes.
        retry_attempts: total attempts, the first included.
        retry_statuses: upstream statuses that may be retried on another endpoint.
        retry_non_idempotent: retry non-idempotent methods too.
        backoff_base, backoff_cap: full-jitter backoff bounds, seconds.
        auth: ``required``, ``optional`` or ``none`` (API keys).
        rate_limit: default rate-limit policy name, or None.
        ident: stable identity across config reloads, ``"/v1/"`` or ``"api.example.com/v1/"``
            (host + prefix, unique per config): rate-limit counters are keyed by it, so they
            survive a reload that adds, removes or reorders other routes.
    """

    index: int
    prefix: str
    host: str | None
    methods: frozenset[str] | AnyMethodExcept
    connect_timeout: float
    first_byte_timeout: float
    idle_timeout: float
    total_timeout: float
    max_body_bytes: int
    retry_attempts: int = 1
    retry_statuses: frozenset[int] = frozenset()
    retry_non_idempotent: bool = False
    backoff_base: float = 0.025
    backoff_cap: float = 0.25
    auth: str = "none"
    rate_limit: str | None = None
    ident: str = ""


class RouteTable:
    """Match requests to routes.

    Args:
        routes: the config's routes, in config order.
        limits: gateway-wide limits; a route's own ``max_body_bytes`` overrides them.
    """

    __slots__ = ("_any_host", "_by_host", "routes")

    def __init__(self, routes: Sequence[RouteConfig], limits: LimitsConfig) -> None:
        compiled = [
            Route(
                index=i,
                prefix=r.prefix,
                host=r.host.lower() if r.host else None,
                methods=frozenset(m.upper() for m in r.methods) if r.methods else DEFAULT_METHODS,
                connect_timeout=r.timeouts.connect,
                first_byte_timeout=r.timeouts.first_byte,
                idle_timeout=r.timeouts.idle,
                total_timeout=r.timeouts.total,
                max_body_bytes=(
                    r.max_body_bytes if r.max_body_bytes is not None else limits.max_body_bytes
                ),
                retry_attempts=r.retry.attempts,
                retry_statuses=frozenset(r.retry.on_statuses),
                retry_non_idempotent=r.retry.non_idempotent,
                backoff_base=r.retry.backoff_base,
                backoff_cap=r.retry.backoff_cap,
                auth=r.auth,
                rate_limit=r.rate_limit,
                ident=(r.host.lower() if r.host else "") + r.prefix,
            )
            for i, r in enumerate(routes)
        ]
        self.routes = tuple(compiled)
        longest_first = sorted(compiled, key=lambda r: -len(r.prefix))
        self._any_host = tuple((r.prefix, r) for r in longest_first if r.host is None)
        self._by_host: dict[str, tuple[tuple[str, Route], ...]] = {}
        for host in {r.host for r in compiled if r.host is not None}:
            # a host-specific route beats a host-less one of equal prefix length
            merged = sorted(
                (r for r in compiled if r.host in (host, None)),
                key=lambda r: (-len(r.prefix), r.host is None),
            )
            self._by_host[host] = tuple((r.prefix, r) for r in merged)

    def match(self, host: str, path: str) -> Route | None:
        """Return the route for ``host`` and ``path``, or None (-> 404).

        Args:
            host: the request's host, any case, with or without ``:port``.
            path: the decoded request path, starting with ``/``.
        """
        table = self._any_host
        if self._by_host:
            name = host.rpartition(":")[0] if host.endswith("]") is False and ":" in host else host
            table = self._by_host.get(name.lower(), table)
        for prefix, route in table:
            if path.startswith(prefix):
                return route
        return None
