"""Rate-limit stores: where GCRA state and concurrency leases live, in process or in Redis.

Rule: the arithmetic is ``gateway.gcra``'s; this module keeps the state. ``MemoryStore``
decides without awaiting (a read-modify-write never spans an ``await``, httpcore PR #880);
``RedisStore`` runs the same arithmetic in one atomic Lua script per decision, on the Redis
server's clock (``TIME``), so N gateway processes share one limit exactly; ``ResilientStore``
puts a time budget and a ``Breaker`` around Redis and answers locally when Redis is in
trouble. No call on a ``ResilientStore`` raises because of Redis or waits past its budget.

* ``charge(key, cost, limit) -> Decision``: GCRA (requests per second with a burst, requests
  or LLM tokens per minute). A negative cost refunds: always allowed.
* ``acquire_slot(key, lease, capacity, ttl) -> SlotGrant`` / ``release_slot(key, lease)``:
  at most ``capacity`` live leases per key (requests in flight); a lease expires ``ttl``
  seconds after it was taken, so the slots of a gateway that crashed come back.

Redis layout (one key per script, so each call also works on Redis Cluster): ``{prefix}gcra:
{key}`` a string holding the TAT (seconds since ``REDIS_EPOCH``, ``%.17g`` so it round-trips
exactly), with a PEXPIRE at the TAT, after which it is a full bucket and can go: idle
tenants cost nothing. ``{prefix}slots:{key}`` a sorted set lease -> expiry (Unix ms), with a
PEXPIREAT at its last lease's expiry. Scripts go by EVALSHA; on NOSCRIPT (a restarted or
failed-over Redis) redis-py's ``AsyncScript`` loads the source and retries once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import heapq
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from redis.asyncio import Redis

from gateway.breaker import Breaker
from gateway.callguard import CallGuard, guarded_redis
from gateway.gcra import EPSILON, Decision, Limit, Source, gcra_update

if TYPE_CHECKING:
    from gateway.clock import Clock

__all__ = [
    "CLOSE_TIMEOUT",
    "GCRA_SCRIPT",
    "REDIS_EPOCH",
    "SLOT_SCRIPT",
    "MemoryStore",
    "RateLimitStore",
    "RedisStore",
    "ResilientStore",
    "SlotGrant",
    "TroubleMode",
    "TroublePolicy",
]

log = logging.getLogger("geogate.ratelimit")

REDIS_EPOCH = 1_700_000_000
"""Unix second the Redis store counts from (2023-11-14T22:13:20Z). Near 1.7e9 a double
resolves ~240 ns; counting from here it resolves ~15 ns for decades, well inside EPSILON."""

GCRA_SCRIPT = f"""
-- GCRA for one key: gateway/gcra.py gcra_update(), the same operations in the same order.
-- KEYS[1] the bucket. ARGV[1] rate (per s), ARGV[2] burst, ARGV[3] cost (negative refunds),
-- ARGV[4] force ("1": record the cost even if it does not fit, "0": no),
-- ARGV[5] (contract tests only) a fixed now in seconds instead of the server's TIME; the key
-- then gets no TTL, since a TTL against the server's clock would mean nothing.
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local force = ARGV[4] == '1'
local fixed = ARGV[5] ~= nil
local now
if fixed then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = (tonumber(t[1]) - {REDIS_EPOCH}) + tonumber(t[2]) / 1000000
end
local eps = {EPSILON!r}
local interval = 1 / rate
local tolerance = interval * burst
local tat = now
local raw = redis.call('GET', KEYS[1])
if raw then
  local v = tonumber(raw)
  if v >= now then tat = v end
end
local new_tat = tat + cost * interval
local retry_after = 0
local allowed
local stored
if cost < 0 then
  allowed = 1
  if new_tat < now then new_tat = now end
  stored = new_tat
elseif force then
  allowed = 1
  stored = new_tat
else
  local allow_at = new_tat - tolerance
  if allow_at - now > eps then
    allowed = 0
    stored = tat
    retry_after = allow_at - now
  else
    allowed = 1
    stored = new_tat
  end
end
local reset_after = stored - now
local remaining = math.floor((tolerance - reset_after + eps) / interval)
remaining = math.max(0, math.min(remaining, math.floor(burst)))
if allowed == 1 then
  if reset_after > 0 then
    local value = string.format('%.17g', stored)
    if fixed then
      redis.call('SET', KEYS[1], value)
    else
      redis.call('SET', KEYS[1], value, 'PX', string.format('%d', math.ceil(reset_after * 1000)))
    end
  else
    redis.call('DEL', KEYS[1])
  end
end
return {{allowed, remaining, string.format('%.17g', retry_after),
        string.format('%.17g', reset_after)}}
"""
"""The GCRA Lua script ``RedisStore.charge`` runs (EVALSHA). Reply: ``[allowed 0|1,
remaining, retry_after, reset_after]``, the floats as ``%.17g`` strings (a Lua number in a
reply is truncated to an integer)."""

SLOT_SCRIPT = """
-- Concurrency leases for one key: a sorted set lease -> expiry (Unix ms, server clock).
-- KEYS[1] the set. ARGV[1] lease, ARGV[2] capacity, ARGV[3] ttl (ms, integer >= 1).
-- Reply 1: held (new, or an existing lease refreshed); 0: capacity live leases are held.
local capacity = tonumber(ARGV[2])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= capacity then return 0 end
end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[3]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return 1
"""
"""The lease Lua script ``RedisStore.acquire_slot`` runs (EVALSHA)."""


@dataclass(frozen=True, slots=True)
class SlotGrant:
    """The answer to ``acquire_slot``; truthy when the slot is held.

    Args:
        acquired: the lease holds a slot; the caller owes one ``release_slot``.
        capacity: the capacity applied (scaled down when ``source`` is FALLBACK).
        source: who answered (``gateway.gcra.Source``).
    """

    acquired: bool
    capacity: int
    source: Source = Source.LOCAL

    def __bool__(self) -> bool:
        return self.acquired


class RateLimitStore(Protocol):
    """Where limits are counted. Every method is safe to call concurrently from one loop."""

    async def charge(self, key: str, cost: float, limit: Limit, *, force: bool = False) -> Decision:
        """Charge ``cost`` to ``key`` under ``limit`` (GCRA); a negative cost refunds;
        ``force`` records it even if it does not fit (``gateway.gcra.gcra_update``)."""
        ...

    async def acquire_slot(self, key: str, lease: str, capacity: int, ttl: float) -> SlotGrant:
        """Hold one of ``capacity`` slots of ``key`` as ``lease`` for at most ``ttl`` seconds."""
        ...

    async def release_slot(self, key: str, lease: str) -> None:
        """Give ``lease``'s slot back; a no-op for a lease not held (released, expired)."""
        ...

    async def close(self) -> None:
        """Release connections and state."""
        ...


def _check_cost(cost: float) -> float:
    cost = float(cost)
    if not math.isfinite(cost):
        raise ValueError(f"cost must be finite, not {cost}")
    return cost


def _check_slot(capacity: int, ttl: float) -> None:
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, not {capacity}")
    if not (0 < ttl < math.inf):
        raise ValueError(f"ttl must be > 0 seconds and finite, not {ttl}")


class MemoryStore:
    """The stores' semantics in this process: the store when no Redis is configured, and
    the fallback of a ``ResilientStore``.

    Every decision runs synchronously (``*_nowait``); the async methods only wrap them, so
    no read-modify-write spans an ``await``.

    Bounded memory: a key whose TAT is not in the future is a full bucket and is not kept.
    When a new key would make the table hold more than ``max_keys``, keys whose TAT has
    passed are dropped; if more than 3/4 of ``max_keys`` are still live, the live keys
    nearest to full (smallest TAT, the least debt forgotten) go too, and ``evictions_total``
    counts them; such a key starts again with a full bucket, so size ``max_keys`` well above
    the keys in use. A sweep is O(n) and comes at most once per ``max_keys / 4`` new keys.
    A lease pool goes when its last lease is released; when a new pool would pass
    ``max_keys``, pools whose leases have all expired go too. Live leases are never dropped,
    so that bound holds while fewer than ``max_keys`` pools have requests in flight.

    Args:
        clock: monotonic seconds (``LoopClock`` in production, ``ManualClock`` in tests).
        max_keys: bound on GCRA keys, and separately on keys with leases (>= 4).

    Raises:
        ValueError: ``max_keys`` below 4.
    """

    __slots__ = ("_clock", "_leases", "_max_keys", "_tats", "evictions_total")

    def __init__(self, *, clock: Clock, max_keys: int = 100_000) -> None:
        if max_keys < 4:
            raise ValueError(f"max_keys must be >= 4, not {max_keys}")
        self._clock = clock
        self._max_keys = max_keys
        self._tats: dict[str, float] = {}
        self._leases: dict[str, dict[str, float]] = {}  # key -> lease -> expiry (clock s)
        self.evictions_total = 0
        """Live GCRA keys dropped by the memory bound (a counter, for metrics)."""

    def charge_nowait(
        self, key: str, cost: float, limit: Limit, *, force: bool = False
    ) -> Decision:
        """``charge`` without awaiting: the decision and the state update happen together.

        Args:
            key: the bucket, e.g. ``"acme|/v1/chat|rps"``.
            cost: units (1 per request, N for N tokens); negative refunds (always allowed).
            limit: rate and burst.
            force: record a positive cost even if it does not fit (token reconciliation).

        Returns:
            The Decision, ``source`` LOCAL.

        Raises:
            ValueError: ``cost`` is NaN or infinite (a caller bug).
        """
        now = self._clock.now()
        tats = self._tats
        decision, tat = gcra_update(tats.get(key), now, cost, limit, force=force)
        if decision.allowed:
            if tat > now:
                if key not in tats and len(tats) >= self._max_keys:
                    self._sweep_tats(now)
                tats[key] = tat
            else:
                tats.pop(key, None)
        return decision

    def acquire_slot_nowait(self, key: str, lease: str, capacity: int, ttl: float) -> SlotGrant:
        """``acquire_slot`` without awaiting.

        Args:
            key: the slot pool, e.g. ``"acme|/v1/chat|concurrent"``.
            lease: unique per request (a request id); acquiring a held lease refreshes its
                expiry and does not take a second slot.
            capacity: live leases allowed (>= 0; 0 refuses everything).
            ttl: seconds until the lease expires unreleased (> 0).

        Returns:
            SlotGrant, ``source`` LOCAL.

        Raises:
            ValueError: ``capacity`` < 0 or ``ttl`` not > 0.
        """
        _check_slot(capacity, ttl)
        now = self._clock.now()
        leases = self._leases.get(key)
        if leases is None:
            if capacity < 1:
                return SlotGrant(False, capacity)
            if len(self._leases) >= self._max_keys:
                self._sweep_leases(now)
            leases = self._leases[key] = {}
        else:
            for held in [lease for lease, expiry in leases.items() if expiry <= now]:
                del leases[held]
        if lease in leases or len(leases) < capacity:
            leases[lease] = now + ttl
            return SlotGrant(True, capacity)
        return SlotGrant(False, capacity)

    def release_slot_nowait(self, key: str, lease: str) -> None:
        """``release_slot`` without awaiting; a no-op for a lease not held."""
        leases = self._leases.get(key)
        if leases is not None:
            leases.pop(lease, None)
            if not leases:
                del self._leases[key]

    async def charge(self, key: str, cost: float, limit: Limit, *, force: bool = False) -> Decision:
        """See ``charge_nowait``."""
        return self.charge_nowait(key, cost, limit, force=force)

    async def acquire_slot(self, key: str, lease: str, capacity: int, ttl: float) -> SlotGrant:
        """See ``acquire_slot_nowait``."""
        return self.acquire_slot_nowait(key, lease, capacity, ttl)

    async def release_slot(self, key: str, lease: str) -> None:
        """See ``release_slot_nowait``."""
        self.release_slot_nowait(key, lease)

    async def close(self) -> None:
        """Forget every key."""
        self._tats.clear()
        self._leases.clear()

    @property
    def key_count(self) -> int:
        """GCRA keys held (each one's TAT was in the future when written)."""
        return len(self._tats)

    def slots_held(self, key: str) -> int:
        """Leases of ``key`` not yet released or expired."""
        now = self._clock.now()
        return sum(expiry > now for expiry in self._leases.get(key, {}).values())

    def _sweep_tats(self, now: float) -> None:
        tats = self._tats
        for key in [key for key, tat in tats.items() if tat <= now]:
            del tats[key]
        excess = len(tats) - self._max_keys * 3 // 4
        if excess > 0:
            for key in heapq.nsmallest(excess, tats, key=tats.__getitem__):
                del tats[key]
            self.evictions_total += excess

    def _sweep_leases(self, now: float) -> None:
        for key, leases in list(self._leases.items()):
            if all(expiry <= now for expiry in leases.values()):
                del self._leases[key]

    def __repr__(self) -> str:
        return (
            f"<MemoryStore keys={len(self._tats)}/{self._max_keys} "
            f"slot_keys={len(self._leases)} evictions_total={self.evictions_total}>"
        )


class RedisStore:
    """The limits in Redis, shared by every gateway that points at it.

    One EVALSHA per ``charge`` / ``acquire_slot`` (atomic: Redis runs a script alone), one
    ZREM per ``release_slot``. Time is the Redis server's (``TIME``), so gateway clocks need
    not agree. Build the client without retries (``from_url`` does): the caller's time
    budget and breaker (``ResilientStore``) decide what happens on trouble, not redis-py's
    backoff. Errors are redis-py's (``redis.exceptions.RedisError``), unmapped.

    Args:
        client: a ``redis.asyncio.Redis``; any ``decode_responses`` setting.
        prefix: prepended to every key.
        owns_client: ``close()`` closes ``client`` (``aclose()``).
    """

    __slots__ = ("_client", "_gcra", "_owns_client", "_prefix", "_slot")

    def __init__(
        self, client: Redis, *, prefix: str = "geogate:rl:", owns_client: bool = True
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._owns_client = owns_client
        self._gcra = client.register_script(GCRA_SCRIPT)
        self._slot = client.register_script(SLOT_SCRIPT)

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "geogate:rl:", socket_timeout: float = 1.0
    ) -> RedisStore:
        """A store on a new client for ``url`` (``redis://host:port/db``), which it owns.

        Args:
            url: redis-py URL syntax.
            prefix: prepended to every key.
            socket_timeout: redis-py's connect and read timeouts, seconds: a backstop only,
                the per-call budget is ``ResilientStore.call_timeout``.
        """
        client = guarded_redis(url, socket_timeout=socket_timeout)
        return cls(client, prefix=prefix, owns_client=True)

    @property
    def client(self) -> Redis:
        """The redis-py client."""
        return self._client

    def gcra_key(self, key: str) -> str:
        """The Redis key holding ``key``'s TAT."""
        return f"{self._prefix}gcra:{key}"

    def slots_key(self, key: str) -> str:
        """The Redis key holding ``key``'s leases."""
        return f"{self._prefix}slots:{key}"

    async def charge(self, key: str, cost: float, limit: Limit, *, force: bool = False) -> Decision:
        """Charge ``cost`` under ``limit`` in one script, on the server's clock.

        Returns:
            The Decision, ``source`` REDIS.

        Raises:
            ValueError: ``cost`` is NaN or infinite (before any I/O).
            redis.exceptions.RedisError: connection lost, timeout, Redis error.
        """
        rate, burst, cost = float(limit.rate), float(limit.burst), _check_cost(cost)
        args = (repr(rate), repr(burst), repr(cost), "1" if force else "0")
        reply = await self._gcra(keys=[self.gcra_key(key)], args=args)
        allowed, remaining, retry_after, reset_after = reply
        return Decision(
            allowed=int(allowed) == 1,
            remaining=int(remaining),
            retry_after=float(retry_after),
            reset_after=float(reset_after),
            limit=limit,
            source=Source.REDIS,
        )

    async def acquire_slot(self, key: str, lease: str, capacity: int, ttl: float) -> SlotGrant:
        """Hold a slot in one script; expiry on the server's clock, whole milliseconds.

        Raises:
            ValueError: ``capacity`` < 0 or ``ttl`` not > 0 (before any I/O).
            redis.exceptions.RedisError: connection lost, timeout, Redis error.
        """
        _check_slot(capacity, ttl)
        ttl_ms = max(1, math.ceil(ttl * 1000))
        reply = await self._slot(keys=[self.slots_key(key)], args=(lease, capacity, ttl_ms))
        return SlotGrant(int(reply) == 1, capacity, Source.REDIS)

    async def release_slot(self, key: str, lease: str) -> None:
        """ZREM the lease.

        Raises:
            redis.exceptions.RedisError: connection lost, timeout, Redis error.
        """
        await self._client.zrem(self.slots_key(key), lease)

    async def close(self) -> None:
        """Close the client's connections if this store owns it."""
        if self._owns_client:
            await self._client.aclose()

    def __repr__(self) -> str:
        kwargs = self._client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        return f"<RedisStore {where}/{kwargs.get('db', 0)} prefix={self._prefix!r}>"


class TroubleMode(enum.Enum):
    """What a policy does while Redis is in trouble; ``.value`` is the config spelling.

    * FALLBACK: limit in this process at ``local_share`` of the limit (``Source.FALLBACK``).
    * OPEN: allow, count nothing (``Source.OPEN``): availability over the limit.
    * CLOSED: refuse, count nothing (``Source.CLOSED``): the limit over availability
      (e.g. a paid-tier quota that must never be exceeded). Refunds are still allowed.
    """

    FALLBACK = "fallback"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True, kw_only=True)
class TroublePolicy:
    """Per-policy behaviour when Redis does not answer in time.

    Usage::

        TroublePolicy()                                   # fall back at half the limit
        TroublePolicy(mode=TroubleMode.FALLBACK, local_share=1 / 3)   # three gateways
        TroublePolicy(mode=TroubleMode.CLOSED)

    Args:
        mode: see ``TroubleMode``.
        local_share: for FALLBACK, the share of rate, burst and capacity each gateway
            allows on its own, in (0, 1]; 1 / (number of gateways) keeps the total near the
            limit. Burst and capacity stay at least 1.

    Raises:
        ValueError: ``local_share`` outside (0, 1].
    """

    mode: TroubleMode = TroubleMode.FALLBACK
    local_share: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.local_share <= 1):
            raise ValueError(f"local_share must be in (0, 1], not {self.local_share}")


_DEFAULT_TROUBLE = TroublePolicy()


CLOSE_TIMEOUT = 1.0
"""Seconds ``ResilientStore.close()`` waits for the primary (a hung Redis must not stall
shutdown)."""
_SOURCES = {
    TroubleMode.FALLBACK: Source.FALLBACK,
    TroubleMode.OPEN: Source.OPEN,
    TroubleMode.CLOSED: Source.CLOSED,
}


class ResilientStore:
    """A store (Redis) with a time budget per call, a breaker, and a local fallback.

    Every primary call goes through a ``gateway.callguard.CallGuard`` (its module docstring
    has the rules and why a late call is not cancelled): while the breaker refuses, on any
    exception, and past ``call_timeout`` the call is answered at once by the policy's
    ``TroubleMode`` (FALLBACK answers from ``fallback`` with the limit scaled down), and
    nothing raises because of Redis. ``CancelledError`` (the client left) propagates.

    Degraded mode is the breaker not CLOSED. Entering and leaving it logs one line each
    (warning / info on ``geogate.ratelimit``) and calls ``on_degraded(True | False)`` (for a
    gauge); single failures while CLOSED are counted in ``errors_total``, not logged.

    Leases: ``release_slot`` frees the lease in the fallback (a no-op unless it was granted
    there) and then in the primary if the breaker allows. A Redis lease whose release could
    not reach Redis expires after its ttl. After Redis comes back, requests still holding
    fallback slots are not counted by Redis until they end (at most ``capacity x share``
    extra, for as long as they run).

    A primary call that ran late may still count in Redis (the charge counted there but the
    answer came from the fallback): Redis can only over-count, never under-count.

    Args:
        primary: the shared store (``RedisStore``).
        fallback: the in-process store used in trouble.
        breaker: guards the primary; its ``fail_max`` and ``reset_timeout`` set how fast
            the store gives up on Redis and how often it probes it again.
        call_timeout: seconds per primary call (connect included), e.g. 0.02: past it the
            request is answered without Redis.
        hang_timeout: seconds after which a late primary call is cancelled and counted as a
            breaker failure (a late call that succeeds before it counts as a success).
        trouble: the default policy; each call can pass its own.
        on_degraded: called with True on entering degraded mode, False on leaving it;
            must not raise.

    Raises:
        ValueError: ``call_timeout`` or ``hang_timeout`` not > 0.
    """

    __slots__ = (
        "_degraded_mark",
        "_fallback",
        "_guard",
        "_on_degraded",
        "_primary",
        "_trouble",
        "degraded_total",
    )

    def __init__(
        self,
        primary: RateLimitStore,
        fallback: MemoryStore,
        *,
        breaker: Breaker,
        call_timeout: float = 0.02,
        hang_timeout: float = 0.5,
        trouble: TroublePolicy = _DEFAULT_TROUBLE,
        on_degraded: Callable[[bool], None] | None = None,
    ) -> None:
        self._guard = CallGuard(
            breaker.name,
            breaker,
            call_timeout=call_timeout,
            hang_timeout=hang_timeout,
            on_degraded=self._transition,
        )
        self._primary = primary
        self._fallback = fallback
        self._trouble = trouble
        self._on_degraded = on_degraded
        self._degraded_mark = 0  # degraded_total when degraded mode began
        self.degraded_total = 0
        """Calls answered without the primary: FALLBACK, OPEN or CLOSED (a counter)."""

    @property
    def is_degraded(self) -> bool:
        """True while the breaker around the primary is not CLOSED."""
        return self._guard.degraded

    @property
    def errors_total(self) -> int:
        """Primary calls that failed or ran out of time (a counter, for metrics)."""
        return self._guard.errors_total

    @property
    def primary(self) -> RateLimitStore:
        """The store this one protects (the Redis store)."""
        return self._primary

    @property
    def breaker(self) -> Breaker:
        """The breaker around the primary."""
        return self._guard.breaker

    async def settle(self) -> None:
        """Wait until every late primary call has ended and been judged (for tests and for
        an orderly shutdown; a hung call ends at ``hang_timeout``)."""
        await self._guard.settle()

    async def charge(
        self,
        key: str,
        cost: float,
        limit: Limit,
        *,
        force: bool = False,
        trouble: TroublePolicy | None = None,
    ) -> Decision:
        """Charge in the primary within the time budget, else as ``trouble`` says.

        Args:
            key, cost, limit, force: as ``RateLimitStore.charge``.
            trouble: this call's policy; None for the store's default.

        Returns:
            The primary's Decision (``source`` REDIS), or: FALLBACK, the fallback's Decision
            against ``limit.scaled(local_share)`` (refunds go there too, so reservations
            made in the fallback are reconciled there); OPEN, allowed with ``remaining``
            = burst and nothing counted; CLOSED, refused with ``retry_after`` = the seconds
            until the breaker tries Redis again (1.0 if it is not OPEN); under OPEN and
            CLOSED, refunds and forced charges are allowed and dropped (nothing to count in).

        Raises:
            ValueError: ``cost`` is NaN or infinite (a caller bug; raised before any I/O).
        """
        cost = _check_cost(cost)
        decision = await self._guard.call(
            lambda: self._primary.charge(key, cost, limit, force=force), None
        )
        if decision is not None:
            return decision
        policy = trouble or self._trouble
        self.degraded_total += 1
        if policy.mode is TroubleMode.FALLBACK:
            scaled = limit.scaled(policy.local_share)
            local = self._fallback.charge_nowait(key, cost, scaled, force=force)
            return dataclasses.replace(local, source=Source.FALLBACK)
        if policy.mode is TroubleMode.OPEN or cost < 0 or force:
            return Decision(True, math.floor(limit.burst), 0.0, 0.0, limit, _SOURCES[policy.mode])
        return Decision(False, 0, self.breaker.reopens_in() or 1.0, 0.0, limit, Source.CLOSED)

    async def acquire_slot(
        self,
        key: str,
        lease: str,
        capacity: int,
        ttl: float,
        *,
        trouble: TroublePolicy | None = None,
    ) -> SlotGrant:
        """Hold a slot in the primary within the time budget, else as ``trouble`` says.

        Returns:
            The primary's SlotGrant (REDIS), or: FALLBACK, the fallback's at capacity
            ``max(1, floor(capacity x local_share))`` (0 stays 0); OPEN, held (nothing
            counted; ``release_slot`` is still due and harmless); CLOSED, refused.

        Raises:
            ValueError: ``capacity`` < 0 or ``ttl`` not > 0 (raised before any I/O).
        """
        _check_slot(capacity, ttl)
        grant = await self._guard.call(
            lambda: self._primary.acquire_slot(key, lease, capacity, ttl), None
        )
        if grant is not None:
            return grant
        policy = trouble or self._trouble
        self.degraded_total += 1
        if policy.mode is TroubleMode.FALLBACK:
            share = max(1, math.floor(capacity * policy.local_share)) if capacity else 0
            local = self._fallback.acquire_slot_nowait(key, lease, share, ttl)
            return dataclasses.replace(local, source=Source.FALLBACK)
        return SlotGrant(policy.mode is TroubleMode.OPEN, capacity, _SOURCES[policy.mode])

    async def release_slot(self, key: str, lease: str) -> None:
        """Free ``lease`` in the fallback, then in the primary within the budget; never raises
        for Redis trouble (an unreleased Redis lease expires after its ttl)."""
        self._fallback.release_slot_nowait(key, lease)
        await self._guard.call(lambda: self._primary.release_slot(key, lease), None)

    async def close(self) -> None:
        """Cancel late primary calls, close the primary (within ``CLOSE_TIMEOUT`` seconds;
        errors are logged, not raised) and the fallback."""
        await self._guard.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._primary.close()
        except Exception:
            log.warning("rate limits: closing %r failed", self._primary, exc_info=True)
        await self._fallback.close()

    def snapshot(self) -> dict[str, object]:
        """JSON-ready state for the admin API: ``{"degraded": False, "breaker": {...},
        "errors_total": 0, "degraded_total": 0, "last_error": ""}``."""
        guard = self._guard
        return {
            "degraded": guard.degraded,
            "breaker": guard.breaker.snapshot(),
            "errors_total": guard.errors_total,
            "degraded_total": self.degraded_total,
            "last_error": guard.last_error,
        }

    def _transition(self, degraded: bool) -> None:
        if degraded:
            self._degraded_mark = self.degraded_total
            log.warning(
                "rate limits: Redis unavailable (%s); answering per policy without it, "
                "default %s at share %g, next try in %.1f s",
                self._guard.last_error,
                self._trouble.mode.value,
                self._trouble.local_share,
                self.breaker.reopens_in() or 0.0,
            )
        else:
            log.info(
                "rate limits: Redis answers again; shared limits resumed after %d answers "
                "without it",
                self.degraded_total - self._degraded_mark,
            )
        if self._on_degraded is not None:
            self._on_degraded(degraded)

    def __repr__(self) -> str:
        state = "degraded" if self.is_degraded else "ok"
        return (
            f"<ResilientStore {state} primary={self._primary!r} breaker={self.breaker!r} "
            f"errors_total={self.errors_total} degraded_total={self.degraded_total}>"
        )
