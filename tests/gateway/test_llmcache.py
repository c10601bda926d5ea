"""The ``llm-exact`` cache policy in a real gateway in front of the real backend app.

The origin is ``backend.app.build_app`` (offline model) on loopback, with a middleware that
counts the model calls; the clients are the official openai client and LangServe's
RemoteRunnable where the issue asks for byte-valid replays.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp import web

from backend.app import build_app
from backend.settings import BackendSettings
from gateway.config import load_config
from gateway.server import GatewayServer
from gateway.tenants import hash_key
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
DB = ROOT / "tests" / "data" / "geodb" / "GeoIP2-Country-Test.mmdb"
GB, US = "81.2.69.142", "216.160.83.56"
KEY_A, KEY_B = "gg_llm-a", "gg_llm-b"
CHAT = {"model": "geogate-chat", "temperature": 0,
        "messages": [{"role": "user", "content": "What is data residency?"}]}  # fmt: skip


@pytest.fixture
async def origin(aiohttp_server: Any) -> tuple[Counter[str], Any]:
    calls: Counter[str] = Counter()

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST":
            calls[request.path] += 1
        return await handler(request)

    app = build_app(BackendSettings(region="us-east-1", zones=("us", "eu", "global")))
    app.middlewares.append(count)
    server = await aiohttp_server(app)
    return calls, server


Make = Callable[..., Awaitable[str]]


@pytest.fixture
async def make(origin: tuple[Counter[str], Any], tmp_path: Path) -> AsyncIterator[Make]:
    _, server = origin
    started: list[GatewayServer] = []

    async def factory(**cache: Any) -> str:
        policy = cache.pop("_policy", None)
        raw = {
            "gateway": {"region": "us-east-1", "listen": "127.0.0.1:0", "geodb": str(DB),
                        "trusted_proxies": ["127.0.0.0/8"]},
            "residency": {"default_zone": "global", "zones": {"eu": {"countries": ["GB"]},
                          "us": {"countries": ["US"]}, "global": {}}},
            "regions": {"us-east-1": {"zones": ["us", "eu", "global"],
                                      "endpoints": [f"http://127.0.0.1:{server.port}"]}},
            "routes": [{"prefix": "/", "auth": "optional",
                        "cache": {"policy": "llm-exact", "default_temperature": 0, **cache}}],
            "tenants": [{"id": "a", "keys": [hash_key(KEY_A)]},
                        {"id": "b", "keys": [hash_key(KEY_B)]}],
            "upstream": {"health": {"enabled": False}},
            "redis": {"cache": cache.pop("_redis", {})},
        }  # fmt: skip
        raw["routes"][0]["cache"].pop("_redis", None)
        if policy is not None:
            raw["rate_limits"] = {"p": policy}
            raw["routes"][0]["rate_limit"] = "p"
        path = tmp_path / f"gw{len(started)}.yaml"
        path.write_text(yaml.safe_dump(raw))
        gateway = GatewayServer(load_config(path))
        await gateway.start()
        started.append(gateway)
        host, port = gateway.bound[0]
        return f"http://{host}:{port}"

    yield factory
    for gateway in started:
        await gateway.stop(0)


async def post(
    base: str, path: str, body: dict[str, Any], **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{base}{path}", json=body, headers=headers) as r,
    ):
        return r.status, dict(r.headers), await r.read()


async def test_json_hit_and_stream_replay_from_one_entry(
    make: Make, origin: tuple[Counter[str], Any]
) -> None:
    calls, _ = origin
    base = await make()
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key=KEY_A, max_retries=0)
    first = await client.chat.completions.with_raw_response.create(**CHAT)
    assert first.headers["Cache-Status"].startswith("geogate; fwd=uri-miss")
    second = await client.chat.completions.with_raw_response.create(**CHAT)
    assert second.headers["Cache-Status"].startswith("geogate; hit")
    content = first.parse().choices[0].message.content
    assert second.parse().choices[0].message.content == content
    stream = await client.chat.completions.create(
        **CHAT, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert chunks[-1].usage is not None
    assert calls["/v1/chat/completions"] == 1
    await client.close()


async def test_streamed_answer_is_stored_when_it_completes(
    make: Make, origin: tuple[Counter[str], Any]
) -> None:
    calls, _ = origin
    base = await make()
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key=KEY_A, max_retries=0)
    stream = await client.chat.completions.create(**CHAT, stream=True)
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await asyncio.sleep(0.05)  # stored on completion
    again = await client.chat.completions.create(**CHAT)
    assert again.choices[0].message.content == streamed
    assert calls["/v1/chat/completions"] == 1
    await client.close()


async def test_remote_runnable_invoke_then_stream_replay(
    make: Make, origin: tuple[Counter[str], Any]
) -> None:
    calls, _ = origin
    base = await make()
    from langserve import RemoteRunnable

    rag = RemoteRunnable(f"{base}/rag/", headers={"Authorization": f"Bearer {KEY_A}"})
    answer = await rag.ainvoke({"question": "Where is my data stored?"})
    chunks = [c async for c in rag.astream({"question": "Where is my data stored?"})]
    assert "".join(chunks) == answer
    assert calls["/rag/invoke"] == 1
    assert calls["/rag/stream"] == 0  # the replay came from the invoke's entry


async def test_nondeterministic_and_no_store_requests_bypass(
    make: Make, origin: tuple[Counter[str], Any]
) -> None:
    calls, _ = origin
    base = await make()
    hot = {**CHAT, "temperature": 0.7}
    for _ in range(2):
        _, headers, _ = await post(base, "/v1/chat/completions", hot)
        assert headers["Cache-Status"] == "geogate; fwd=bypass; detail=temperature"
    for _ in range(2):  # no-store: nothing is stored, so both go upstream
        _, headers, _ = await post(
            base, "/v1/chat/completions", CHAT, **{"Cache-Control": "no-store"}
        )
        assert headers["Cache-Status"] == "geogate; fwd=request"
    for _ in range(2):  # no-cache: never answered from the cache (but stored)
        _, headers, _ = await post(
            base, "/v1/chat/completions", CHAT, **{"Cache-Control": "no-cache"}
        )
        assert headers["Cache-Status"] == "geogate; fwd=request"
    assert calls["/v1/chat/completions"] == 6
    _, headers, _ = await post(base, "/v1/chat/completions", CHAT)
    assert headers["Cache-Status"].startswith("geogate; hit")  # the no-cache answer was stored


async def test_tenants_do_not_share_entries(make: Make, origin: tuple[Counter[str], Any]) -> None:
    calls, _ = origin
    base = await make()
    await post(base, "/v1/chat/completions", CHAT, Authorization=f"Bearer {KEY_A}")
    _, headers, _ = await post(base, "/v1/chat/completions", CHAT, Authorization=f"Bearer {KEY_B}")
    assert headers["Cache-Status"].startswith("geogate; fwd=uri-miss")
    assert calls["/v1/chat/completions"] == 2


async def test_identical_concurrent_misses_make_one_upstream_call(
    make: Make, origin: tuple[Counter[str], Any]
) -> None:
    calls, _ = origin
    base = await make()
    results = await asyncio.gather(*(post(base, "/v1/chat/completions", CHAT) for _ in range(6)))
    assert {r[0] for r in results} == {200}
    assert calls["/v1/chat/completions"] == 1
    assert sum("collapsed" in r[1]["Cache-Status"] for r in results) == 5


async def test_stale_answer_is_served_when_the_upstream_is_gone(
    make: Make, origin: tuple[Counter[str], Any]
) -> None:
    _, server = origin
    base = await make(ttl="1ms", stale_if_error="60s")
    _, _, fresh = await post(base, "/v1/chat/completions", CHAT)
    await asyncio.sleep(0.01)
    await server.close()
    status, headers, stale = await post(base, "/v1/chat/completions", CHAT)
    assert status == 200
    assert "stale-if-error" in headers["Cache-Status"]
    content = orjson.loads(fresh)["choices"][0]["message"]["content"]
    assert orjson.loads(stale)["choices"][0]["message"]["content"] == content


@pytest.mark.redis
async def test_an_eu_entry_is_only_in_the_eu_redis(make: Make) -> None:
    with RedisServer() as eu, RedisServer() as us:
        base = await make(_redis={"eu": eu.url, "us": us.url})
        status, _, _ = await post(base, "/v1/chat/completions", CHAT, **{"X-Forwarded-For": GB})
        assert status == 200
        await asyncio.sleep(0.1)  # the L2 write runs after the answer
        eu_client, us_client = aioredis.from_url(eu.url), aioredis.from_url(us.url)
        try:
            eu_keys = [k async for k in eu_client.scan_iter("*")]
            us_keys = [k async for k in us_client.scan_iter("*")]
        finally:
            await eu_client.aclose()
            await us_client.aclose()
        assert eu_keys
        assert us_keys == []


async def test_cache_hits_spend_no_tokens(make: Make) -> None:
    # each request reserves ~70 tokens (prompt/4 + max_tokens 64); 600 tokens/min would refuse
    # the ninth if hits were charged: they are refunded, only the one model call counts
    base = await make(_policy={"tokens_per_minute": 600, "default_max_tokens": 64})
    statuses = [
        (await post(base, "/v1/chat/completions", CHAT, Authorization=f"Bearer {KEY_A}"))[0]
        for _ in range(15)
    ]
    assert statuses == [200] * 15
