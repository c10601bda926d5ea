"""Rate-limit stores: one contract suite over MemoryStore and RedisStore, the Lua script
against gcra.py, and ResilientStore when Redis dies, hangs, or comes back.

The Redis store runs on the server's real clock, so the contract tests use slow limits (a
few ms of real time change nothing) and `Harness.wait()` (ManualClock advance for memory, a
short real sleep for Redis, 60 ms at most per test).
"""

# mypy narrows properties such as ``store.is_degraded`` after an assert, but they move when
# the test acts:
# mypy: disable-error-code="unreachable"

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.breaker import Breaker, BreakerState
from gateway.clock import ManualClock
from gateway.gcra import Decision, Limit, Source, gcra_update, per_minute
from gateway.ratelimit_store import (
    GCRA_SCRIPT,
    MemoryStore,
    RateLimitStore,
    RedisStore,
    ResilientStore,
    SlotGrant,
    TroubleMode,
    TroublePolicy,
)
from tests import redis_server as redis_helpers
from tests.redis_server import RedisServer

redis_server = redis_helpers.redis_server  # the fixture (the lead may move it to a conftest)

T = TypeVar("T")
BUDGET = 0.1  # seconds any ResilientStore call may take: a behaviour bound, not a benchmark


def redis_client(server: RedisServer) -> Redis:
    return Redis(host="127.0.0.1", port=server.port, retry=Retry(NoBackoff(), 0))


@dataclass
class Harness:
    store: RedisStore | MemoryStore
    clock: ManualClock | None  # None: the Redis server's real clock

    async def wait(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def harness(
    request: pytest.FixtureRequest, manual_clock: ManualClock
) -> AsyncIterator[Harness]:
    if request.param == "memory":
        yield Harness(MemoryStore(clock=manual_clock), manual_clock)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    store = RedisStore.from_url(server.url, prefix="test:")
    try:
        yield Harness(store, None)
    finally:
        await store.close()


# ---------------------------------------------------------------------------------------
# Contract: every store


async def charges(store: RateLimitStore, key: str, limit: Limit, n: int) -> list[Decision]:
    return [await store.charge(key, 1, limit) for _ in range(n)]


async def test_burst_admits_exactly_burst_then_denies(harness: Harness) -> None:
    limit = Limit(rate=0.5, burst=5)  # T = 2 s: the ms a Redis round trip takes change nothing
    decisions = await charges(harness.store, "acme|rps", limit, 7)
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0, 0]
    assert all(d.limit == limit and d.retry_after == 0.0 for d in decisions[:5])
    assert 1.9 < decisions[5].retry_after <= 2.0
    assert 9.9 < decisions[4].reset_after <= 10.0


async def test_retry_after_is_honest(harness: Harness) -> None:
    limit = Limit(rate=20, burst=1)  # T = 50 ms
    assert (await harness.store.charge("k", 1, limit)).allowed
    denied = await harness.store.charge("k", 1, limit)
    assert not denied.allowed
    assert 0.04 < denied.retry_after <= 0.05
    await harness.wait(denied.retry_after + 0.005)
    assert (await harness.store.charge("k", 1, limit)).allowed


async def test_keys_are_independent(harness: Harness) -> None:
    limit = Limit(rate=0.1, burst=1)
    assert (await harness.store.charge("a", 1, limit)).allowed
    assert not (await harness.store.charge("a", 1, limit)).allowed
    assert (await harness.store.charge("b", 1, limit)).allowed


async def test_refund_gives_capacity_back_and_is_always_allowed(harness: Harness) -> None:
    store, limit = harness.store, per_minute(1000)  # tokens
    reserve = await store.charge("t", 800, limit)
    assert reserve.allowed
    assert reserve.remaining == 200
    assert not (await store.charge("t", 300, limit)).allowed
    refund = await store.charge("t", -500, limit)  # used 300 of the 800
    assert refund.allowed
    assert refund.remaining == 700
    assert (await store.charge("t", 700, limit)).allowed
    assert not (await store.charge("t", 1, limit)).allowed


async def test_refund_never_banks_capacity(harness: Harness) -> None:
    limit = Limit(rate=0.1, burst=3)
    refund = await harness.store.charge("r", -50, limit)
    assert refund.allowed
    assert refund.remaining == 3
    assert refund.reset_after == 0.0
    decisions = await charges(harness.store, "r", limit, 4)
    assert [d.allowed for d in decisions] == [True, True, True, False]


async def test_forced_charge_goes_into_debt(harness: Harness) -> None:
    limit = per_minute(600)  # 10 tokens/s
    assert (await harness.store.charge("f", 500, limit)).allowed
    forced = await harness.store.charge("f", 300, limit, force=True)  # spent 800, not 500
    assert forced.allowed
    assert forced.remaining == 0
    assert 79.9 < forced.reset_after <= 80.0
    blocked = await harness.store.charge("f", 1, limit)
    assert not blocked.allowed
    assert 20.0 < blocked.retry_after <= 20.1


async def test_a_cost_above_burst_is_never_admitted(harness: Harness) -> None:
    denied = await harness.store.charge("big", 11, Limit(rate=1, burst=10))
    assert not denied.allowed
    assert denied.remaining == 10


async def test_concurrent_charges_admit_exactly_burst(harness: Harness) -> None:
    limit = Limit(rate=0.1, burst=10)
    decisions = await asyncio.gather(*(harness.store.charge("c", 1, limit) for _ in range(40)))
    assert sum(d.allowed for d in decisions) == 10


async def test_invalid_arguments_raise_before_any_io(harness: Harness) -> None:
    with pytest.raises(ValueError, match="cost must be finite"):
        await harness.store.charge("x", math.nan, Limit(rate=1, burst=1))
    with pytest.raises(ValueError, match="ttl"):
        await harness.store.acquire_slot("x", "lease", 1, 0)
    with pytest.raises(ValueError, match="capacity"):
        await harness.store.acquire_slot("x", "lease", -1, 1)


async def test_slots_respect_capacity_and_release_frees(harness: Harness) -> None:
    store = harness.store
    grants = [await store.acquire_slot("inflight", f"req-{i}", 3, 30) for i in range(4)]
    assert [bool(g) for g in grants] == [True, True, True, False]
    assert grants[0] == SlotGrant(True, 3, grants[0].source)
    assert await store.acquire_slot("inflight", "req-0", 3, 30)  # held: refreshed, no 2nd slot
    assert not await store.acquire_slot("inflight", "req-9", 3, 30)
    await store.release_slot("inflight", "req-1")
    await store.release_slot("inflight", "req-1")  # twice: a no-op
    await store.release_slot("inflight", "never-held")
    assert await store.acquire_slot("inflight", "req-4", 3, 30)
    assert not await store.acquire_slot("inflight", "req-5", 3, 30)
    assert not await store.acquire_slot("zero", "req", 0, 30)


async def test_slots_expire_after_ttl(harness: Harness) -> None:
    store = harness.store
    assert await store.acquire_slot("crashy", "lost-1", 2, 0.05)  # a gateway that crashed
    assert await store.acquire_slot("crashy", "lost-2", 2, 0.05)
    assert not await store.acquire_slot("crashy", "new", 2, 30)
    await harness.wait(0.06)
    assert await store.acquire_slot("crashy", "new", 2, 30)
    assert await store.acquire_slot("crashy", "new-2", 2, 30)
    assert not await store.acquire_slot("crashy", "new-3", 2, 30)


async def test_concurrent_acquires_never_exceed_capacity(harness: Harness) -> None:
    grants = await asyncio.gather(
        *(harness.store.acquire_slot("burst", f"r{i}", 5, 30) for i in range(30))
    )
    assert sum(map(bool, grants)) == 5


# ---------------------------------------------------------------------------------------
# The Lua script against gcra.py


@pytest.mark.redis
async def test_lua_script_matches_gcra_py_bit_for_bit(redis_server: RedisServer) -> None:
    """The production script, with ARGV[5] fixing `now`, replays a random sequence; every
    decision and stored TAT must equal gcra_update's exactly (both are IEEE doubles doing
    the same operations in the same order; floats cross as %.17g / repr).

    Denied requests are often retried exactly when told, or a fraction of a microsecond either
    side, where rounding and EPSILON decide; at times up to ~16 years past REDIS_EPOCH.
    """
    rng = random.Random(7)
    limits = [Limit(rate=1000 / 60, burst=1000), Limit(rate=3, burst=2.5), Limit(0.1, 7)]
    tats: dict[Limit, float] = {}
    denied: dict[Limit, tuple[float, float]] = {}  # limit -> (retry_after, cost)
    now = rng.uniform(0, 5e8)
    seen: set[tuple[bool, float, bool]] = set()
    client = redis_client(redis_server)
    script = client.register_script(GCRA_SCRIPT)
    try:
        for i in range(800):
            limit = rng.choice(limits)
            costs = [1, 1, 2, 0.5, 0, limit.burst, limit.burst + 1, 30, -1, -3.25]
            cost = float(rng.choice(costs))
            if limit in denied and rng.random() < 0.3:  # the same request, when told to
                retry_after, cost = denied.pop(limit)
                now += max(0.0, retry_after + rng.choice([0.0, 0.0, -5e-7, 5e-7, -3e-6]))
            elif rng.random() < 0.8:
                now += rng.expovariate(limit.rate / 2)
            force = rng.random() < 0.1
            key = f"contract:{limit.rate}:{limit.burst}"
            args = [repr(limit.rate), repr(float(limit.burst)), repr(cost), "1" if force else "0"]
            reply = await script(keys=[key], args=[*args, repr(now)])
            expected, tat = gcra_update(tats.get(limit), now, cost, limit, force=force)
            if expected.allowed:
                tats[limit] = tat
            if not expected.allowed:
                denied[limit] = (expected.retry_after, cost)
            seen.add((expected.allowed, math.copysign(1, cost), force))
            got = (int(reply[0]) == 1, int(reply[1]), float(reply[2]), float(reply[3]))
            want = (expected.allowed, expected.remaining, expected.retry_after)
            assert got == (*want, expected.reset_after), f"step {i}: {now=} {cost=} {limit}"
            stored = await client.get(key)
            if stored is None:  # the script deletes a full bucket; gcra.py then has tat <= now
                assert tats.get(limit, now) <= now
            else:
                assert float(stored) == tats[limit]
    finally:
        await client.aclose()
    # allowed, denied, refunded, forced all occurred
    assert {(True, 1, False), (False, 1, False), (True, -1, False), (True, 1, True)} <= seen


@pytest.mark.redis
async def test_script_uses_server_time_and_expires_idle_keys(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url, prefix="t:")
    client = store.client
    try:
        decision = await store.charge("idle", 1, Limit(rate=20, burst=2))
        assert decision.source is Source.REDIS
        assert decision.reset_after == pytest.approx(0.05)
        ttl_ms = await client.pttl("t:gcra:idle")
        assert 0 < ttl_ms <= 50
        assert await store.acquire_slot("idle", "lease", 2, 0.05)
        assert 0 < await client.pttl("t:slots:idle") <= 50
        await asyncio.sleep(0.06)
        assert await client.exists("t:gcra:idle", "t:slots:idle") == 0  # idle costs nothing
        await store.charge("full", 1, Limit(rate=0.1, burst=2))
        assert await client.exists("t:gcra:full") == 1
        await store.charge("full", -1, Limit(rate=0.1, burst=2))  # refunded to full
        assert await client.exists("t:gcra:full") == 0
        assert "127.0.0.1" in repr(store)
        assert "prefix='t:'" in repr(store)
    finally:
        await store.close()


@pytest.mark.redis
async def test_two_gateways_share_one_limit_exactly(redis_server: RedisServer) -> None:
    """Two clients with their own connection pools stand in for two gateway processes."""
    one = RedisStore(redis_client(redis_server))
    two = RedisStore(redis_client(redis_server))
    limit = Limit(rate=0.1, burst=10)
    try:
        decisions = await asyncio.gather(
            *(store.charge("acme|rps", 1, limit) for _ in range(15) for store in (one, two))
        )
        assert sum(d.allowed for d in decisions) == 10
        grants = await asyncio.gather(
            *(store.acquire_slot("acme|inflight", f"{i}", 4, 30) for i, store in
              enumerate([one, two] * 6))
        )  # fmt: skip
        held = [i for i, g in enumerate(grants) if g]
        assert len(held) == 4
        await one.release_slot("acme|inflight", str(held[0]))  # released by the other gateway
        assert await two.acquire_slot("acme|inflight", "late", 4, 30)
    finally:
        await one.close()
        await two.close()


@pytest.mark.redis
async def test_scripts_reload_after_script_flush(redis_server: RedisServer) -> None:
    store = RedisStore(redis_client(redis_server))
    try:
        assert (await store.charge("k", 1, Limit(rate=1, burst=1))).allowed
        await store.client.script_flush()  # as after a restart or failover: NOSCRIPT
        assert not (await store.charge("k", 1, Limit(rate=1, burst=1))).allowed
        assert await store.acquire_slot("k", "lease", 1, 1)
    finally:
        await store.close()


# ---------------------------------------------------------------------------------------
# MemoryStore only


async def test_memory_store_drops_full_buckets_and_bounds_its_table(
    manual_clock: ManualClock,
) -> None:
    store = MemoryStore(clock=manual_clock, max_keys=8)
    limit = Limit(rate=1, burst=5)
    await store.charge("refunded", 1, limit)
    await store.charge("refunded", -1, limit)
    assert store.key_count == 0
    for i in range(8):
        await store.charge(f"k{i}", 1 + i % 3, limit)
    assert store.key_count == 8
    manual_clock.advance(1.5)  # keys charged 1 are full again; the others still owe
    await store.charge("new", 1, limit)
    assert store.key_count == 6
    assert store.evictions_total == 0
    for i in range(8, 11):
        await store.charge(f"k{i}", 3, limit)
    assert store.key_count == 6 + 3 - 2
    assert store.evictions_total == 2
    assert repr(store) == "<MemoryStore keys=7/8 slot_keys=0 evictions_total=2>"


async def test_memory_store_sweeps_expired_leases(manual_clock: ManualClock) -> None:
    store = MemoryStore(clock=manual_clock, max_keys=4)
    for i in range(4):
        assert await store.acquire_slot(f"pool{i}", "lease", 1, 1.0)
    assert store.slots_held("pool0") == 1
    manual_clock.advance(1.0)
    assert store.slots_held("pool0") == 0
    assert await store.acquire_slot("pool9", "lease", 1, 1.0)
    assert "slot_keys=1" in repr(store)
    await store.release_slot("pool9", "lease")
    assert "slot_keys=0" in repr(store)
    with pytest.raises(ValueError, match="max_keys"):
        MemoryStore(clock=manual_clock, max_keys=3)


# ---------------------------------------------------------------------------------------
# ResilientStore


class CountingStore:
    """A primary that counts calls; it can fail, hang, or pass through to a real store."""

    def __init__(self, inner: RateLimitStore | None = None) -> None:
        self.inner = inner
        self.calls = 0
        self.entered = asyncio.Event()
        self.fail: Exception | None = None
        self.hang = False
        self._unhang = asyncio.Event()

    def release_hang(self) -> None:
        """Let the calls that hang go on."""
        self._unhang.set()

    async def _enter(self) -> None:
        self.calls += 1
        self.entered.set()
        if self.hang:
            await self._unhang.wait()
        if self.fail is not None:
            raise self.fail
        assert self.inner is not None

    async def charge(self, key: str, cost: float, limit: Limit, *, force: bool = False) -> Decision:
        await self._enter()
        assert self.inner is not None
        return await self.inner.charge(key, cost, limit, force=force)

    async def acquire_slot(self, key: str, lease: str, capacity: int, ttl: float) -> SlotGrant:
        await self._enter()
        assert self.inner is not None
        return await self.inner.acquire_slot(key, lease, capacity, ttl)

    async def release_slot(self, key: str, lease: str) -> None:
        await self._enter()
        assert self.inner is not None
        await self.inner.release_slot(key, lease)

    async def close(self) -> None:
        if self.inner is not None:
            await self.inner.close()


@dataclass
class Resilient:
    store: ResilientStore
    primary: CountingStore
    clock: ManualClock
    events: list[bool]


def make_resilient(
    clock: ManualClock, inner: RateLimitStore | None = None, **kwargs: object
) -> Resilient:
    events: list[bool] = []
    primary = CountingStore(inner)
    breaker = Breaker("redis", fail_max=3, reset_timeout=5.0, clock=clock)
    store = ResilientStore(
        primary,
        MemoryStore(clock=clock),
        breaker=breaker,
        on_degraded=events.append,
        **kwargs,  # type: ignore[arg-type]
    )
    return Resilient(store, primary, clock, events)


async def timed(call: Awaitable[T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = await call
    return result, time.perf_counter() - start


def redis_client_of(r: Resilient) -> Redis:
    assert isinstance(r.primary.inner, RedisStore)
    return r.primary.inner.client


@pytest.fixture
async def resilient(
    redis_server: RedisServer, manual_clock: ManualClock
) -> AsyncIterator[tuple[Resilient, RedisServer]]:
    redis_store = RedisStore.from_url(redis_server.url)
    await redis_store.client.ping()  # connect now: the 20 ms budget is for commands
    r = make_resilient(manual_clock, redis_store)
    try:
        yield r, redis_server
    finally:
        if redis_server.pid is not None:
            redis_server.resume()  # a stopped server would hold up the client's close
        await r.store.close()


@pytest.mark.redis
async def test_killed_redis_falls_back_within_budget_then_recovers(
    resilient: tuple[Resilient, RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    r, server = resilient
    store, limit = r.store, Limit(rate=0.1, burst=10)
    caplog.set_level(logging.INFO, logger="geogate.ratelimit")
    healthy = await store.charge("acme", 1, limit)
    assert healthy.source is Source.REDIS
    assert not store.is_degraded

    server.kill()
    answers = []
    for _ in range(8):
        decision, took = await timed(store.charge("acme", 1, limit))
        assert took < BUDGET
        answers.append(decision)
    assert all(d.source is Source.FALLBACK for d in answers)
    assert [d.allowed for d in answers] == [True] * 5 + [False] * 3  # 10 x share 0.5
    assert answers[0].limit == Limit(rate=0.05, burst=5)
    assert r.primary.calls == 1 + 3  # fail_max = 3, then the breaker keeps Redis out
    assert store.breaker.state is BreakerState.OPEN
    assert store.is_degraded
    assert r.events == [True]
    grant, took = await timed(store.acquire_slot("acme", "lease", 4, 30))
    assert grant == SlotGrant(True, 2, Source.FALLBACK)
    assert took < BUDGET
    assert r.primary.calls == 4
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Redis unavailable" in warnings[0].getMessage()

    await asyncio.to_thread(server.restart)  # empty dataset, empty script cache (NOSCRIPT)
    assert (await store.charge("acme", 1, limit)).source is Source.FALLBACK  # still OPEN
    await redis_client_of(r).ping()  # reconnect outside the budget
    r.clock.advance(5.0)  # the breaker's reset_timeout: one trial goes to Redis
    back = await store.charge("acme", 1, limit)
    assert back.source is Source.REDIS
    assert back.allowed
    assert back.remaining == 9
    assert store.breaker.state is BreakerState.CLOSED
    assert not store.is_degraded
    assert r.events == [True, False]
    await store.release_slot("acme", "lease")  # granted by the fallback: freed there
    assert (await store.acquire_slot("acme", "lease-2", 1, 30)).source is Source.REDIS
    infos = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.INFO]
    assert len(infos) == 1
    assert "answers again" in infos[0]
    assert len(caplog.records) == 2  # one line per transition, none per request


@pytest.mark.redis
async def test_hung_redis_is_cut_off_by_the_call_budget(
    resilient: tuple[Resilient, RedisServer],
) -> None:
    r, server = resilient
    store, limit = r.store, Limit(rate=0.1, burst=4)
    assert (await store.charge("acme", 1, limit)).source is Source.REDIS  # connection made
    server.pause()  # SIGSTOP: the socket stays open, nothing answers
    durations = []
    calls: list[Callable[[], Awaitable[Decision | SlotGrant | None]]] = [
        lambda: store.charge("acme", 1, limit),
        lambda: store.acquire_slot("acme", "lease", 2, 30),
        lambda: store.release_slot("acme", "lease"),
        lambda: store.charge("acme", 1, limit),
        lambda: store.charge("acme", -1, limit),
    ]
    for call in calls:
        result, took = await timed(call())
        durations.append(took)
        assert result is None or result.source is Source.FALLBACK
    assert all(took < BUDGET for took in durations)
    assert all(took >= 0.015 for took in durations)  # each waited out its 20 ms budget
    assert r.primary.calls == 1 + 5
    assert store.errors_total == 5
    assert store.degraded_total == 4
    # Late calls are judged when they end: a hung one after hang_timeout (0.5 s), as a failure.
    assert store.breaker.state is BreakerState.CLOSED
    async with asyncio.timeout(5):
        await store.settle()
    assert store.breaker.state is BreakerState.OPEN
    assert "no answer within 0.5 s" in str(store.snapshot()["last_error"])
    result, took = await timed(store.charge("acme", 1, limit))
    assert took < 0.01  # the breaker is open: Redis is not asked at all
    assert r.primary.calls == 1 + 5

    server.resume()
    await redis_client_of(r).ping()
    r.clock.advance(5.0)
    assert (await store.charge("acme", 1, limit)).source is Source.REDIS
    assert r.events == [True, False]


async def test_policies_fail_open_closed_or_fall_back(manual_clock: ManualClock) -> None:
    r = make_resilient(manual_clock)
    r.primary.fail = RedisConnectionError("refused")
    store, limit = r.store, Limit(rate=1, burst=4)
    opened = TroublePolicy(mode=TroubleMode.OPEN)
    closed = TroublePolicy(mode=TroubleMode.CLOSED)
    third = TroublePolicy(local_share=1 / 3)

    assert await store.charge("k", 1, limit, trouble=opened) == Decision(
        True, 4, 0.0, 0.0, limit, Source.OPEN
    )
    refused = await store.charge("k", 1, limit, trouble=closed)
    assert not refused.allowed
    assert refused.source is Source.CLOSED
    assert refused.retry_after == 1.0  # breaker not OPEN yet
    fallback = await store.charge("k", 1, limit, trouble=third)
    assert fallback.source is Source.FALLBACK
    assert fallback.limit == Limit(1 / 3, 4 / 3)
    assert store.breaker.state is BreakerState.OPEN

    manual_clock.advance(2.0)
    refused = await store.charge("k", 1, limit, trouble=closed)
    assert not refused.allowed
    assert refused.retry_after == 3.0
    assert (await store.charge("k", -1, limit, trouble=closed)).allowed  # refunds pass
    assert (await store.charge("k", 9, limit, trouble=closed, force=True)).allowed
    assert await store.acquire_slot("s", "a", 4, 30, trouble=opened) == SlotGrant(
        True, 4, Source.OPEN
    )
    assert await store.acquire_slot("s", "a", 4, 30, trouble=closed) == SlotGrant(
        False, 4, Source.CLOSED
    )
    assert await store.acquire_slot("s", "a", 0, 30) == SlotGrant(False, 0, Source.FALLBACK)
    assert [bool(await store.acquire_slot("s", f"r{i}", 5, 30)) for i in range(4)] == [
        True,
        True,
        False,
        False,
    ]  # floor(5 x 0.5) = 2
    assert r.primary.calls == 3
    assert store.snapshot()["degraded"] is True
    assert repr(store).startswith("<ResilientStore degraded primary=")


async def test_default_policy_comes_from_the_store(manual_clock: ManualClock) -> None:
    r = make_resilient(manual_clock, trouble=TroublePolicy(mode=TroubleMode.CLOSED))
    r.primary.fail = OSError("network unreachable")
    decision = await r.store.charge("k", 1, Limit(rate=1, burst=1))
    assert decision.source is Source.CLOSED
    assert decision.is_degraded
    assert "OSError: network unreachable" in str(r.store.snapshot()["last_error"])


async def test_any_primary_error_is_answered_never_raised(manual_clock: ManualClock) -> None:
    r = make_resilient(manual_clock)
    for error in [RuntimeError("bug in a script"), KeyError("x"), ValueError("bad reply")]:
        r.primary.fail = error
        assert (await r.store.charge("k", 1, Limit(rate=1, burst=5))).source is Source.FALLBACK
    await r.store.release_slot("k", "lease")  # breaker OPEN: not even tried
    assert r.primary.calls == 3
    assert r.store.errors_total == 3


async def test_hanging_primary_is_cut_off_at_the_budget(manual_clock: ManualClock) -> None:
    r = make_resilient(manual_clock, call_timeout=0.01, hang_timeout=0.05)
    r.primary.hang = True
    decision, took = await timed(r.store.charge("k", 1, Limit(rate=1, burst=5)))
    assert decision.source is Source.FALLBACK
    assert 0.009 <= took < BUDGET
    assert r.store.breaker.snapshot()["failures"] == 0  # judged when the late call ends
    async with asyncio.timeout(5):
        await r.store.settle()
    assert r.store.breaker.snapshot()["failures"] == 1  # still hanging at hang_timeout


async def test_a_late_success_is_no_breaker_failure(manual_clock: ManualClock) -> None:
    r = make_resilient(
        manual_clock, MemoryStore(clock=manual_clock), call_timeout=0.01, hang_timeout=5.0
    )
    r.primary.hang = True
    decision = await r.store.charge("k", 1, Limit(rate=1, burst=5))
    assert decision.source is Source.FALLBACK  # answered within the budget, without Redis
    r.primary.release_hang()
    async with asyncio.timeout(5):
        await r.store.settle()
    assert r.store.breaker.snapshot()["failures"] == 0
    assert r.store.breaker.state is BreakerState.CLOSED


async def test_a_cancelled_call_counts_no_failure_and_is_not_swallowed(
    manual_clock: ManualClock,
) -> None:
    r = make_resilient(manual_clock, call_timeout=10.0)
    r.primary.hang = True
    task = asyncio.create_task(r.store.charge("k", 1, Limit(rate=1, burst=5)))
    await r.primary.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert r.store.breaker.snapshot() == {
        "state": "closed",
        "failures": 0,
        "reopens_in": None,
        "trials_in_flight": 0,
        "in_flight": 0,
    }
    assert r.store.degraded_total == 0
    assert r.events == []


async def test_validation_happens_before_the_primary(manual_clock: ManualClock) -> None:
    r = make_resilient(manual_clock)
    with pytest.raises(ValueError, match="cost"):
        await r.store.charge("k", math.inf, Limit(rate=1, burst=1))
    with pytest.raises(ValueError, match="ttl"):
        await r.store.acquire_slot("k", "lease", 1, -1)
    assert r.primary.calls == 0
    with pytest.raises(ValueError, match="local_share"):
        TroublePolicy(local_share=0)
    with pytest.raises(ValueError, match="call_timeout"):
        make_resilient(manual_clock, call_timeout=0)
