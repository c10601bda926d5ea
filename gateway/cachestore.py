"""Cache stores: L1 in this process, L2 in the Redis of the request's residency zone.

Residency invariant: an entry of zone Z is only ever written to and read from Z's Redis.
``ZoneCaches`` routes every L2 call by zone (an entry's own ``zone`` on writes, the request's
zone on reads); ``RedisCache`` is bound to one zone, refuses to write an entry of another
(``ValueError``) and treats a stored entry of another zone as a miss (it can only be there
if two zones' configs point at one Redis). Keys from ``gateway.cachekey`` start with the
zone too, so the checks here are the second and third lines of defence, not the only one.

* ``CacheEntry``: one stored answer (status, headers, body) plus what purge and the
  residency checks need (zone, route, tenant) and policy metadata (``meta``, JSON-able).
* ``encode_entry`` / ``decode_entry``: the versioned byte format kept in Redis. Anything
  that does not decode (other version, truncated, garbage) is a miss, never an exception.
* ``MemoryCache`` (L1): bounded in bytes, least recently used evicted first, expired
  entries dropped before live ones. Synchronous: no read-modify-write spans an ``await``.
  With no Redis configured it is the whole cache (the embedded default).
* ``RedisCache`` (L2): one zone's Redis. Raises redis-py's errors; ``ZoneCaches`` guards it.
* ``ZoneCaches``: the facade the cache stage uses: L1 first, then the zone's L2 under a time
  budget and a ``Breaker`` per zone, as ``gateway.ratelimit_store.ResilientStore`` does for
  rate limits. No lookup or store raises because of Redis or waits past its budget.

Times in entries are **wall-clock epoch seconds** (``time.time()``), as in
``gateway.httpcache``: an entry written by one gateway is read by others, and its RFC 9111
age arithmetic compares with the origin's ``Date``. The breakers run on the monotonic clock.

Redis layout (``{p}`` = prefix + zone, e.g. ``geogate:cache:eu``); every command and script
touches one key, so each call also works on Redis Cluster:

* ``{p}:k:{key}`` a hash per primary key: ``d:{variant}`` the encoded entry, ``i:{variant}``
  its index record, JSON ``[expires_ms, route, tenant]``. The put script writes both, drops
  expired variants, keeps at most ``max_variants`` (those expiring soonest go first) and sets
  the hash's PEXPIRE to its last variant's expiry. A lookup is one HGET, ``variants`` one
  HGETALL.
* ``{p}:r:{route}`` and ``{p}:t:{tenant}`` sorted sets, primary key -> expiry (Unix ms):
  which hashes may hold entries of a route / tenant. ``{p}:routes`` sorted set, route ->
  expiry: the routes with entries (a bounded set: the configured routes). Each put adds to
  them (ZADD GT), prunes members whose expiry passed, and extends their TTL to the latest
  member's (PEXPIRE NX, then GT: Redis >= 7.0). So every index is bounded by the live
  entries it lists and goes away with them. A purge deletes entries but leaves index
  members; a member whose hash no longer matches costs one no-op script call at the next
  purge and is pruned when it expires.
* Purge runs ``PURGE_SCRIPT`` on each candidate hash (candidates from the index that narrows
  most: the key itself, the tenant's set, the matching routes' sets; SCAN of the zone's keys
  only for a zone-wide purge), atomically, reading only the index records (never bodies).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from heapq import heapify, heappop, heappush
from typing import Any, TypeVar

import orjson
from redis.asyncio import Redis

from gateway.breaker import Breaker
from gateway.callguard import CallGuard, guarded_redis
from gateway.clock import Clock, LoopClock

__all__ = [
    "CLOSE_TIMEOUT",
    "ENTRY_FORMAT_VERSION",
    "ENTRY_MAGIC",
    "ENTRY_OVERHEAD",
    "PURGE_SCRIPT",
    "PUT_SCRIPT",
    "CacheEntry",
    "MemoryCache",
    "PurgeIncomplete",
    "RedisCache",
    "ZoneCaches",
    "decode_entry",
    "encode_entry",
]

log = logging.getLogger("geogate.cache")

ENTRY_FORMAT_VERSION = 1
"""Version byte of ``encode_entry``'s format. Bump it when the layout or the JSON fields
change meaning: entries of another version are misses, so a rolling upgrade only costs hits."""
ENTRY_MAGIC = b"GGC"
"""First bytes of every encoded entry."""
ENTRY_OVERHEAD = 128
"""Bytes ``CacheEntry.size()`` adds per entry for bookkeeping (L1 objects, Redis fields)."""
CLOSE_TIMEOUT = 1.0
"""Seconds ``ZoneCaches.close()`` waits for each Redis (a hung one must not stall shutdown)."""

_HEADER = struct.Struct(">3sBI")  # magic, version, JSON length (bytes); then JSON, then body
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheEntry:
    """One stored answer (keyword arguments only).

    Args:
        key: the primary key (32 hex digits from ``gateway.cachekey``).
        variant: the secondary (Vary) key, ``""`` when the response varies on nothing.
        zone: the residency zone it was stored for; only that zone's Redis ever holds it.
        route: the matched route's prefix, e.g. ``"/v1/"`` (purge by route prefix).
        tenant: the tenant that stored it, or None (purge by tenant).
        status: the response status.
        headers: stored header fields as ``(name, value)`` pairs.
        body: the body, raw bytes.
        meta: policy metadata, JSON-able (orjson: str keys, no NaN tricks), e.g. the init
            fields of ``httpcache.StoredResponse``; treat it as read-only.
        stored_at: epoch seconds it was stored.
        expires_at: epoch seconds after which it is gone, staleness windows included
            (stale-while-revalidate, stale-if-error). It is live while ``now < expires_at``.

    Raises:
        TypeError: ``meta`` is not JSON-able (a caller bug, found at construction).
    """

    key: str
    variant: str
    zone: str
    route: str
    tenant: str | None
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)
    stored_at: float
    expires_at: float
    _size: int = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        meta = orjson.dumps(_plain(self.meta))  # orjson.JSONEncodeError is a TypeError
        strings = len(self.key) + len(self.variant) + len(self.zone) + len(self.route)
        strings += len(self.tenant or "")
        headers = sum(len(name) + len(value) for name, value in self.headers)
        object.__setattr__(
            self, "_size", len(self.body) + headers + len(meta) + strings + ENTRY_OVERHEAD
        )

    def size(self) -> int:
        """Bytes the entry costs: body + header names and values + ``meta`` as JSON + its
        identifying strings + ``ENTRY_OVERHEAD``. Header characters count as bytes (field
        values are ASCII or Latin-1). What ``max_bytes`` and ``max_entry_bytes`` bound."""
        return self._size

    def is_live(self, now: float) -> bool:
        """Is the entry still kept at ``now`` (epoch seconds)?"""
        return now < self.expires_at


def _plain(meta: Mapping[str, Any]) -> dict[str, Any]:
    return meta if isinstance(meta, dict) else dict(meta)


def encode_entry(entry: CacheEntry) -> bytes:
    """The stored form of ``entry``: ``b"GGC"``, the version byte, the JSON length (4 bytes,
    big-endian), the JSON (every field but the body, orjson), then the body as is.

    Returns:
        The bytes; about ``entry.size()`` long.
    """
    doc = {
        "k": entry.key,
        "v": entry.variant,
        "z": entry.zone,
        "r": entry.route,
        "t": entry.tenant,
        "s": entry.status,
        "h": entry.headers,
        "m": _plain(entry.meta),
        "sa": entry.stored_at,
        "ea": entry.expires_at,
        "bl": len(entry.body),
    }
    js = orjson.dumps(doc)
    return b"".join((_HEADER.pack(ENTRY_MAGIC, ENTRY_FORMAT_VERSION, len(js)), js, entry.body))


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_time(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def decode_entry(data: bytes | bytearray) -> CacheEntry | None:
    """Parse ``encode_entry``'s bytes.

    Returns:
        The entry, or None when ``data`` is not a whole, valid entry of
        ``ENTRY_FORMAT_VERSION``: another version, another magic, truncated, trailing bytes,
        bad JSON, a field of the wrong type. Callers treat None as a miss; this function
        never raises.
    """
    try:
        if len(data) < _HEADER.size:
            return None
        magic, version, js_len = _HEADER.unpack_from(data)
        start = _HEADER.size + js_len
        if magic != ENTRY_MAGIC or version != ENTRY_FORMAT_VERSION or start > len(data):
            return None
        doc = orjson.loads(data[_HEADER.size : start])
        body = bytes(data[start:])
        if not isinstance(doc, dict) or doc.get("bl") != len(body):
            return None
        headers = doc["h"]
        status, meta, tenant = doc["s"], doc["m"], doc["t"]
        if not (
            all(_is_str(doc[f]) for f in ("k", "v", "z", "r"))
            and (tenant is None or _is_str(tenant))
            and isinstance(status, int)
            and not isinstance(status, bool)
            and isinstance(meta, dict)
            and _is_time(doc["sa"])
            and _is_time(doc["ea"])
            and isinstance(headers, list)
            and all(
                isinstance(h, list) and len(h) == 2 and _is_str(h[0]) and _is_str(h[1])
                for h in headers
            )
        ):
            return None
        return CacheEntry(
            key=doc["k"],
            variant=doc["v"],
            zone=doc["z"],
            route=doc["r"],
            tenant=tenant,
            status=status,
            headers=tuple((n, v) for n, v in headers),
            body=body,
            meta=meta,
            stored_at=float(doc["sa"]),
            expires_at=float(doc["ea"]),
        )
    except Exception:  # struct.error, orjson.JSONDecodeError, KeyError, TypeError...
        return None


def _check_filters(
    key: str | None, route_prefix: str | None, tenant: str | None, zone: str | None
) -> None:
    if key is None and route_prefix is None and tenant is None and zone is None:
        raise ValueError("purge needs key, route_prefix, tenant or zone (or call clear())")


def _matches(
    entry: CacheEntry,
    key: str | None,
    route_prefix: str | None,
    tenant: str | None,
    zone: str | None,
) -> bool:
    return (
        (key is None or entry.key == key)
        and (route_prefix is None or entry.route.startswith(route_prefix))
        and (tenant is None or entry.tenant == tenant)
        and (zone is None or entry.zone == zone)
    )


_Slot = tuple[str, str, str]  # (zone, key, variant)


class MemoryCache:
    """L1: entries in this process, bounded in bytes, least recently used evicted first.

    One L1 serves every zone of the process: entries are held per (zone, key, variant), so
    two zones never displace each other's entries even under one key, and the ``zone``
    argument of the lookups makes an entry of another zone a miss.

    Every method is synchronous (no read-modify-write spans an ``await``). Expired entries
    are dropped as soon as any method runs after their ``expires_at`` (a heap of expiries,
    O(log n) each), so they never push out live ones and ``stored_bytes`` counts live
    entries (as of the last call).

    Args:
        max_bytes: bound on the sum of ``CacheEntry.size()`` held, bytes.
        max_entry_bytes: larger entries are refused, bytes (<= ``max_bytes``).
        clock: epoch seconds (``time.time``); tests inject one.

    Raises:
        ValueError: ``max_entry_bytes`` not in (0, ``max_bytes``].
    """

    __slots__ = (
        "_by_key",
        "_clock",
        "_entries",
        "_expiry",
        "_seq",
        "_stored_bytes",
        "evictions_total",
        "hits_total",
        "max_bytes",
        "max_entry_bytes",
        "misses_total",
    )

    def __init__(
        self,
        *,
        max_bytes: int,
        max_entry_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < max_entry_bytes <= max_bytes:
            raise ValueError(
                f"max_entry_bytes must be in (0, max_bytes={max_bytes}], not {max_entry_bytes}"
            )
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self._clock = clock
        self._entries: OrderedDict[_Slot, tuple[CacheEntry, int]] = OrderedDict()  # LRU first
        self._by_key: dict[str, set[_Slot]] = {}  # key -> its slots held, any zone
        self._expiry: list[tuple[float, int, _Slot, CacheEntry]] = []  # heap, lazy deletes
        self._seq = 0
        self._stored_bytes = 0
        self.hits_total = 0
        """``get`` / ``variants`` calls that found something (a counter)."""
        self.misses_total = 0
        """``get`` / ``variants`` calls that found nothing (a counter)."""
        self.evictions_total = 0
        """Live entries dropped to make room (a counter; expiries are not counted)."""

    @property
    def stored_bytes(self) -> int:
        """Sum of ``size()`` of the entries held, bytes."""
        return self._stored_bytes

    @property
    def entries(self) -> int:
        """Entries held."""
        return len(self._entries)

    def get(self, key: str, variant: str = "", *, zone: str | None = None) -> CacheEntry | None:
        """The live entry stored under ``key`` and ``variant``, marked most recently used.

        Args:
            key: primary key.
            variant: secondary key, ``""`` for none.
            zone: the entry's zone; None for any zone (the most recently stored one).

        Returns:
            The entry, or None (absent, expired, or only of another zone).
        """
        self._expire(self._clock())
        if zone is not None:
            slot: _Slot | None = (zone, key, variant)
        else:
            slots = [s for s in self._by_key.get(key, ()) if s[2] == variant]
            slot = max(slots, key=lambda s: self._entries[s][0].stored_at, default=None)
        held = self._entries.get(slot) if slot is not None else None
        if held is None or slot is None:
            self.misses_total += 1
            return None
        self._entries.move_to_end(slot)
        self.hits_total += 1
        return held[0]

    def variants(self, key: str, *, zone: str | None = None) -> list[CacheEntry]:
        """Every live entry under primary key ``key`` (for Vary matching), each marked used.

        Args:
            key: primary key.
            zone: when given, entries of other zones are left out.

        Returns:
            The entries, most recently stored first; empty when there are none.
        """
        self._expire(self._clock())
        found = []
        for slot in self._by_key.get(key, ()):
            if zone is None or slot[0] == zone:
                self._entries.move_to_end(slot)
                found.append(self._entries[slot][0])
        if found:
            self.hits_total += 1
        else:
            self.misses_total += 1
        found.sort(key=lambda e: e.stored_at, reverse=True)
        return found

    def put(self, entry: CacheEntry) -> bool:
        """Store ``entry``, replacing the one of the same zone, key and variant.

        Least recently used entries are evicted until it fits.

        Returns:
            True if stored; False if larger than ``max_entry_bytes`` or already expired,
            and then nothing changes (as in ``RedisCache.put``: the entry it would have
            replaced stays until it expires; ``delete`` it to drop it).
        """
        now = self._clock()
        self._expire(now)
        size = entry.size()
        if size > self.max_entry_bytes or not entry.is_live(now):
            return False
        slot = (entry.zone, entry.key, entry.variant)
        if slot in self._entries:
            self._remove(slot)
        while self._stored_bytes + size > self.max_bytes:
            self._remove(next(iter(self._entries)))
            self.evictions_total += 1
        self._entries[slot] = (entry, size)
        self._by_key.setdefault(entry.key, set()).add(slot)
        self._stored_bytes += size
        self._seq += 1
        heappush(self._expiry, (entry.expires_at, self._seq, slot, entry))
        if len(self._expiry) > 2 * len(self._entries) + 64:  # replaced entries pile up
            entries = self._entries
            self._expiry = [i for i in self._expiry if entries.get(i[2], (None,))[0] is i[3]]
            heapify(self._expiry)
        return True

    def delete(self, key: str, variant: str | None = None, *, zone: str | None = None) -> int:
        """Drop ``key``'s entries for ``variant`` (every variant when None), of ``zone``
        (every zone when None).

        Returns:
            Live entries removed.
        """
        self._expire(self._clock())
        doomed = [
            s
            for s in self._by_key.get(key, ())
            if (variant is None or s[2] == variant) and (zone is None or s[0] == zone)
        ]
        for slot in doomed:
            self._remove(slot)
        return len(doomed)

    def purge(
        self,
        *,
        key: str | None = None,
        route_prefix: str | None = None,
        tenant: str | None = None,
        zone: str | None = None,
    ) -> int:
        """Drop every entry matching all the filters given.

        O(entries) unless ``key`` is given (admin use, not per request).

        Args:
            key: primary key (all its variants).
            route_prefix: a string prefix of the entry's ``route`` (``"/v1/"`` matches
                routes ``"/v1/"`` and ``"/v1/chat/"``).
            tenant: the entry's tenant.
            zone: the entry's zone.

        Returns:
            Live entries removed.

        Raises:
            ValueError: no filter given (use ``clear()`` to drop everything).
        """
        _check_filters(key, route_prefix, tenant, zone)
        self._expire(self._clock())
        slots = list(self._by_key.get(key, ()) if key is not None else self._entries)
        doomed = [
            s for s in slots if _matches(self._entries[s][0], key, route_prefix, tenant, zone)
        ]
        for slot in doomed:
            self._remove(slot)
        return len(doomed)

    def clear(self) -> int:
        """Drop every entry.

        Returns:
            Entries removed (expired ones not yet dropped included).
        """
        count = len(self._entries)
        self._entries.clear()
        self._by_key.clear()
        self._expiry.clear()
        self._stored_bytes = 0
        return count

    def snapshot(self) -> dict[str, object]:
        """JSON-ready state: ``{"entries", "stored_bytes", "max_bytes", "hits_total",
        "misses_total", "evictions_total"}`` (bytes in bytes)."""
        self._expire(self._clock())
        return {
            "entries": len(self._entries),
            "stored_bytes": self._stored_bytes,
            "max_bytes": self.max_bytes,
            "hits_total": self.hits_total,
            "misses_total": self.misses_total,
            "evictions_total": self.evictions_total,
        }

    def _remove(self, slot: _Slot) -> None:
        _, size = self._entries.pop(slot)
        self._stored_bytes -= size
        slots = self._by_key[slot[1]]
        slots.discard(slot)
        if not slots:
            del self._by_key[slot[1]]

    def _expire(self, now: float) -> None:
        heap, entries = self._expiry, self._entries
        while heap and heap[0][0] <= now:
            _, _, slot, entry = heappop(heap)
            held = entries.get(slot)
            if held is not None and held[0] is entry:  # not replaced or removed since
                self._remove(slot)

    def __repr__(self) -> str:
        return (
            f"<MemoryCache entries={len(self._entries)} "
            f"bytes={self._stored_bytes}/{self.max_bytes} hits={self.hits_total} "
            f"misses={self.misses_total} evictions={self.evictions_total}>"
        )


PUT_SCRIPT = """
-- Store one variant in a primary key's hash (module docstring, "Redis layout").
-- KEYS[1] the hash. ARGV[1] variant, ARGV[2] encoded entry, ARGV[3] index record JSON
-- [expires_ms, route, tenant], ARGV[4] now (Unix ms, the gateway's clock, as the expiries),
-- ARGV[5] variants kept at most. Drops expired and surplus variants; PEXPIREs the hash at
-- its last variant's expiry. Reply: variants held.
local key, variant = KEYS[1], ARGV[1]
local now, max_variants = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('HSET', key, 'd:' .. variant, ARGV[2], 'i:' .. variant, ARGV[3])
local others, latest = {}, tonumber(cjson.decode(ARGV[3])[1])
for _, name in ipairs(redis.call('HKEYS', key)) do
  if string.sub(name, 1, 2) == 'i:' then
    local v = string.sub(name, 3)
    local ok, info = pcall(cjson.decode, redis.call('HGET', key, name))
    local expires = ok and type(info) == 'table' and tonumber(info[1]) or nil
    if expires == nil or expires <= now then
      redis.call('HDEL', key, name, 'd:' .. v)
    elseif v ~= variant then
      others[#others + 1] = {expires, v}
    end
  end
end
local surplus = #others + 1 - max_variants
if surplus > 0 then
  table.sort(others, function(a, b) return a[1] < b[1] end)
  for i = 1, surplus do
    redis.call('HDEL', key, 'i:' .. others[i][2], 'd:' .. others[i][2])
  end
end
for i = math.max(surplus, 0) + 1, #others do
  if others[i][1] > latest then latest = others[i][1] end
end
redis.call('PEXPIRE', key, string.format('%d', math.max(1, latest - now)))
return #others - math.max(surplus, 0) + 1
"""
"""The Lua script ``RedisCache.put`` runs on the primary key's hash (EVALSHA)."""

PURGE_SCRIPT = """
-- Delete the variants of one primary key's hash that match a purge (module docstring).
-- KEYS[1] the hash. ARGV[1] now (Unix ms), ARGV[2] route prefix ('' matches every route),
-- ARGV[3] '1' to match a tenant, ARGV[4] that tenant. Reads only the index records.
-- Reply: live variants deleted (unreadable records are deleted and not counted).
local key, now, prefix = KEYS[1], tonumber(ARGV[1]), ARGV[2]
local by_tenant, tenant = ARGV[3] == '1', ARGV[4]
local removed = 0
for _, name in ipairs(redis.call('HKEYS', key)) do
  if string.sub(name, 1, 2) == 'i:' then
    local data = 'd:' .. string.sub(name, 3)
    local ok, info = pcall(cjson.decode, redis.call('HGET', key, name))
    if not ok or type(info) ~= 'table' or type(info[2]) ~= 'string' then
      redis.call('HDEL', key, name, data)
    elseif string.sub(info[2], 1, #prefix) == prefix
        and (not by_tenant or (type(info[3]) == 'string' and info[3] == tenant)) then
      redis.call('HDEL', key, name, data)
      if (tonumber(info[1]) or 0) > now then removed = removed + 1 end
    end
  end
end
return removed
"""
"""The Lua script ``RedisCache.purge`` runs on each candidate hash (EVALSHA)."""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_GLOB = re.compile(r"([*?\[\]\\])")
_PURGE_BATCH = 200  # candidate hashes per pipeline


class RedisCache:
    """L2 for one zone: its entries in that zone's Redis (layout: module docstring).

    Build the client without retries (``from_url`` does) and with ``decode_responses``
    off: the time budget and breaker of ``ZoneCaches`` decide what happens on trouble.
    Errors are redis-py's (``redis.exceptions.RedisError``, ``OSError``), unmapped.

    Args:
        zone: the one zone whose entries this Redis holds.
        client: a ``redis.asyncio.Redis`` for that zone's Redis.
        prefix: prepended (with the zone) to every key.
        max_entry_bytes: larger entries are not stored (``CacheEntry.size()``), bytes.
        max_variants: variants kept per primary key; those expiring soonest make room.
        clock: epoch seconds (``time.time``): PX and the expiry check on reads use it.
        owns_client: ``close()`` closes ``client``.

    Raises:
        ValueError: ``client`` decodes responses; ``zone`` empty or holding ``":"``;
            ``max_entry_bytes`` or ``max_variants`` < 1.
    """

    __slots__ = (
        "_base",
        "_client",
        "_clock",
        "_owns_client",
        "_purge",
        "_put",
        "foreign_total",
        "max_entry_bytes",
        "max_variants",
        "zone",
    )

    def __init__(
        self,
        zone: str,
        client: Redis,
        *,
        prefix: str = "geogate:cache:",
        max_entry_bytes: int = 1024 * 1024,
        max_variants: int = 32,
        clock: Callable[[], float] = time.time,
        owns_client: bool = True,
    ) -> None:
        if not zone or ":" in zone:
            raise ValueError(f"zone must be a non-empty name without ':', not {zone!r}")
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("the cache's Redis client must not decode responses (bodies)")
        if max_entry_bytes < 1 or max_variants < 1:
            raise ValueError("max_entry_bytes and max_variants must be >= 1")
        self.zone = zone
        self._client = client
        self._base = f"{prefix}{zone}:"
        self.max_entry_bytes = max_entry_bytes
        self.max_variants = max_variants
        self._clock = clock
        self._owns_client = owns_client
        self._put = client.register_script(PUT_SCRIPT)
        self._purge = client.register_script(PURGE_SCRIPT)
        self.foreign_total = 0
        """Stored entries of another zone found and ignored (a counter; should stay 0:
        anything else means two zones' configs point at one Redis)."""

    @classmethod
    def from_url(
        cls,
        zone: str,
        url: str,
        *,
        prefix: str = "geogate:cache:",
        max_entry_bytes: int = 1024 * 1024,
        max_variants: int = 32,
        socket_timeout: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> RedisCache:
        """A cache on a new client for ``url`` (``redis://host:port/db``), which it owns.

        Args:
            zone, prefix, max_entry_bytes, max_variants, clock: as the constructor.
            url: redis-py URL syntax; it must be ``zone``'s Redis.
            socket_timeout: redis-py's connect and read timeouts, seconds: a backstop only,
                the per-call budget is ``ZoneCaches``' ``call_timeout``.
        """
        client = guarded_redis(url, socket_timeout=socket_timeout)
        return cls(
            zone,
            client,
            prefix=prefix,
            max_entry_bytes=max_entry_bytes,
            max_variants=max_variants,
            clock=clock,
            owns_client=True,
        )

    @property
    def client(self) -> Redis:
        """The redis-py client."""
        return self._client

    def entry_key(self, key: str) -> str:
        """The Redis hash holding primary key ``key``'s variants."""
        return f"{self._base}k:{key}"

    def route_index(self, route: str) -> str:
        """The sorted set of primary keys with entries of ``route``."""
        return f"{self._base}r:{route}"

    def tenant_index(self, tenant: str) -> str:
        """The sorted set of primary keys with entries of ``tenant``."""
        return f"{self._base}t:{tenant}"

    @property
    def routes_index(self) -> str:
        """The sorted set of routes with entries."""
        return f"{self._base}routes"

    def _accept(self, raw: bytes, key: str, variant: str | None, now: float) -> CacheEntry | None:
        entry = decode_entry(raw)
        if entry is None or not entry.is_live(now):
            return None
        if entry.zone != self.zone:  # the residency invariant: never serve it here
            self.foreign_total += 1
            if self.foreign_total == 1:  # a misconfiguration: say it once, count the rest
                log.error(
                    "cache: an entry of zone %r in zone %r's Redis; ignored (is one Redis "
                    "configured for two zones?) foreign_total counts further ones",
                    entry.zone,
                    self.zone,
                )
            return None
        if entry.key != key or (variant is not None and entry.variant != variant):
            return None
        return entry

    async def get(self, key: str, variant: str = "") -> CacheEntry | None:
        """One HGET.

        Returns:
            The live entry of this zone under ``key`` / ``variant``, or None (absent,
            expired, undecodable, or of another zone).

        Raises:
            redis.exceptions.RedisError, OSError: connection lost, timeout, Redis error.
        """
        raw = await self._client.hget(self.entry_key(key), f"d:{variant}")
        if not isinstance(raw, bytes):
            return None
        return self._accept(raw, key, variant, self._clock())

    async def variants(self, key: str) -> list[CacheEntry]:
        """One HGETALL.

        Returns:
            The live entries of this zone under ``key``, most recently stored first.

        Raises:
            redis.exceptions.RedisError, OSError: connection lost, timeout, Redis error.
        """
        fields = await self._client.hgetall(self.entry_key(key))
        now = self._clock()
        found = []
        for name, raw in fields.items():
            if isinstance(name, bytes) and isinstance(raw, bytes) and name.startswith(b"d:"):
                entry = self._accept(raw, key, name[2:].decode(errors="replace"), now)
                if entry is not None:
                    found.append(entry)
        found.sort(key=lambda e: e.stored_at, reverse=True)
        return found

    async def put(self, entry: CacheEntry) -> bool:
        """Store ``entry`` with a TTL of ``expires_at - now``, and index it for purges.

        One pipeline: the put script on the entry's hash, then the index updates.

        Returns:
            True if stored; False (nothing sent) if larger than ``max_entry_bytes`` or
            already expired.

        Raises:
            ValueError: ``entry.zone`` is not this cache's zone (the residency invariant;
                raised before any I/O).
            redis.exceptions.RedisError, OSError: connection lost, timeout, Redis error.
        """
        if entry.zone != self.zone:
            raise ValueError(
                f"residency: an entry of zone {entry.zone!r} must not be written to zone "
                f"{self.zone!r}'s Redis"
            )
        now_ms = math.floor(self._clock() * 1000)
        expires_ms = math.ceil(entry.expires_at * 1000)
        if entry.size() > self.max_entry_bytes or expires_ms <= now_ms:
            return False
        info = orjson.dumps([expires_ms, entry.route, entry.tenant])
        ttl_ms = expires_ms - now_ms
        async with self._client.pipeline(transaction=False) as pipe:
            await self._put(
                keys=[self.entry_key(entry.key)],
                args=[entry.variant, encode_entry(entry), info, now_ms, self.max_variants],
                client=pipe,
            )
            indexes = [(self.route_index(entry.route), entry.key)]
            indexes.append((self.routes_index, entry.route))
            if entry.tenant is not None:
                indexes.append((self.tenant_index(entry.tenant), entry.key))
            for index, member in indexes:
                pipe.zadd(index, {member: expires_ms}, gt=True)
                pipe.zremrangebyscore(index, "-inf", now_ms)
                pipe.pexpire(index, ttl_ms, nx=True)
                pipe.pexpire(index, ttl_ms, gt=True)
            await pipe.execute()
        return True

    async def purge(
        self,
        *,
        key: str | None = None,
        route_prefix: str | None = None,
        tenant: str | None = None,
        zone: str | None = None,
    ) -> int:
        """Delete every entry matching all the filters given (see ``MemoryCache.purge``).

        Candidates come from the narrowest index (module docstring); the match itself is
        ``PURGE_SCRIPT``, atomic per primary key, in pipelines of 200. Only a zone-wide
        purge (``zone`` alone) SCANs, and only this zone's keys. Work is proportional to the
        entries the index lists, never to bodies; for an admin call, not per request.

        Returns:
            Live entries deleted; 0 without I/O when ``zone`` is another zone.

        Raises:
            ValueError: no filter given.
            redis.exceptions.RedisError, OSError: connection lost, timeout, Redis error
                (entries deleted before it stay deleted).
        """
        _check_filters(key, route_prefix, tenant, zone)
        if zone is not None and zone != self.zone:
            return 0
        now_ms = math.floor(self._clock() * 1000)
        args: list[str | int] = [
            now_ms,
            route_prefix or "",
            "0" if tenant is None else "1",
            tenant or "",
        ]
        removed = 0
        batch: list[str] = []
        seen: set[str] = set()
        async for name in self._candidates(key, route_prefix, tenant, now_ms):
            if name in seen:
                continue
            seen.add(name)
            batch.append(name)
            if len(batch) >= _PURGE_BATCH:
                removed += await self._purge_batch(batch, args)
                batch = []
        if batch:
            removed += await self._purge_batch(batch, args)
        return removed

    async def _candidates(
        self, key: str | None, route_prefix: str | None, tenant: str | None, now_ms: int
    ) -> AsyncIterator[str]:
        if key is not None:
            yield self.entry_key(key)
            return
        client = self._client
        if tenant is not None:
            async for member, _ in client.zscan_iter(self.tenant_index(tenant), count=500):
                yield self.entry_key(_text(member))
            return
        if route_prefix is not None:
            routes = await client.zrangebyscore(self.routes_index, now_ms, "+inf")
            for route in map(_text, routes):
                if route.startswith(route_prefix):
                    index = self.route_index(route)
                    async for member, _ in client.zscan_iter(index, count=500):
                        yield self.entry_key(_text(member))
            return
        hashes = self._base + "k:"
        async for raw in client.scan_iter(match=_GLOB.sub(r"\\\1", self._base) + "*", count=500):
            name = _text(raw)
            if name.startswith(hashes):
                yield name
            else:  # an index: a zone-wide purge leaves nothing to index
                await client.unlink(name)

    async def _purge_batch(self, names: Iterable[str], args: list[str | int]) -> int:
        async with self._client.pipeline(transaction=False) as pipe:
            for name in names:
                await self._purge(keys=[name], args=args, client=pipe)
            replies = await pipe.execute()
        return sum(int(r) for r in replies)

    async def close(self) -> None:
        """Close the client's connections if this cache owns it."""
        if self._owns_client:
            await self._client.aclose()

    def __repr__(self) -> str:
        kwargs = self._client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        return f"<RedisCache zone={self.zone} {where}/{kwargs.get('db', 0)} base={self._base!r}>"


class PurgeIncomplete(Exception):
    """A purge could not reach some zone's Redis; entries there may remain (the admin API
    should answer 503 and say which zones).

    Args:
        removed: entries removed where the purge did run (L1 and the other zones).
        failed: zone -> why its Redis was not purged.
    """

    def __init__(self, removed: int, failed: Mapping[str, str]) -> None:
        self.removed = removed
        self.failed = dict(failed)
        super().__init__(
            f"purge incomplete: removed {removed}; not purged: "
            + ", ".join(f"{z} ({why})" for z, why in sorted(self.failed.items()))
        )


class _DegradedLog:
    """A zone's ``CallGuard.on_degraded``: one log line per transition, then the caller's
    ``on_degraded(zone, degraded)``."""

    __slots__ = ("breaker", "guards", "on_degraded", "zone")

    def __init__(
        self,
        zone: str,
        breaker: Breaker,
        guards: Mapping[str, CallGuard],
        on_degraded: Callable[[str, bool], None] | None,
    ) -> None:
        self.zone = zone
        self.breaker = breaker
        self.guards = guards
        self.on_degraded = on_degraded

    def __call__(self, degraded: bool) -> None:
        if degraded:
            log.warning(
                "cache: zone %s Redis unavailable (%s); L1 only, next try in %.1f s",
                self.zone,
                self.guards[self.zone].last_error,
                self.breaker.reopens_in() or 0.0,
            )
        else:
            log.info("cache: zone %s Redis answers again", self.zone)
        if self.on_degraded is not None:
            self.on_degraded(self.zone, degraded)


class ZoneCaches:
    """The cache the stage uses: L1 for every zone, plus each zone's own L2.

    Lookups try L1, then the request zone's L2 (if it has one); an L2 hit is promoted into
    L1. Each L2 call goes through that zone's ``gateway.callguard.CallGuard`` (a time budget
    and a ``Breaker``; its module docstring has the rules and why a late call is not
    cancelled): Redis trouble (error, no answer within ``call_timeout``, breaker open) is a
    miss for reads and a skipped write for puts, never an exception and never a wait past the
    budget. ``CancelledError`` always propagates. A zone's degraded mode (its breaker not
    CLOSED) is logged once on entering and once on leaving (``geogate.cache``).

    Vary lookups: ``variants(zone, key)`` returns L1's variants if L1 has any, else L2's; a
    request whose secondary key is not among them should then ``get(zone, key, variant)``,
    which asks L2 for that one variant (another gateway may have stored it).

    Usage::

        caches = ZoneCaches(MemoryCache(max_bytes=256 * MIB, max_entry_bytes=MIB),
                            {"eu": RedisCache.from_url("eu", "redis://eu-cache:6379/0")})
        entry = await caches.get(ex.zone.name, key, variant)
        caches.put_l1(entry); ex.defer(caches.put_l2(entry))   # L2 write off the hot path

    Args:
        l1: the in-process cache (all zones share it; reads check the zone).
        l2: zone -> that zone's ``RedisCache``; zones without one use L1 only.
        call_timeout: seconds per L2 get/variants/put (connect included).
        hang_timeout: seconds after which a late L2 call is cancelled and counted as a
            breaker failure.
        purge_timeout: seconds a purge may take per zone's Redis.
        breakers: zone -> its breaker; zones left out get ``Breaker(fail_max=3,
            reset_timeout=5.0)`` on ``clock``.
        clock: monotonic clock of the default breakers (``LoopClock``).
        on_degraded: called ``(zone, True)`` when a zone's L2 breaker leaves CLOSED and
            ``(zone, False)`` when it closes again (for a gauge); must not raise.

    Raises:
        ValueError: an ``l2`` cache is filed under another zone than its own (that would
            break residency), or a timeout is not > 0.
    """

    __slots__ = ("_guards", "_l1", "_l2", "call_timeout", "hang_timeout", "purge_timeout")

    def __init__(
        self,
        l1: MemoryCache,
        l2: Mapping[str, RedisCache] | None = None,
        *,
        call_timeout: float = 0.05,
        hang_timeout: float = 0.5,
        purge_timeout: float = 5.0,
        breakers: Mapping[str, Breaker] | None = None,
        clock: Clock | None = None,
        on_degraded: Callable[[str, bool], None] | None = None,
    ) -> None:
        for name, value in (
            ("call_timeout", call_timeout),
            ("hang_timeout", hang_timeout),
            ("purge_timeout", purge_timeout),
        ):
            if not 0 < value < math.inf:
                raise ValueError(f"{name} must be > 0 seconds, not {value}")
        self._l1 = l1
        self.call_timeout = call_timeout
        self.hang_timeout = hang_timeout
        self.purge_timeout = purge_timeout
        breakers = breakers or {}
        clock = clock or LoopClock()
        self._l2: dict[str, RedisCache] = {}
        self._guards: dict[str, CallGuard] = {}
        for zone, cache in (l2 or {}).items():
            if cache.zone != zone:
                raise ValueError(
                    f"residency: the L2 configured for zone {zone!r} is zone {cache.zone!r}'s"
                )
            breaker = breakers.get(zone) or Breaker(
                f"cache-l2 {zone}", fail_max=3, reset_timeout=5.0, clock=clock
            )
            self._l2[zone] = cache
            self._guards[zone] = CallGuard(
                f"cache-l2 {zone}",
                breaker,
                call_timeout=call_timeout,
                hang_timeout=hang_timeout,
                on_degraded=_DegradedLog(zone, breaker, self._guards, on_degraded),
            )

    @property
    def l1(self) -> MemoryCache:
        """The in-process cache."""
        return self._l1

    @property
    def zones(self) -> tuple[str, ...]:
        """Zones with an L2."""
        return tuple(self._guards)

    def l2(self, zone: str) -> RedisCache | None:
        """``zone``'s L2, or None."""
        return self._l2.get(zone)

    def breaker(self, zone: str) -> Breaker | None:
        """The breaker around ``zone``'s L2, or None."""
        guard = self._guards.get(zone)
        return guard.breaker if guard is not None else None

    async def get(self, zone: str, key: str, variant: str = "") -> CacheEntry | None:
        """The live entry of ``zone`` under ``key`` / ``variant``: L1, else ``zone``'s L2.

        Returns:
            The entry, or None: a miss, or ``zone``'s L2 in trouble (within
            ``call_timeout``).
        """
        entry = self._l1.get(key, variant, zone=zone)
        if entry is not None:
            return entry
        guard = self._guards.get(zone)
        if guard is None:
            return None
        cache = self._l2[zone]
        entry = await guard.call(lambda: cache.get(key, variant), None)
        if entry is None or entry.zone != zone:
            return None
        self._l1.put(entry)
        return entry

    async def variants(self, zone: str, key: str) -> list[CacheEntry]:
        """Live entries of ``zone`` under primary key ``key``: L1's, else its L2's.

        Returns:
            The entries (most recently stored first); empty on a miss or L2 trouble.
        """
        found = self._l1.variants(key, zone=zone)
        if found:
            return found
        guard = self._guards.get(zone)
        if guard is None:
            return []
        cache = self._l2[zone]
        empty: list[CacheEntry] = []
        found = await guard.call(lambda: cache.variants(key), empty)
        found = [e for e in found if e.zone == zone]
        for entry in found:
            self._l1.put(entry)
        return found

    def put_l1(self, entry: CacheEntry) -> bool:
        """Store ``entry`` in L1 (synchronous: the stage can do it before answering).

        Returns:
            ``MemoryCache.put``'s answer.
        """
        return self._l1.put(entry)

    async def put_l2(self, entry: CacheEntry) -> bool:
        """Store ``entry`` in its own zone's L2 only, within ``call_timeout``.

        Returns:
            True if Redis stored it in time; False for a zone without L2, an entry too large
            or expired, or Redis trouble (a late write may still land).
        """
        guard = self._guards.get(entry.zone)
        if guard is None:
            return False
        cache = self._l2[entry.zone]
        return await guard.call(lambda: cache.put(entry), False)

    async def put(self, entry: CacheEntry) -> None:
        """``put_l1`` then ``put_l2``."""
        self.put_l1(entry)
        await self.put_l2(entry)

    async def invalidate(self, zone: str, key: str) -> int:
        """Drop every variant of ``key`` in ``zone`` (RFC 9111 §4.4, after an unsafe method):
        from L1, and from ``zone``'s L2 within ``call_timeout`` and its breaker, like a
        lookup. For the request path: never raises for Redis trouble (the L2 copies then
        live until they expire); an admin purge wants ``purge``, which reports failures.

        Returns:
            Entries removed (L1 and L2 counted separately; 0 for an L2 in trouble).
        """
        removed = self._l1.purge(key=key, zone=zone)
        guard = self._guards.get(zone)
        if guard is not None:
            cache = self._l2[zone]
            removed += await guard.call(lambda: cache.purge(key=key), 0)
        return removed

    async def purge(
        self,
        *,
        key: str | None = None,
        route_prefix: str | None = None,
        tenant: str | None = None,
        zone: str | None = None,
    ) -> int:
        """Delete matching entries from L1 and every L2 (only ``zone``'s when given).

        Filters as ``MemoryCache.purge``; all the L2s are purged concurrently, each within
        ``purge_timeout``. The breakers are not consulted (an admin wants the attempt) and
        not fed (a purge says little about lookups).

        Returns:
            Entries removed, L1 and L2 counted separately (an entry in both counts twice).

        Raises:
            ValueError: no filter given.
            PurgeIncomplete: some zone's Redis failed or timed out; the others were purged.
        """
        _check_filters(key, route_prefix, tenant, zone)
        removed = self._l1.purge(key=key, route_prefix=route_prefix, tenant=tenant, zone=zone)
        caches = [c for z, c in self._l2.items() if zone is None or z == zone]

        async def one(cache: RedisCache) -> int | str:
            try:
                async with asyncio.timeout(self.purge_timeout):
                    return await cache.purge(
                        key=key, route_prefix=route_prefix, tenant=tenant, zone=zone
                    )
            except TimeoutError:
                return f"no answer within {self.purge_timeout:g} s"
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"

        failed: dict[str, str] = {}
        for cache, result in zip(caches, await asyncio.gather(*map(one, caches)), strict=True):
            if isinstance(result, str):
                failed[cache.zone] = result
            else:
                removed += result
        if failed:
            raise PurgeIncomplete(removed, failed)
        return removed

    async def settle(self) -> None:
        """Wait until every late L2 call has ended and been judged (tests, shutdown)."""
        for guard in self._guards.values():
            await guard.settle()

    async def close(self) -> None:
        """Cancel late L2 calls and close every L2 (each within ``CLOSE_TIMEOUT`` seconds;
        errors are logged, not raised)."""
        await asyncio.gather(*(guard.close() for guard in self._guards.values()))
        for cache in self._l2.values():
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await cache.close()
            except Exception:
                log.warning("cache: closing %r failed", cache, exc_info=True)

    def snapshot(self) -> dict[str, object]:
        """JSON-ready state for the admin API and metrics.

        Returns:
            ``{"l1": MemoryCache.snapshot(), "l2": {zone: {"degraded", "breaker",
            "calls_total", "errors_total", "refused_total", "foreign_total",
            "last_error"}}}``; ``l1["stored_bytes"]`` is the stored-bytes gauge.
        """
        return {
            "l1": self._l1.snapshot(),
            "l2": {
                zone: {**guard.snapshot(), "foreign_total": self._l2[zone].foreign_total}
                for zone, guard in self._guards.items()
            },
        }

    def __repr__(self) -> str:
        l2 = " ".join(f"{z}={'degraded' if g.degraded else 'ok'}" for z, g in self._guards.items())
        return f"<ZoneCaches l1={self._l1!r} l2=[{l2}]>"
