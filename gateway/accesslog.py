"""Access log: one JSON line per request, written where the request's zone allows.

Residency rule of logs (DESIGN.md, "Residency invariant"): a line about a request of zone Z
goes to Z's own sink when ``access_log.zones`` names one. Otherwise it goes to the default
sink, and if the gateway's own region does not serve Z (``regions[gateway.region].zones``),
the line leaves Z's users unidentifiable: the client address is truncated (IPv4 to its /24,
IPv6 to its /48) and the tenant id replaced by ``"sha256:" + 16 hex digits`` of its SHA-256.
A request whose zone was never decided (a 401 before the locate stage, a 404) counts as
outside every zone: fail closed, as routing does.

Never in a line: bodies, the query string, API keys, Authorization or any other header.

Writing never blocks the event loop: ``AccessLog.log`` serialises the line with orjson and
puts the bytes on a ``queue.SimpleQueue``; a stdlib ``logging.handlers.QueueListener`` thread
per sink turns them into records and hands them to a ``StreamHandler`` (stdout, stderr) or a
``WatchedFileHandler`` (a file; it reopens the file when logrotate moves it away).
``close()`` enqueues the listener's sentinel after every accepted line and joins the thread,
so nothing accepted is lost at shutdown.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import logging.handlers
import queue
import sys
import time
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from gateway.config import AccessLogConfig
    from gateway.exchange import Exchange

__all__ = [
    "OFF",
    "STDERR",
    "STDOUT",
    "AccessLog",
    "access_record",
    "hash_tenant",
    "rfc3339",
    "truncate_address",
]

STDOUT, STDERR, OFF = "stdout", "stderr", "off"
_V4_KEEP = 0xFFFF_FF00  # /24
_V6_KEEP = ((1 << 48) - 1) << 80  # /48


def truncate_address(ip: IPv4Address | IPv6Address) -> str:
    """The client address with its host part zeroed, as written outside the client's zone.

    IPv4 keeps its /24, IPv6 its /48 (the usual end-site assignment); an IPv4-mapped IPv6
    address is truncated as the IPv4 address it carries.

    Args:
        ip: the client address.

    Returns:
        The network address as text, e.g. ``"203.0.113.0"`` or ``"2001:db8:1::"``.
    """
    if isinstance(ip, IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is None:
            return str(IPv6Address(int(ip) & _V6_KEEP))
        ip = mapped
    return str(IPv4Address(int(ip) & _V4_KEEP))


@functools.lru_cache(maxsize=4096)
def hash_tenant(tenant_id: str) -> str:
    """A stable pseudonym for a tenant id: ``"sha256:"`` + the first 16 hex digits.

    Args:
        tenant_id: the tenant's id from the config.

    Returns:
        e.g. ``"sha256:9f86d081884c7d65"``; the same id always gives the same pseudonym, so
        lines can still be grouped by tenant.
    """
    return "sha256:" + hashlib.sha256(tenant_id.encode()).hexdigest()[:16]


def rfc3339(epoch: float) -> str:
    """Format a Unix time as an RFC 3339 UTC timestamp with milliseconds.

    Args:
        epoch: seconds since the Unix epoch, >= 0.

    Returns:
        e.g. ``"2024-05-01T12:00:00.123Z"``.
    """
    seconds = int(epoch)
    millis = int((epoch - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def access_record(
    ex: Exchange, *, end: float, wall_start: float, pseudonymize: bool
) -> dict[str, Any]:
    """The fields of one access-log line (a dict ready for ``orjson.dumps``).

    Args:
        ex: the finished exchange.
        end: monotonic time the response was complete, seconds (``time.monotonic()``).
        wall_start: Unix time the request was received (seconds), for ``ts``.
        pseudonymize: truncate the client address and hash the tenant id.

    Returns:
        ``ts`` (RFC 3339 UTC, request received), ``request_id``, ``tenant``, ``zone``,
        ``region``, ``endpoint``, ``method``, ``route``, ``path`` (no query string),
        ``status``, ``bytes_in`` (request body: counted when streamed, else its
        Content-Length), ``bytes_out`` (response body bytes), ``total_ms``, ``upstream_ms``
        (the answering attempt, sent -> body end), ``first_byte_ms`` (received -> headers sent),
        ``cache``, ``ratelimit``, ``retries``, ``client``, ``country``, ``trace_id``. Times
        are milliseconds; a field that does not apply is None (JSON null).
    """
    request = ex.request
    start = ex.start
    ip = ex.client_ip
    client: str | None
    if ip is None:  # the locate stage did not run: the socket peer
        client = request.remote
        if pseudonymize and client is not None:
            try:
                client = truncate_address(ip_address(client))
            except ValueError:  # not an IP address (a Unix socket)
                client = None
    else:
        client = truncate_address(ip) if pseudonymize else str(ip)
    tenant = ex.tenant
    tenant_id = None if tenant is None else hash_tenant(tenant.id) if pseudonymize else tenant.id
    endpoint = ex.endpoint
    route = ex.route
    trace = ex.trace
    sent, done, headers_sent = ex.attempt_sent, ex.upstream_end, ex.headers_sent
    bytes_in = ex.bytes_in
    if bytes_in is None:
        bytes_in = request.content_length or 0
    return {
        "ts": rfc3339(wall_start),
        "request_id": ex.request_id,
        "tenant": tenant_id,
        "zone": ex.zone,
        "region": None if endpoint is None else endpoint.region,
        "endpoint": None if endpoint is None else endpoint.origin,
        "method": request.method,
        "route": None if route is None else route.prefix,
        "path": request.rel_url.raw_path,
        "status": ex.status,
        "bytes_in": bytes_in,
        "bytes_out": ex.bytes_out or 0,
        "total_ms": _ms(end - start),
        "upstream_ms": None if sent is None or done is None else _ms(done - sent),
        "first_byte_ms": None if headers_sent is None else _ms(headers_sent - start),
        "cache": ex.cache_result,
        "ratelimit": ex.ratelimit_result,
        "retries": max(0, ex.attempts - 1),
        "client": client,
        "country": ex.country,
        "trace_id": None if trace is None else trace.trace_id,
    }


class _LineListener(logging.handlers.QueueListener):
    """A QueueListener whose queue holds serialised lines (bytes), not LogRecords.

    The record is made in the listener's thread (``prepare``, the documented hook), so the
    event loop pays for a ``put`` only.
    """

    def prepare(self, record: Any) -> logging.LogRecord:
        return logging.makeLogRecord({"msg": record.decode()})


class _Sink:
    """One destination: a queue, its listener thread and one handler. Open in a thread."""

    __slots__ = ("handler", "listener", "queue", "target")

    def __init__(self, target: str) -> None:
        self.target = target
        handler: logging.Handler
        if target == STDOUT:
            handler = logging.StreamHandler(sys.stdout)
        elif target == STDERR:
            handler = logging.StreamHandler(sys.stderr)
        else:
            handler = logging.handlers.WatchedFileHandler(target, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.handler = handler
        self.queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.listener = _LineListener(self.queue, handler)
        self.listener.start()

    def close(self) -> None:
        """Write what is queued, stop the thread, close the file (blocking)."""
        self.listener.stop()
        self.handler.close()


class AccessLog:
    """The open access log: sinks by zone, a default sink, the pseudonymising rule.

    Usage::

        access_log = await AccessLog.open(config.access_log, own_zones={"us", "global"})
        if access_log is not None:
            access_log.log(ex, end=loop.time())      # once per request, after the response
        await access_log.close()                      # at shutdown: flushes every line

    Args:
        zone_sinks: zone -> its own sink (None: that zone's lines are dropped, "off").
        default: the sink for other zones' lines, or None ("off").
        own_zones: the zones the gateway's own region serves.
    """

    def __init__(
        self,
        *,
        zone_sinks: Mapping[str, _Sink | None],
        default: _Sink | None,
        own_zones: frozenset[str],
    ) -> None:
        self._zone_sinks = dict(zone_sinks)
        self._default = default
        self._own_zones = own_zones
        sinks = {id(s): s for s in (default, *zone_sinks.values()) if s is not None}
        self._sinks = list(sinks.values())

    @classmethod
    async def open(
        cls, config: AccessLogConfig, *, own_zones: frozenset[str] | set[str]
    ) -> AccessLog | None:
        """Open the configured sinks (files are opened in a worker thread).

        Args:
            config: the ``access_log`` section; file paths already absolute.
            own_zones: the zones ``regions[gateway.region]`` serves.

        Returns:
            The AccessLog, or None when it is disabled or every sink is ``off`` (then no
            line is ever formatted).

        Raises:
            OSError: a log file cannot be opened for appending (missing directory, rights).
        """
        if not config.enabled:
            return None
        targets = {config.default, *config.zones.values()} - {OFF}
        if not targets:
            return None
        opened: dict[str, _Sink] = {}
        try:
            for target in sorted(targets):
                opened[target] = await asyncio.to_thread(_Sink, target)
        except BaseException:
            await asyncio.to_thread(_close_all, list(opened.values()))
            raise
        return cls(
            zone_sinks={zone: opened.get(target) for zone, target in config.zones.items()},
            default=opened.get(config.default),
            own_zones=frozenset(own_zones),
        )

    def sink_for(self, zone: str | None) -> tuple[str | None, bool]:
        """Where a line about a request of ``zone`` goes, and whether it is pseudonymised.

        Args:
            zone: the request's residency zone, or None when it was never decided.

        Returns:
            ``(target, pseudonymize)``: target is ``"stdout"``, ``"stderr"``, a file path or
            None (dropped).
        """
        sink, pseudonymize = self._route(zone)
        return (None if sink is None else sink.target), pseudonymize

    def _route(self, zone: str | None) -> tuple[_Sink | None, bool]:
        if zone is not None and zone in self._zone_sinks:
            return self._zone_sinks[zone], False
        return self._default, zone not in self._own_zones

    def log(self, ex: Exchange, *, end: float) -> None:
        """Queue the line about ``ex`` for its sink; never blocks, never raises on I/O.

        Args:
            ex: the finished exchange.
            end: monotonic time the response was complete, seconds.
        """
        sink, pseudonymize = self._route(ex.zone)
        if sink is None:
            return
        wall_start = time.time() - (end - ex.start)
        record = access_record(ex, end=end, wall_start=wall_start, pseudonymize=pseudonymize)
        sink.queue.put(orjson.dumps(record))

    async def close(self) -> None:
        """Write every queued line, stop the listener threads and close the files."""
        sinks, self._sinks = self._sinks, []
        self._zone_sinks.clear()
        self._default = None
        await asyncio.to_thread(_close_all, sinks)

    def __repr__(self) -> str:
        zones = {z: (s.target if s else OFF) for z, s in self._zone_sinks.items()}
        default = self._default.target if self._default else OFF
        return f"<AccessLog default={default} zones={zones} own_zones={sorted(self._own_zones)}>"


def _close_all(sinks: list[_Sink]) -> None:
    for sink in sinks:
        sink.close()
