"""Config reload: version, what a reload may change, and retiring the replaced generation.

``GatewayServer.reload`` (SIGHUP, admin ``POST /reload``) loads and validates the whole new
file, refuses it when a setting that only a restart can apply changed, opens the GeoIP
database again, builds a complete new pipeline, and swaps it in with one assignment. This
module holds the pieces that decide and account, not the wiring:

* ``config_version`` names a config by content (12 hex digits of a SHA-256), as Envoy names
  its ``version_info`` and Prometheus exposes its config hash: two processes with the same
  version run the same settings.
* ``restart_required`` lists the changed keys that the running process cannot apply (the
  listening sockets, the HTTP parser limits of the listener, the upstream connection pool
  and resolver, the control Redis and the admin listener). Reload refuses those rather
  than apply half a config: the operator sees one clear error and the old config runs on.
* ``GenerationPipeline`` counts the requests running on one generation, so the objects only
  that generation uses (the previous GeoIP database, replaced caches, connections to removed
  endpoints) are released once its last request has finished, never under a request.

Rule: requests see one generation from start to end. Everything a request reads from the
config comes from the pipeline it started on; the server swaps its pipeline reference in one
synchronous step, after the new generation is complete.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from yarl import URL

from gateway.pipeline import Pipeline
from gateway.upstream_client import UpstreamClient

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.exchange import Exchange
    from gateway.http1 import Response, StreamResponse
    from gateway.pipeline import Forwarder, Stage
    from gateway.routing import RouteTable

__all__ = [
    "RESTART_ONLY",
    "GenerationPipeline",
    "ReloadResult",
    "close_idle_connections",
    "config_version",
    "restart_required",
]

log = logging.getLogger("geogate.reload")

# Dotted config keys a running process cannot change: the listener's sockets, TLS context and
# HTTP parser limits (fixed when the listener starts), worker count, the admin listener and its
# token (the admin app is built once), the upstream connection pool and DNS resolver (one
# ClientSession per process), the control Redis the rate-limit counters live in (the store
# is kept across reloads, so every tenant keeps its counters), and the access log's sinks,
# opened once at start with the zones of the gateway's own region (which line is written in
# full and which with the address truncated depends on them, so those zones and the region
# itself need a restart too). Keys a config version does not have are skipped.
RESTART_ONLY: tuple[str, ...] = (
    "gateway.region",
    "gateway.listen",
    "gateway.tls",
    "gateway.workers",
    "gateway.limits.max_request_line_bytes",
    "gateway.limits.max_header_bytes",
    "gateway.limits.max_headers",
    "admin.listen",
    "admin.token",
    "upstream.max_connections",
    "upstream.max_connections_per_endpoint",
    "upstream.keepalive_timeout",
    "upstream.dns_min_ttl",
    "upstream.dns_max_ttl",
    "upstream.nameservers",
    "redis.control",
    "redis.call_timeout",
    "redis.breaker_fail_max",
    "redis.breaker_reset_timeout",
    "access_log",
)
_SECRET_KEYS = frozenset({"admin.token"})
_MISSING = object()


def config_version(config: GatewayConfig) -> str:
    """Name a config by its content.

    The canonical form is the validated model as JSON with sorted keys (paths already resolved,
    defaults filled in), so formatting, comments, key order and spelled-out defaults do not
    change the version, and any setting does. The GeoIP database's content is not part of it
    (a reload re-reads the file all the same).

    Args:
        config: the validated config.

    Returns:
        The first 12 hex digits of the SHA-256 of the canonical form, e.g. ``"3f9a0c1b2d4e"``.
    """
    canonical = orjson.dumps(config.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:12]


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            return _MISSING
    return obj


def restart_required(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """The changes between ``old`` and ``new`` that only a restart can apply.

    Args:
        old: the running config.
        new: the validated candidate.

    Returns:
        One message per changed key of ``RESTART_ONLY``, e.g.
        ``"gateway.listen: changed from 127.0.0.1:8080 to 127.0.0.1:8081; needs a restart"``
        (secrets are not shown); empty when the reload may go ahead.
    """
    problems = []
    for key in RESTART_ONLY:
        before, after = _get(old, key), _get(new, key)
        if (before is _MISSING and after is _MISSING) or before == after:
            continue
        if key in _SECRET_KEYS:
            problems.append(f"{key}: changed; needs a restart")
        else:
            problems.append(
                f"{key}: changed from {_show(before)} to {_show(after)}; needs a restart"
            )
    own = new.gateway.region
    if own == old.gateway.region and own in old.regions and own in new.regions:
        before, after = old.regions[own].zones, new.regions[own].zones
        if before != after:
            problems.append(
                f"regions.{own}.zones: the zones of the gateway's own region changed from "
                f"{list(before)} to {list(after)}; needs a restart"
            )
    return problems


def _show(value: Any) -> str:
    host, port = getattr(value, "host", None), getattr(value, "port", None)
    if host is not None and port is not None:  # a Listen address
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "(unset)" if value is None or value is _MISSING else str(value)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """The outcome of one reload, as the admin API returns it.

    Attributes:
        ok: True when the new config runs now (also when it equals the old one).
        version: the config version running after the attempt (the old one on failure).
        error: None on success; else every reason, one per line (``file:key: reason``
            lines of a ConfigError, a restart-only key, an unreadable GeoIP database).
    """

    ok: bool
    version: str
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        """``{"ok": bool, "version": str, "error": str | None}`` (JSON-ready)."""
        return {"ok": self.ok, "version": self.version, "error": self.error}


class GenerationPipeline(Pipeline):
    """A Pipeline that counts the requests running on it.

    The server keeps one per config generation; when a reload replaces it, ``wait_idle``
    tells when the last request that started on it has finished (completion hooks included),
    so the objects only that generation holds can be released.

    Args:
        routes, stages, forwarder: as ``Pipeline``.
    """

    __slots__ = ("_idle", "in_flight")

    def __init__(self, routes: RouteTable, stages: Sequence[Stage], forwarder: Forwarder):
        super().__init__(routes, stages, forwarder)
        self.in_flight = 0
        self._idle: asyncio.Event | None = None

    async def run(self, ex: Exchange) -> Response | StreamResponse:
        """Take ``ex`` through the chain (``Pipeline.run``), counted.

        Raises:
            GatewayError: as ``Pipeline.run``.
        """
        self.in_flight += 1
        try:
            return await super().run(ex)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self._idle is not None:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no request is running on this pipeline (at once if none is)."""
        if self.in_flight == 0:
            return
        if self._idle is None:
            self._idle = asyncio.Event()
        self._idle.clear()
        while self.in_flight:
            await self._idle.wait()
            self._idle.clear()


def close_idle_connections(
    session: UpstreamClient | aiohttp.ClientSession | None, origins: Iterable[str]
) -> int:
    """Close the pooled keep-alive connections ``session`` holds to ``origins``.

    For endpoints a reload removed: without this their idle connections would stay open
    until ``upstream.keepalive_timeout``. Connections in use are not touched; they return to
    the pool when their request ends, so the server calls this again once the replaced
    generation is idle. aiohttp has no public per-host close, so this walks the connector's
    pool (``BaseConnector._conns``, aiohttp 3.x); if that attribute is gone it does nothing
    and keep-alive expiry closes them.

    Args:
        session: the forwarder's UpstreamClient (``UpstreamClient.close_idle``) or the
            probes' ClientSession; None does nothing.
        origins: ``scheme://host:port`` origins.

    Returns:
        The number of connections closed.
    """
    if session is None or session.closed:
        return 0
    if isinstance(session, UpstreamClient):
        return session.close_idle(origins)
    pool = getattr(session.connector, "_conns", None)
    if not isinstance(pool, dict):
        return 0
    targets = set()
    for origin in origins:
        url = URL(origin)
        targets.add((url.host, url.port, url.scheme == "https"))
    closed = 0
    for key in [k for k in pool if (k.host, k.port, k.is_ssl) in targets]:
        for proto, _ in pool.pop(key, ()):
            proto.close()
            closed += 1
    return closed
