"""Cache stores: the entry format, L1 (bytes-bounded LRU with TTLs), one contract suite over
L1 and a real Redis L2, the residency invariant across two real Redis servers (eu, us), and
ZoneCaches when a zone's Redis dies or hangs.

Entry times are epoch seconds from an injected ``EpochClock`` (it starts at the real time,
so the PX sent to a real Redis is right, and moves only when told to); the breakers run on
a ``ManualClock``.
"""

# mypy narrows attributes such as ``breaker.state`` after an assert, but they move when the
# test acts:
# mypy: disable-error-code="unreachable"

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.breaker import Breaker, BreakerState
from gateway.cachestore import (
    ENTRY_FORMAT_VERSION,
    ENTRY_OVERHEAD,
    CacheEntry,
    MemoryCache,
    PurgeIncomplete,
    RedisCache,
    ZoneCaches,
    decode_entry,
    encode_entry,
)
from gateway.clock import ManualClock
from tests import redis_server as redis_helpers
from tests.redis_server import RedisServer

redis_server = redis_helpers.redis_server  # the fixture (the lead may move it to a conftest)

T = TypeVar("T")
BUDGET = 0.2  # seconds a ZoneCaches call may take with Redis in trouble: a behaviour bound
KIB = 1024


class EpochClock:
    """Epoch seconds that move only through ``advance()``."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def entry(
    key: str = "k1",
    variant: str = "",
    *,
    at: float,
    zone: str = "eu",
    route: str = "/v1/",
    tenant: str | None = "acme",
    body: bytes = b"x" * 100,
    ttl: float = 60.0,
    meta: dict[str, Any] | None = None,
) -> CacheEntry:
    return CacheEntry(
        key=key,
        variant=variant,
        zone=zone,
        route=route,
        tenant=tenant,
        status=200,
        headers=(("content-type", "application/json"), ("etag", '"v1"')),
        body=body,
        meta={"request_time": at - 0.1, "vary": [["accept", "*/*"]]} if meta is None else meta,
        stored_at=at,
        expires_at=at + ttl,
    )


async def timed(aw: Awaitable[T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = await aw
    return result, time.perf_counter() - start


def raw_client(server: RedisServer) -> Redis:
    return Redis(host="127.0.0.1", port=server.port, retry=Retry(NoBackoff(), 0))


@pytest.fixture
def clock() -> EpochClock:
    return EpochClock()


# ---------------------------------------------------------------------------------------
# The entry and its format


def test_size_counts_body_headers_meta_strings_and_overhead(clock: EpochClock) -> None:
    e = entry(at=clock(), body=b"b" * 1000, meta={"a": 1})
    headers = len("content-type") + len("application/json") + len("etag") + len('"v1"')
    strings = len("k1") + len("eu") + len("/v1/") + len("acme")
    assert e.size() == 1000 + headers + len(b'{"a":1}') + strings + ENTRY_OVERHEAD


def test_meta_that_is_not_json_is_refused_at_construction(clock: EpochClock) -> None:
    with pytest.raises(TypeError):
        entry(at=clock(), meta={"when": object()})


def test_encode_decode_round_trip(clock: EpochClock) -> None:
    original = CacheEntry(
        key="0123456789abcdef0123456789abcdef",
        variant="fedcba9876543210fedcba9876543210",
        zone="eu",
        route="/v1/ünï/",
        tenant=None,
        status=203,
        headers=(("set-cookie", "a=1"), ("set-cookie", "b=2"), ("x-empty", "")),
        body=bytes(range(256)) * 3,
        meta={"request_time": 1.0000000000000002, "vary": [["a", None]], "n": [1, {"x": True}]},
        stored_at=clock(),
        expires_at=clock() + 0.1,
    )
    data = encode_entry(original)
    assert data[:4] == b"GGC" + bytes([ENTRY_FORMAT_VERSION])
    assert decode_entry(data) == original
    assert decode_entry(bytearray(data)) == original
    assert abs(len(data) - original.size()) < ENTRY_OVERHEAD


def test_another_version_is_a_miss(clock: EpochClock) -> None:
    data = bytearray(encode_entry(entry(at=clock())))
    for version in (0, ENTRY_FORMAT_VERSION + 1, 255):
        data[3] = version
        assert decode_entry(bytes(data)) is None


def _with_json(js: bytes, body: bytes = b"") -> bytes:
    return b"GGC" + bytes([ENTRY_FORMAT_VERSION]) + len(js).to_bytes(4, "big") + js + body


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"GGC",
        b"\x00" * 64,
        b"not an entry at all, just some bytes of text",
        b"GGX\x01\x00\x00\x00\x02{}",
        b"GGC\x01\xff\xff\xff\xff{}",
        _with_json(b"[1, 2]"),
        _with_json(b"{not json"),
        _with_json(b"{}"),
    ],
    ids=["empty", "magic", "zeros", "text", "bad-magic", "huge-length", "list", "bad-json", "{}"],
)
def test_garbage_is_a_miss(data: bytes) -> None:
    assert decode_entry(data) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("s", "200"), ("s", True), ("k", 1), ("t", 5), ("h", [["a"]]), ("m", []), ("ea", "x")],
)
def test_a_field_of_the_wrong_type_is_a_miss(clock: EpochClock, field: str, value: Any) -> None:
    import orjson

    data = encode_entry(entry(at=clock(), body=b""))
    doc = orjson.loads(data[8:])
    doc[field] = value
    assert decode_entry(_with_json(orjson.dumps(doc))) is None


def test_truncated_or_padded_is_a_miss(clock: EpochClock) -> None:
    data = encode_entry(entry(at=clock(), body=b"0123456789"))
    assert all(decode_entry(data[:cut]) is None for cut in range(len(data)))
    assert decode_entry(data + b"!") is None


# ---------------------------------------------------------------------------------------
# MemoryCache (L1)


def test_lru_evicts_least_recently_used_until_the_new_entry_fits(clock: EpochClock) -> None:
    size = entry("ka", at=clock()).size()
    l1 = MemoryCache(max_bytes=3 * size, max_entry_bytes=2 * size, clock=clock)
    for k in ("ka", "kb", "kc"):
        assert l1.put(entry(k, at=clock()))
    assert l1.stored_bytes == 3 * size
    assert l1.get("ka") is not None  # ka is now the most recently used
    assert l1.put(entry("kd", at=clock()))
    assert l1.get("kb") is None
    assert [k for k in ("ka", "kc", "kd") if l1.get(k) is not None] == ["ka", "kc", "kd"]
    assert l1.evictions_total == 1
    big = entry("ke", at=clock(), body=b"x" * (size + 100))  # two entries must go
    assert size < big.size() <= 2 * size
    assert l1.put(big)
    left = [k for k in ("ka", "kc", "kd", "ke") if l1.get(k) is not None]
    assert left == ["kd", "ke"]
    assert l1.stored_bytes == size + big.size() <= l1.max_bytes
    assert l1.evictions_total == 3


def test_entry_over_max_entry_bytes_is_refused(clock: EpochClock) -> None:
    l1 = MemoryCache(max_bytes=64 * KIB, max_entry_bytes=4 * KIB, clock=clock)
    assert l1.put(entry("small", at=clock()))
    too_big = entry("big", at=clock(), body=b"x" * 4 * KIB)
    assert not l1.put(too_big)
    assert l1.get("big") is None
    assert l1.entries == 1
    assert l1.evictions_total == 0  # nothing was pushed out for it
    with pytest.raises(ValueError, match="max_entry_bytes"):
        MemoryCache(max_bytes=KIB, max_entry_bytes=2 * KIB)
    with pytest.raises(ValueError, match="max_entry_bytes"):
        MemoryCache(max_bytes=KIB, max_entry_bytes=0)


def test_entries_expire_at_expires_at(clock: EpochClock) -> None:
    l1 = MemoryCache(max_bytes=64 * KIB, max_entry_bytes=4 * KIB, clock=clock)
    assert l1.put(entry("a", at=clock(), ttl=10))
    clock.advance(9.999)
    assert l1.get("a") is not None
    clock.advance(0.001)
    assert l1.get("a") is None
    assert l1.stored_bytes == 0
    assert l1.entries == 0
    assert not l1.put(entry("late", at=clock() - 20, ttl=10))  # expired before it came


def test_expired_entries_make_room_before_live_ones_are_evicted(clock: EpochClock) -> None:
    size = entry("short", at=clock()).size()  # keys of one length: entries of one size
    l1 = MemoryCache(max_bytes=2 * size, max_entry_bytes=size, clock=clock)
    assert l1.put(entry("short", at=clock(), ttl=1))
    assert l1.put(entry("long_", at=clock(), ttl=100))
    l1.get("short")  # "long_" is now the least recently used
    clock.advance(1)
    assert l1.stored_bytes == 2 * size  # nothing ran since: not dropped yet
    assert l1.put(entry("new__", at=clock()))
    assert l1.get("long_") is not None
    assert l1.evictions_total == 0
    assert l1.snapshot()["entries"] == 2


def test_variants_of_a_key(clock: EpochClock) -> None:
    l1 = MemoryCache(max_bytes=64 * KIB, max_entry_bytes=4 * KIB, clock=clock)
    for i, variant in enumerate(["gzip", "br", ""]):
        clock.advance(1)
        assert l1.put(entry("k", variant, at=clock(), ttl=10 + i))
    l1.put(entry("other", "gzip", at=clock()))
    l1.put(entry("k", "us-only", at=clock(), zone="us"))
    assert [e.variant for e in l1.variants("k", zone="eu")] == ["", "br", "gzip"]
    assert len(l1.variants("k")) == 4
    got = l1.get("k", "br")
    assert got is not None
    assert got.variant == "br"
    assert l1.get("k", "deflate") is None
    assert l1.get("k", "us-only", zone="eu") is None  # the zone check
    us_gzip = entry("k", "gzip", at=clock(), zone="us", body=b"us")
    assert l1.put(us_gzip)  # same key and variant, another zone: both are kept
    assert l1.get("k", "gzip", zone="us") is us_gzip
    eu_gzip = l1.get("k", "gzip", zone="eu")
    assert eu_gzip is not None
    assert eu_gzip.zone == "eu"
    assert l1.get("k", "gzip") is us_gzip  # any zone: the most recently stored
    assert l1.delete("k", "gzip", zone="us") == 1
    clock.advance(9)  # "gzip" (stored 3 s ago, ttl 10) is gone
    assert [e.variant for e in l1.variants("k", zone="eu")] == ["", "br"]
    assert l1.variants("missing") == []
    assert l1.delete("k", "br") == 1
    assert l1.delete("k") == 2  # "" and "us-only"
    assert l1.variants("k") == []
    assert l1.get("other", "gzip") is not None


def test_put_replaces_the_same_key_and_variant(clock: EpochClock) -> None:
    l1 = MemoryCache(max_bytes=64 * KIB, max_entry_bytes=4 * KIB, clock=clock)
    assert l1.put(entry("k", "v", at=clock(), ttl=5, body=b"old"))
    new = entry("k", "v", at=clock(), ttl=50, body=b"new, and longer")
    assert l1.put(new)
    assert l1.entries == 1
    assert l1.stored_bytes == new.size()
    clock.advance(10)  # past the old entry's expiry: its heap record must not drop the new
    assert l1.get("k", "v") is new
    for i in range(1000):  # replaced entries' expiry records do not pile up
        l1.put(entry("k", "v", at=clock(), ttl=1000 + i))
    assert len(l1._expiry) < 100
    last = l1.get("k", "v")
    assert not l1.put(entry("k", "v", at=clock() - 100, ttl=1))  # refused: nothing changes
    assert not l1.put(entry("k", "v", at=clock(), body=b"x" * 4 * KIB))
    assert l1.get("k", "v") is last
    assert l1.entries == 1


PURGES: list[tuple[dict[str, str], set[str]]] = [
    ({"key": "k4"}, {"k4/va", "k4/vb"}),
    ({"route_prefix": "/v1/"}, {"k1/", "k2/", "k4/va", "k4/vb"}),
    ({"route_prefix": "/v1/chat/"}, {"k4/va", "k4/vb"}),
    ({"tenant": "acme"}, {"k1/", "k3/", "k4/va"}),
    ({"tenant": "acme", "route_prefix": "/v1/"}, {"k1/", "k4/va"}),
    ({"key": "k4", "tenant": "globex"}, {"k4/vb"}),
    ({"zone": "eu"}, {"k1/", "k2/", "k3/", "k4/va", "k4/vb", "k5/"}),
    ({"zone": "us"}, set()),
    ({"tenant": "nobody"}, set()),
]
PURGE_IDS = ["key", "route", "route-deeper", "tenant", "tenant+route", "key+tenant", "zone",
             "other-zone", "no-match"]  # fmt: skip


def population(at: float) -> list[CacheEntry]:
    return [
        entry("k1", at=at, route="/v1/", tenant="acme"),
        entry("k2", at=at, route="/v1/", tenant="globex"),
        entry("k3", at=at, route="/static/", tenant="acme"),
        entry("k4", "va", at=at, route="/v1/chat/", tenant="acme"),
        entry("k4", "vb", at=at, route="/v1/chat/", tenant="globex"),
        entry("k5", at=at, route="/v2/", tenant=None),
    ]


@pytest.mark.parametrize(("filters", "removed"), PURGES, ids=PURGE_IDS)
def test_memory_purge(clock: EpochClock, filters: dict[str, str], removed: set[str]) -> None:
    l1 = MemoryCache(max_bytes=64 * KIB, max_entry_bytes=4 * KIB, clock=clock)
    everything = population(clock())
    for e in everything:
        l1.put(e)
    l1.put(entry("expired", at=clock(), ttl=1, tenant="acme"))
    clock.advance(1)
    assert l1.purge(**filters) == len(removed)  # the expired entry is not counted
    left = {f"{e.key}/{e.variant}" for e in everything if l1.get(e.key, e.variant) is not None}
    assert left == {f"{e.key}/{e.variant}" for e in everything} - removed
    assert l1.stored_bytes == sum(e.size() for e in everything) - sum(
        e.size() for e in everything if f"{e.key}/{e.variant}" in removed
    )


def test_purge_needs_a_filter_and_clear_drops_all(clock: EpochClock) -> None:
    l1 = MemoryCache(max_bytes=64 * KIB, max_entry_bytes=4 * KIB, clock=clock)
    for e in population(clock()):
        l1.put(e)
    with pytest.raises(ValueError, match="purge needs"):
        l1.purge()
    assert l1.clear() == 6
    assert (l1.entries, l1.stored_bytes) == (0, 0)
    assert repr(l1) == "<MemoryCache entries=0 bytes=0/65536 hits=0 misses=0 evictions=0>"


# ---------------------------------------------------------------------------------------
# Contract: L1 and a real Redis L2 answer alike


class MemoryAdapter:
    """MemoryCache behind the RedisCache's async signatures."""

    def __init__(self, cache: MemoryCache) -> None:
        self.cache = cache

    async def put(self, e: CacheEntry) -> bool:
        return self.cache.put(e)

    async def get(self, key: str, variant: str = "") -> CacheEntry | None:
        return self.cache.get(key, variant)

    async def variants(self, key: str) -> list[CacheEntry]:
        return self.cache.variants(key)

    async def purge(self, **filters: str) -> int:
        return self.cache.purge(**filters)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(
    request: pytest.FixtureRequest, clock: EpochClock
) -> AsyncIterator[MemoryAdapter | RedisCache]:
    if request.param == "memory":
        yield MemoryAdapter(MemoryCache(max_bytes=64 * KIB, max_entry_bytes=4 * KIB, clock=clock))
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    cache = RedisCache.from_url("eu", server.url, max_entry_bytes=4 * KIB, clock=clock)
    try:
        yield cache
    finally:
        await cache.close()


async def test_get_variants_and_replace(
    store: MemoryAdapter | RedisCache, clock: EpochClock
) -> None:
    a = entry("k", "gzip", at=clock())
    clock.advance(1)
    b = entry("k", "br", at=clock())
    assert await store.put(a)
    assert await store.put(b)
    assert await store.get("k", "gzip") == a
    assert await store.get("k", "deflate") is None
    assert await store.get("nope") is None
    assert await store.variants("k") == [b, a]
    newer = entry("k", "gzip", at=clock(), body=b"newer")
    assert await store.put(newer)
    assert await store.get("k", "gzip") == newer
    assert len(await store.variants("k")) == 2


async def test_expired_is_a_miss_and_too_large_or_late_is_refused(
    store: MemoryAdapter | RedisCache, clock: EpochClock
) -> None:
    assert await store.put(entry("k", at=clock(), ttl=30))
    assert not await store.put(entry("big", at=clock(), body=b"x" * 4 * KIB))
    assert not await store.put(entry("late", at=clock() - 60, ttl=30))
    assert await store.get("big") is None
    assert await store.get("late") is None
    clock.advance(30)
    assert await store.get("k") is None
    assert await store.variants("k") == []


@pytest.mark.parametrize(("filters", "removed"), PURGES, ids=PURGE_IDS)
async def test_purge(
    store: MemoryAdapter | RedisCache,
    clock: EpochClock,
    filters: dict[str, str],
    removed: set[str],
) -> None:
    everything = population(clock())
    for e in everything:
        assert await store.put(e)
    assert await store.purge(**filters) == len(removed)
    left = {f"{e.key}/{e.variant}" for e in everything if await store.get(e.key, e.variant)}
    assert left == {f"{e.key}/{e.variant}" for e in everything} - removed
    assert await store.purge(**filters) == 0  # idempotent
    with pytest.raises(ValueError, match="purge needs"):
        await store.purge()


# ---------------------------------------------------------------------------------------
# RedisCache specifics


@pytest.fixture
async def eu_cache(redis_server: RedisServer, clock: EpochClock) -> AsyncIterator[RedisCache]:
    cache = RedisCache.from_url("eu", redis_server.url, max_variants=2, clock=clock)
    try:
        yield cache
    finally:
        await cache.close()


@pytest.mark.redis
async def test_redis_entries_and_indexes_get_ttls(
    eu_cache: RedisCache, redis_server: RedisServer, clock: EpochClock
) -> None:
    assert await eu_cache.put(entry("k", "v", at=clock(), ttl=30))
    raw = raw_client(redis_server)
    try:
        names = {n.decode() for n in await raw.keys("*") if isinstance(n, bytes)}
        assert names == {
            "geogate:cache:eu:k:k",
            "geogate:cache:eu:r:/v1/",
            "geogate:cache:eu:t:acme",
            "geogate:cache:eu:routes",
        }
        for name in names:
            assert 29_000 < await raw.pttl(name) <= 30_001, name  # ms, rounded up
        assert await eu_cache.put(entry("k", "w", at=clock(), ttl=90))  # extends to the latest
        assert await eu_cache.put(entry("k", "v", at=clock(), ttl=10))  # shortens v only
        assert 89_000 < await raw.pttl("geogate:cache:eu:k:k") <= 90_001
        assert 89_000 < await raw.pttl("geogate:cache:eu:t:acme") <= 90_001
        blob = await raw.hget("geogate:cache:eu:k:k", "d:w")
        assert isinstance(blob, bytes)
        assert decode_entry(blob) == await eu_cache.get("k", "w")
    finally:
        await raw.aclose()


@pytest.mark.redis
async def test_redis_drops_expired_and_surplus_variants_on_put(
    eu_cache: RedisCache, redis_server: RedisServer, clock: EpochClock
) -> None:
    raw = raw_client(redis_server)
    try:
        assert await eu_cache.put(entry("k", "a", at=clock(), ttl=5))
        assert await eu_cache.put(entry("k", "b", at=clock(), ttl=50))
        clock.advance(6)  # "a" expired by the gateway's clock
        assert await eu_cache.put(entry("k", "c", at=clock(), ttl=20))
        assert sorted(await raw.hkeys("geogate:cache:eu:k:k")) == [b"d:b", b"d:c", b"i:b", b"i:c"]
        assert await eu_cache.put(entry("k", "d", at=clock(), ttl=30))  # max_variants = 2
        assert sorted(e.variant for e in await eu_cache.variants("k")) == ["b", "d"]  # c: soonest
    finally:
        await raw.aclose()


@pytest.mark.redis
async def test_zone_wide_redis_purge_leaves_nothing(
    eu_cache: RedisCache, redis_server: RedisServer, clock: EpochClock
) -> None:
    for e in population(clock()):
        await eu_cache.put(e)
    raw = raw_client(redis_server)
    try:
        await raw.set("someone-else:key", "kept")  # outside the prefix: not ours to touch
        assert await eu_cache.purge(zone="eu") == 6
        assert await raw.keys("*") == [b"someone-else:key"]
    finally:
        await raw.aclose()


def test_redis_cache_refuses_clients_and_zones_it_cannot_serve() -> None:
    with pytest.raises(ValueError, match="decode"):
        RedisCache("eu", Redis(decode_responses=True))
    with pytest.raises(ValueError, match="zone"):
        RedisCache("eu:west", Redis())


# ---------------------------------------------------------------------------------------
# Residency: an eu entry lives only in the eu Redis


@pytest.fixture
def us_server() -> Iterator[RedisServer]:
    try:
        server = RedisServer()
    except FileNotFoundError:
        pytest.skip("redis-server is not installed")
    with server:
        yield server


def breakers(manual_clock: ManualClock, *zones: str) -> dict[str, Breaker]:
    return {
        z: Breaker(f"cache {z}", fail_max=2, reset_timeout=5.0, clock=manual_clock) for z in zones
    }


@pytest.fixture
async def two_zones(
    redis_server: RedisServer, us_server: RedisServer, clock: EpochClock, manual_clock: ManualClock
) -> AsyncIterator[ZoneCaches]:
    l1 = MemoryCache(max_bytes=64 * KIB, max_entry_bytes=8 * KIB, clock=clock)
    l2 = {
        "eu": RedisCache.from_url("eu", redis_server.url, clock=clock),
        "us": RedisCache.from_url("us", us_server.url, clock=clock),
    }
    caches = ZoneCaches(l1, l2, breakers=breakers(manual_clock, "eu", "us"))
    try:
        for cache in l2.values():
            await cache.client.ping()  # connect now: the budget is for commands
        yield caches
    finally:
        await caches.close()


async def all_keys(server: RedisServer) -> list[bytes]:
    raw = raw_client(server)
    try:
        return [k async for k in raw.scan_iter(match="*")]
    finally:
        await raw.aclose()


@pytest.mark.redis
async def test_an_eu_entry_is_written_to_and_read_from_the_eu_redis_only(
    two_zones: ZoneCaches, redis_server: RedisServer, us_server: RedisServer, clock: EpochClock
) -> None:
    caches, eu_entry = two_zones, entry("k", "v", at=clock())
    await caches.put(eu_entry)
    eu_keys = await all_keys(redis_server)
    assert b"geogate:cache:eu:k:k" in eu_keys
    assert await all_keys(us_server) == []
    assert await caches.get("eu", "k", "v") == eu_entry  # from L1
    assert await caches.get("us", "k", "v") is None  # L1 checks the zone too
    assert await caches.variants("us", "k") == []

    caches.l1.clear()
    assert await caches.get("us", "k", "v") is None  # the us Redis never had it
    assert await caches.variants("us", "k") == []
    assert caches.snapshot()["l2"]["us"]["calls_total"] == 4  # type: ignore[index]
    assert await caches.get("eu", "k", "v") == eu_entry  # from the eu Redis, promoted
    assert caches.l1.get("k", "v") == eu_entry
    assert await caches.get("us", "k", "v") is None

    us_cache = caches.l2("us")
    assert us_cache is not None
    with pytest.raises(ValueError, match="residency"):
        await us_cache.put(eu_entry)
    assert not await caches.put_l2(entry("k", "v", at=clock(), zone="ap"))  # no L2 for ap
    assert await all_keys(us_server) == []
    assert sorted(await all_keys(redis_server)) == sorted(eu_keys)


@pytest.mark.redis
async def test_an_entry_of_another_zone_found_in_a_redis_is_not_served(
    two_zones: ZoneCaches,
    us_server: RedisServer,
    clock: EpochClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As if the us config pointed at the eu Redis: what is read back is checked too."""
    us_cache = two_zones.l2("us")
    assert us_cache is not None
    raw = raw_client(us_server)
    try:
        blob = encode_entry(entry("k", "v", at=clock(), zone="eu"))
        await raw.hset(us_cache.entry_key("k"), mapping={"d:v": blob})
    finally:
        await raw.aclose()
    assert await us_cache.get("k", "v") is None
    assert await us_cache.variants("k") == []
    assert await two_zones.get("us", "k", "v") is None
    assert await two_zones.variants("us", "k") == []
    assert us_cache.foreign_total == 4
    assert "an entry of zone 'eu' in zone 'us'" in caplog.text


def test_an_l2_filed_under_another_zone_is_refused() -> None:
    l1 = MemoryCache(max_bytes=KIB, max_entry_bytes=KIB)
    with pytest.raises(ValueError, match="residency"):
        ZoneCaches(l1, {"us": RedisCache("eu", Redis())})


@pytest.mark.redis
async def test_purge_reaches_every_zone_or_only_the_named_one(
    two_zones: ZoneCaches, clock: EpochClock
) -> None:
    caches = two_zones
    for zone in ("eu", "us"):
        await caches.put(entry("k", at=clock(), zone=zone, tenant="acme"))
        await caches.put(entry(f"only-{zone}", at=clock(), zone=zone, tenant="acme"))
    assert await caches.purge(tenant="acme", zone="us") == 2 + 2  # L1 and us L2
    assert await caches.get("us", "k") is None
    assert await caches.get("eu", "k") is not None
    assert await caches.purge(key="k") == 1 + 1  # L1 and eu L2 (us: already gone)
    await caches.put(entry("k", "a", at=clock(), zone="us"))
    await caches.put(entry("k", "b", at=clock(), zone="us"))
    await caches.put(entry("k", "a", at=clock(), zone="eu"))
    assert await caches.invalidate("us", "k") == 2 + 2  # L1 and us L2; eu untouched
    assert await caches.get("us", "k", "b") is None
    assert await caches.get("eu", "k", "a") is not None
    caches.l1.clear()
    assert await caches.get("eu", "only-eu") is not None
    assert await caches.get("eu", "k") is None


# ---------------------------------------------------------------------------------------
# ZoneCaches when Redis is in trouble


def test_without_redis_l1_is_the_whole_cache(clock: EpochClock) -> None:
    async def scenario() -> None:
        caches = ZoneCaches(MemoryCache(max_bytes=64 * KIB, max_entry_bytes=KIB, clock=clock))
        e = entry(at=clock())
        await caches.put(e)
        assert await caches.get("eu", "k1") == e
        assert await caches.variants("eu", "k1") == [e]
        assert await caches.purge(route_prefix="/") == 1
        snap = caches.snapshot()
        assert snap["l2"] == {}
        assert snap["l1"]["stored_bytes"] == 0  # type: ignore[index]
        await caches.close()

    asyncio.run(scenario())


@pytest.fixture
async def eu_only(
    redis_server: RedisServer, clock: EpochClock, manual_clock: ManualClock
) -> AsyncIterator[tuple[ZoneCaches, list[tuple[str, bool]]]]:
    events: list[tuple[str, bool]] = []
    caches = ZoneCaches(
        MemoryCache(max_bytes=64 * KIB, max_entry_bytes=8 * KIB, clock=clock),
        {"eu": RedisCache.from_url("eu", redis_server.url, clock=clock)},
        call_timeout=0.05,
        hang_timeout=0.1,
        purge_timeout=0.1,
        breakers=breakers(manual_clock, "eu"),
        on_degraded=lambda zone, degraded: events.append((zone, degraded)),
    )
    l2 = caches.l2("eu")
    assert l2 is not None
    await l2.client.ping()
    try:
        yield caches, events
    finally:
        if redis_server.pid is not None:
            redis_server.resume()  # a stopped server would hold up the client's close
        await caches.close()


@pytest.mark.redis
async def test_killed_redis_is_a_fast_miss_and_the_breaker_keeps_it_out(
    eu_only: tuple[ZoneCaches, list[tuple[str, bool]]],
    redis_server: RedisServer,
    clock: EpochClock,
    manual_clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caches, events = eu_only
    caplog.set_level(logging.INFO, logger="geogate.cache")
    e = entry("k", at=clock())
    await caches.put(e)
    caches.l1.clear()
    redis_server.kill()

    for _ in range(6):
        found, took = await timed(caches.get("eu", "k"))
        assert found is None
        assert took < BUDGET
    stored, took = await timed(caches.put_l2(entry("k2", at=clock())))
    assert not stored
    assert took < BUDGET
    await caches.put(entry("k3", at=clock()))  # no exception; L1 still takes it
    assert caches.l1.get("k3") is not None
    l2 = caches.snapshot()["l2"]["eu"]  # type: ignore[index]
    assert l2["calls_total"] == 1 + 2  # the put, then fail_max = 2 failures; then kept out
    assert l2["refused_total"] == 4 + 2
    assert l2["degraded"] is True
    assert l2["breaker"]["state"] == "open"
    assert events == [("eu", True)]
    with pytest.raises(PurgeIncomplete) as info:  # an admin purge says what it missed
        await caches.purge(key="k3")
    assert info.value.removed == 1  # L1
    assert list(info.value.failed) == ["eu"]
    caches.put_l1(entry("k3", at=clock()))
    assert await caches.invalidate("eu", "k3") == 1  # the request path: L1 only, no raise
    assert caches.snapshot()["l2"]["eu"]["refused_total"] == 4 + 2 + 1  # type: ignore[index]

    await asyncio.to_thread(redis_server.restart)  # empty dataset
    l2_cache = caches.l2("eu")
    assert l2_cache is not None
    await l2_cache.client.ping()  # reconnect outside the budget
    assert await caches.get("eu", "k") is None  # still OPEN: not asked
    manual_clock.advance(5.0)  # reset_timeout: one trial goes to Redis
    assert await caches.put_l2(e)
    caches.l1.clear()
    assert await caches.get("eu", "k") == e
    assert events == [("eu", True), ("eu", False)]
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in messages] == [logging.WARNING, logging.INFO]
    assert "zone eu Redis unavailable" in messages[0][1]


@pytest.mark.redis
async def test_hung_redis_is_cut_off_by_the_call_budget(
    eu_only: tuple[ZoneCaches, list[tuple[str, bool]]], redis_server: RedisServer, clock: EpochClock
) -> None:
    caches, events = eu_only
    await caches.put(entry("k", at=clock()))
    caches.l1.clear()
    redis_server.pause()  # SIGSTOP: the socket stays open, nothing answers
    for call in (
        caches.get("eu", "k"),
        caches.variants("eu", "k"),
        caches.put_l2(entry(at=clock())),
    ):
        result, took = await timed(call)
        assert not result
        assert 0.045 <= took < BUDGET  # waited out its 50 ms budget, no more
    assert caches.breaker("eu").state is BreakerState.CLOSED  # type: ignore[union-attr]
    async with asyncio.timeout(5):
        await caches.settle()  # late calls are judged: hung past hang_timeout, failures
    assert caches.breaker("eu").state is BreakerState.OPEN  # type: ignore[union-attr]
    assert "no answer within 0.1 s" in str(caches.snapshot()["l2"]["eu"]["last_error"])  # type: ignore[index]
    found, took = await timed(caches.get("eu", "k"))
    assert found is None
    assert took < 0.01  # OPEN: Redis is not asked at all
    assert events == [("eu", True)]
    assert repr(caches).endswith("l2=[eu=degraded]>")
