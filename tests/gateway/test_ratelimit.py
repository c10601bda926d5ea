"""The rate-limit stage in a real gateway, in process and against a real redis-server.

The upstream is a loopback aiohttp server answering like an OpenAI-compatible backend (JSON
with ``usage``, or SSE ending in a usage chunk when asked); the gateway is configured from
YAML with two tenants.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from gateway.config import load_config
from gateway.server import GatewayServer
from gateway.tenants import hash_key
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]

ROOT = Path(__file__).resolve().parents[2]
DB = ROOT / "tests" / "data" / "geodb" / "GeoIP2-Country-Test.mmdb"
KEY_A, KEY_B = "gg_tenant-a-key", "gg_tenant-b-key"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


async def upstream_handler(request: web.BaseRequest) -> web.StreamResponse:
    body = orjson.loads(await request.read()) if request.body_exists else {}
    if request.path == "/hold":
        await asyncio.sleep(0.3)
    if body.get("stream"):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for word in ("Hello", " there"):
            chunk = {"choices": [{"index": 0, "delta": {"content": word}}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if body.get("stream_options", {}).get("include_usage"):
            usage = {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 90,
                                              "total_tokens": 100}}  # fmt: skip
            await resp.write(b"data: " + orjson.dumps(usage) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    return web.json_response({"ok": True, "usage": {"total_tokens": 100}})


Factory = Callable[..., Awaitable[tuple[str, GatewayServer]]]


@pytest.fixture
async def make(aiohttp_raw_server: Any, tmp_path: Path) -> AsyncIterator[Factory]:
    up = await aiohttp_raw_server(upstream_handler)
    started: list[GatewayServer] = []

    async def factory(
        policy: dict[str, Any], *, redis_url: str | None = None, call_timeout: str = "20ms"
    ) -> tuple[str, GatewayServer]:
        raw = {
            "gateway": {"region": "us-east-1", "listen": "127.0.0.1:0", "geodb": str(DB)},
            "residency": {"default_zone": "global", "zones": {"global": {}}},
            "regions": {"us-east-1": {"zones": ["global"],
                                      "endpoints": [f"http://127.0.0.1:{up.port}"]}},
            "routes": [{"prefix": "/", "auth": "required", "rate_limit": "p"}],
            "rate_limits": {"p": policy},
            "tenants": [{"id": "a", "keys": [hash_key(KEY_A)]},
                        {"id": "b", "keys": [hash_key(KEY_B)]}],
            "upstream": {"health": {"enabled": False}},
            "redis": {"control": redis_url, "call_timeout": call_timeout,
                      "breaker_reset_timeout": "200ms"},
        }  # fmt: skip
        path = tmp_path / f"gw{len(started)}.yaml"
        path.write_text(yaml.safe_dump(raw))
        server = GatewayServer(load_config(path))
        await server.start()
        started.append(server)
        host, port = server.bound[0]
        return f"http://{host}:{port}", server

    yield factory
    for server in started:
        await server.stop(0)


async def statuses(base: str, headers: dict[str, str], n: int, path: str = "/x") -> list[int]:
    async with aiohttp.ClientSession() as session:
        out = []
        for _ in range(n):
            async with session.post(f"{base}{path}", json={}, headers=headers) as resp:
                await resp.read()
                out.append(resp.status)
        return out


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "memory":
        return None
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


async def test_429_carries_retry_after_and_ratelimit_fields(
    make: Factory, store_url: str | None
) -> None:
    base, server = await make({"requests_per_second": 1, "burst": 3}, redis_url=store_url)
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(f"{base}/x", json={}, headers=A) as resp:
                assert resp.status == 200
                assert resp.headers["RateLimit-Policy"] == '"p-rps";q=3;w=3'
                assert resp.headers["RateLimit"].startswith('"p-rps";r=')
        async with session.post(f"{base}/x", json={}, headers=A) as resp:
            assert resp.status == 429
            assert resp.content_type == "application/problem+json"
            assert resp.headers["Retry-After"] == "1"
            assert resp.headers["RateLimit-Policy"] == '"p-rps";q=3;w=3'
            assert resp.headers["RateLimit"] == '"p-rps";r=0;t=1'
            problem = orjson.loads(await resp.read())
    assert problem["status"] == 429
    assert 0 < problem["retry_after"] <= 1
    sample = server.metrics.registry.get_sample_value
    labels = {"route": "/", "policy": "p"}
    assert sample("geogate_ratelimit_decisions_total", {**labels, "result": "allowed"}) == 3
    assert sample("geogate_ratelimit_decisions_total", {**labels, "result": "limited"}) == 1


async def test_tenants_are_isolated(make: Factory, store_url: str | None) -> None:
    base, _ = await make({"requests_per_second": 0.1, "burst": 2}, redis_url=store_url)
    assert await statuses(base, A, 4) == [200, 200, 429, 429]
    assert await statuses(base, B, 2) == [200, 200]  # a's exhaustion costs b nothing


async def test_requests_per_minute_and_refunds(make: Factory) -> None:
    base, _ = await make({"requests_per_second": 100, "burst": 100, "requests_per_minute": 3})
    assert await statuses(base, A, 5) == [200, 200, 200, 429, 429]


async def test_concurrency_limit_frees_slots_after_the_answer(make: Factory) -> None:
    base, server = await make({"concurrent": 2})
    async with aiohttp.ClientSession() as session:

        async def one() -> int:
            async with session.post(f"{base}/hold", json={}, headers=A) as resp:
                await resp.read()
                return resp.status

        results = await asyncio.gather(*(one() for _ in range(4)))
        assert sorted(results) == [200, 200, 429, 429]
        await server.tasks.drain(1.0)  # slot releases run after the answer
        assert await one() == 200


async def test_tokens_per_minute_are_reconciled_from_usage(make: Factory) -> None:
    # 100 tokens are used per request; the reservation is prompt/4 + max_tokens (10)
    base, _ = await make({"tokens_per_minute": 250, "default_max_tokens": 10})
    async with aiohttp.ClientSession() as session:
        results = []
        for _ in range(4):
            async with session.post(
                f"{base}/v1/chat/completions", json={"max_tokens": 10}, headers=A
            ) as resp:
                await resp.read()
                results.append(resp.status)
            await asyncio.sleep(0.05)  # let the reconciliation land
    # reserve ~10, charged 100 after each answer: 250 tokens admit three requests, not 25
    assert results == [200, 200, 200, 429]


async def test_streamed_usage_is_asked_for_and_stripped(make: Factory) -> None:
    base, _ = await make({"tokens_per_minute": 250, "default_max_tokens": 10})
    body = {"stream": True, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        results = []
        for _ in range(4):
            async with session.post(f"{base}/v1/chat/completions", json=body, headers=A) as r:
                text = await r.read()
                results.append(r.status)
                if r.status == 200:
                    assert b'"usage"' not in text  # the client did not ask for it
                    assert text.endswith(b"data: [DONE]\n\n")
            await asyncio.sleep(0.05)
    assert results == [200, 200, 200, 429]


@pytest.mark.redis
async def test_redis_killed_mid_test_falls_back_locally_without_a_500(
    make: Factory, redis_server: RedisServer
) -> None:
    policy = {"requests_per_second": 0.01, "burst": 4, "local_share": 0.5}
    base, server = await make(policy, redis_url=redis_server.url)
    assert await statuses(base, A, 2) == [200, 200]
    redis_server.kill()
    got = await statuses(base, A, 6)
    assert 500 not in got
    assert got[:2] == [200, 200]  # local fallback: half of the burst of 4
    assert set(got[2:]) == {429}
    sample = server.metrics.registry.get_sample_value
    fallback = sample(
        "geogate_ratelimit_decisions_total", {"route": "/", "policy": "p", "result": "fallback"}
    )
    assert fallback == 2


@pytest.mark.redis
async def test_fail_closed_policy_refuses_while_redis_is_down(
    make: Factory, redis_server: RedisServer
) -> None:
    policy = {"requests_per_second": 10, "burst": 10, "on_redis_trouble": "closed"}
    base, _ = await make(policy, redis_url=redis_server.url)
    assert await statuses(base, A, 1) == [200]
    redis_server.pause()  # a Redis that hangs: the 20 ms budget holds
    try:
        started = asyncio.get_running_loop().time()
        got = await statuses(base, A, 3)
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        redis_server.resume()
    assert got == [503, 503, 503]
    assert elapsed < 2.0  # never a stall: each answer within the call budget (+ slack)


@pytest.mark.redis
async def test_two_gateways_share_one_limit_through_redis(
    make: Factory, redis_server: RedisServer
) -> None:
    policy = {"requests_per_second": 0.01, "burst": 4}
    one, _ = await make(policy, redis_url=redis_server.url)
    two, _ = await make(policy, redis_url=redis_server.url)
    got = await statuses(one, A, 3) + await statuses(two, A, 3)
    assert got.count(200) == 4


async def test_bodyless_requests_reserve_no_tokens_and_large_bodies_are_not_buffered(
    make: Factory,
) -> None:
    base, _ = await make({"tokens_per_minute": 300, "default_max_tokens": 100})
    async with aiohttp.ClientSession() as session:
        for _ in range(5):  # 5 x 100 would exceed 300 if GETs reserved tokens
            async with session.get(f"{base}/x", headers=A) as resp:
                assert resp.status == 200

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(40):  # 2.5 MiB, chunked: estimated from nothing, never read whole
                yield b"{" + b" " * 65534 + b"}"

        async with session.post(f"{base}/x", data=chunks(), headers=A) as resp:
            assert resp.status < 500  # the upstream's own answer (its 413); no gateway error
            assert resp.headers.get("X-Request-Id")
