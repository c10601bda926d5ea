"""The ``http`` cache policy in a real gateway in front of a scripted origin on loopback."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.config import load_config
from gateway.server import GatewayServer

ROOT = Path(__file__).resolve().parents[2]
DB = ROOT / "tests" / "data" / "geodb" / "GeoIP2-Country-Test.mmdb"
GB, US = "81.2.69.142", "216.160.83.56"


class Origin:
    """Answers per path with scripted caching headers; counts what it was asked."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.seen: list[web.BaseRequest] = []
        self.gate: asyncio.Event | None = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.calls[request.path] += 1
        self.seen.append(request)
        await request.read()
        if request.path == "/slow" and self.gate is not None:
            await self.gate.wait()
        if request.path == "/etag":
            if request.headers.get("If-None-Match") == '"v1"':
                return web.Response(
                    status=304, headers={"ETag": '"v1"', "Cache-Control": "max-age=0"}
                )
            return web.Response(
                text="tagged", headers={"ETag": '"v1"', "Cache-Control": "max-age=0"}
            )
        headers = {
            "/fresh": {"Cache-Control": "max-age=60"},
            "/slow": {"Cache-Control": "max-age=60"},
            "/nostore": {"Cache-Control": "no-store"},
            "/vary": {"Cache-Control": "max-age=60", "Vary": "Accept-Language"},
            "/sie": {"Cache-Control": "max-age=0, stale-if-error=60"},
            "/swr": {"Cache-Control": "max-age=1, stale-while-revalidate=60"},
        }.get(request.path, {})
        language = request.headers.get("Accept-Language", "")
        body = f"{request.path} {self.calls[request.path]} {language}"
        return web.Response(text=body, headers=headers)


Factory = Callable[[], Awaitable[str]]
ADMIN: dict[str, str] = {}  # gateway URL -> its admin URL


@pytest.fixture
async def origin(aiohttp_raw_server: Any) -> tuple[Origin, Any]:
    o = Origin()
    server = await aiohttp_raw_server(o.handle)
    return o, server


@pytest.fixture
async def gw(origin: tuple[Origin, Any], tmp_path: Path) -> AsyncIterator[str]:
    _, server = origin
    raw = {
        "gateway": {"region": "us-east-1", "listen": "127.0.0.1:0", "geodb": str(DB),
                    "trusted_proxies": ["127.0.0.0/8"]},
        "residency": {"default_zone": "global", "zones": {"eu": {"countries": ["GB"]},
                      "us": {"countries": ["US"]}, "global": {}}},
        "regions": {"us-east-1": {"zones": ["us", "eu", "global"],
                                  "endpoints": [f"http://127.0.0.1:{server.port}"]}},
        "routes": [{"prefix": "/", "cache": {"policy": "http"}}],
        "upstream": {"health": {"enabled": False}},
        "admin": {"listen": "127.0.0.1:0"},
    }  # fmt: skip
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(raw))
    gateway = GatewayServer(load_config(path))
    await gateway.start()
    host, port = gateway.bound[0]
    admin_host, admin_port = gateway.admin_bound[0]
    ADMIN[f"http://{host}:{port}"] = f"http://{admin_host}:{admin_port}"
    yield f"http://{host}:{port}"
    await gateway.stop(0)


async def get(base: str, path: str, **headers: str) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as s, s.get(f"{base}{path}", headers=headers) as r:
        return r.status, dict(r.headers), await r.text()


async def test_fresh_response_is_served_from_cache_with_age_and_cache_status(
    gw: str, origin: tuple[Origin, Any]
) -> None:
    o, _ = origin
    _, first, body1 = await get(gw, "/fresh")
    assert first["Cache-Status"].startswith("geogate; fwd=uri-miss; fwd-status=200; stored")
    status, second, body2 = await get(gw, "/fresh")
    assert status == 200
    assert body2 == body1
    assert second["Cache-Status"].startswith("geogate; hit; ttl=")
    assert int(second["Age"]) >= 0
    assert o.calls["/fresh"] == 1


async def test_no_store_is_never_stored(gw: str, origin: tuple[Origin, Any]) -> None:
    o, _ = origin
    await get(gw, "/nostore")
    await get(gw, "/nostore")
    assert o.calls["/nostore"] == 2


async def test_vary_keeps_variants_apart(gw: str, origin: tuple[Origin, Any]) -> None:
    o, _ = origin
    _, _, en = await get(gw, "/vary", **{"Accept-Language": "en"})
    _, _, de = await get(gw, "/vary", **{"Accept-Language": "de"})
    _, hit, en2 = await get(gw, "/vary", **{"Accept-Language": "en"})
    assert en2 == en
    assert de != en
    assert hit["Cache-Status"].startswith("geogate; hit")
    assert o.calls["/vary"] == 2


async def test_entries_are_partitioned_by_residency_zone(
    gw: str, origin: tuple[Origin, Any]
) -> None:
    o, _ = origin
    await get(gw, "/fresh", **{"X-Forwarded-For": GB})
    _, us, _ = await get(gw, "/fresh", **{"X-Forwarded-For": US})
    assert us["Cache-Status"].startswith("geogate; fwd=uri-miss")  # the eu entry is not theirs
    assert o.calls["/fresh"] == 2


async def test_stale_entry_is_revalidated_and_304_serves_the_stored_body(
    gw: str, origin: tuple[Origin, Any]
) -> None:
    o, _ = origin
    await get(gw, "/etag")
    status, headers, body = await get(gw, "/etag")
    assert status == 200
    assert body == "tagged"
    assert headers["Cache-Status"].startswith("geogate; fwd=stale; fwd-status=304")
    assert o.seen[-1].headers["If-None-Match"] == '"v1"'


async def test_unsafe_method_invalidates(gw: str, origin: tuple[Origin, Any]) -> None:
    o, _ = origin
    await get(gw, "/fresh")
    assert o.calls["/fresh"] == 1
    async with aiohttp.ClientSession() as s, s.post(f"{gw}/fresh", data=b"x") as r:
        assert r.status == 200
    await asyncio.sleep(0.05)  # the invalidation runs after the answer
    _, headers, _ = await get(gw, "/fresh")
    assert headers["Cache-Status"].startswith("geogate; fwd=uri-miss")
    assert o.calls["/fresh"] == 3


async def test_identical_concurrent_misses_are_coalesced(
    gw: str, origin: tuple[Origin, Any]
) -> None:
    o, _ = origin
    o.gate = asyncio.Event()
    tasks = [asyncio.create_task(get(gw, "/slow")) for _ in range(5)]
    await asyncio.sleep(0.1)
    o.gate.set()
    results = await asyncio.gather(*tasks)
    assert o.calls["/slow"] == 1
    assert {r[2] for r in results} == {"/slow 1 "}
    assert sum("collapsed" in r[1]["Cache-Status"] for r in results) == 4


async def test_stale_if_error_serves_the_stale_entry_when_the_origin_is_gone(
    gw: str, origin: tuple[Origin, Any]
) -> None:
    _, server = origin
    _, _, body = await get(gw, "/sie")
    await server.close()
    status, headers, stale = await get(gw, "/sie")
    assert status == 200
    assert stale == body
    assert "stale-if-error" in headers["Cache-Status"]


async def test_only_if_cached_miss_is_504(gw: str) -> None:
    status, _, _ = await get(gw, "/fresh", **{"Cache-Control": "only-if-cached"})
    assert status == 504


async def test_admin_purge_by_route_prefix(gw: str, origin: tuple[Origin, Any]) -> None:
    o, _ = origin
    await get(gw, "/fresh")
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{ADMIN[gw]}/cache/purge", json={"route_prefix": "/"}) as r:
            assert r.status == 200
            assert (await r.json())["removed"] >= 1
        async with s.post(f"{ADMIN[gw]}/cache/purge", json={"colour": "red"}) as r:
            assert r.status == 400
    _, headers, _ = await get(gw, "/fresh")
    assert headers["Cache-Status"].startswith("geogate; fwd=uri-miss")
    assert o.calls["/fresh"] == 2
    async with aiohttp.ClientSession() as s, s.get(f"{ADMIN[gw]}/metrics") as r:
        text = await r.text()
    assert 'geogate_cache_lookups_total{result="miss",zone="global"} 2.0' in text
    assert 'geogate_cache_stored_bytes{tier="l1"}' in text


async def test_stale_while_revalidate_serves_stale_and_refreshes_in_the_background(
    gw: str, origin: tuple[Origin, Any]
) -> None:
    o, _ = origin
    _, _, first = await get(gw, "/swr")
    await asyncio.sleep(1.1)  # max-age=1 has passed; stale-while-revalidate=60 has not
    _, stale_headers, stale = await get(gw, "/swr")
    assert stale == first  # served at once from the stale entry
    assert "stale-while-revalidate" in stale_headers["Cache-Status"]
    for _ in range(100):  # the refresh runs in the background
        if o.calls["/swr"] == 2:
            break
        await asyncio.sleep(0.01)
    assert o.calls["/swr"] == 2
    await asyncio.sleep(0.05)
    _, fresh_headers, fresh = await get(gw, "/swr")
    assert fresh_headers["Cache-Status"].startswith("geogate; hit")
    assert fresh == "/swr 2 "  # the refreshed entry
