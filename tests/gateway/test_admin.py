"""The admin listener of an in-process gateway in front of scripted loopback upstreams.

The gateway and upstreams come from test_proxy's fixtures; here the admin listener is on, with
a token, a tenant and a tight rate limit, so each of /status's window counters can be driven
through the real request path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from gateway.admin import REDACTED, build_admin_app, redacted_config
from gateway.config import load_config
from gateway.server import GatewayServer
from gateway.tenants import hash_key
from tests.gateway.test_proxy import (
    COUNTRY_TEST_DB,
    GB,
    SERVERS,
    GatewayFactory,
    Upstream,
    client,
    make_gateway,
    upstreams,
)

__all__ = ["client", "make_gateway", "upstreams"]  # fixtures, re-used

TOKEN = "admin-test-token"
KEY = "gg_admin_test_tenant_key"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# the only GETs a caller without the token may make: scrapers, probes, the (data-free) page
OPEN = {"/metrics", "/ready", "/live", "/", "/ui"}


@pytest.fixture
async def gw(make_gateway: GatewayFactory, upstreams: dict[str, Upstream]) -> tuple[str, str]:
    """(gateway URL, admin URL): admin token, tenant ``t`` with 3 requests of burst at 1/s."""
    url = await make_gateway(
        {r: [u.url] for r, u in upstreams.items()},
        route_extra={"auth": "required", "rate_limit": "tight", "cache": {"policy": "http"}},
        extra={
            "admin": {"listen": "127.0.0.1:0", "token": TOKEN},
            "rate_limits": {"tight": {"requests_per_second": 1, "burst": 3}},
            "tenants": [{"id": "t", "keys": [hash_key(KEY)]}],
        },
    )
    host, port = SERVERS[url].admin_bound[0]
    return url, f"http://{host}:{port}"


def _routes(server: GatewayServer) -> list[tuple[str, str]]:
    """(method, concrete path) of every admin route (HEAD twins of GETs left out)."""
    app = build_admin_app(server, TOKEN)
    out = []
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        path = route.resource.canonical if route.resource else ""
        out.append((route.method, re.sub(r"\{[^}]+\}", "eu-west-1", path)))
    return out


async def test_every_admin_route_but_open_gets_needs_the_token(
    gw: tuple[str, str], client: aiohttp.ClientSession
) -> None:
    url, admin = gw
    routes = _routes(SERVERS[url])
    assert {("GET", "/status"), ("GET", "/config"), ("GET", "/"), ("GET", "/metrics")} <= set(
        routes
    )
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            async with client.request(method, f"{admin}{path}", headers=headers) as resp:
                body = await resp.read()
                if method == "GET" and path in OPEN:
                    assert resp.status == 200, (method, path)
                    continue
                assert resp.status == 401, (method, path, headers)
                assert resp.headers["WWW-Authenticate"] == 'Bearer realm="geogate-admin"'
                assert orjson.loads(body)["status"] == 401
    async with client.get(f"{admin}/status", headers=AUTH) as resp:
        assert resp.status == 200


async def test_status_page_is_static_html_under_a_strict_csp(
    gw: tuple[str, str], client: aiohttp.ClientSession
) -> None:
    _, admin = gw
    async with client.get(f"{admin}/") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        page = await resp.text()
        csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp
    assert "connect-src 'self'" in csp
    assert "'unsafe-inline'" not in csp
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/]{43}='", csp)
    assert "eu-west-1" not in page  # the page holds no data; /status (with the token) does
    for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write"):
        assert sink not in page  # values go in as text only


async def test_status_shows_state_and_window_counts_from_the_request_path(
    gw: tuple[str, str], client: aiohttp.ClientSession
) -> None:
    url, admin = gw
    headers = {"X-Forwarded-For": GB, "Authorization": f"Bearer {KEY}"}
    statuses = []
    for path in ("/a", "/b", "/status/503", "/c"):  # burst 3: the fourth is refused
        async with client.get(f"{url}{path}", headers=headers) as resp:
            statuses.append(resp.status)
    assert statuses == [200, 200, 503, 429]
    async with client.get(f"{admin}/status", headers=AUTH) as resp:
        status = orjson.loads(await resp.read())
    assert status["config_version"] == getattr(SERVERS[url], "config_version", None)
    eu_west = status["regions"]["eu-west-1"]
    assert eu_west["zones"] == ["eu", "global"]
    assert eu_west["drained"] is False
    assert eu_west["endpoints"][0]["breaker"]["state"] == "closed"
    window = status["window"]
    assert window["window_s"] == 60
    eu = window["zones"]["eu"]
    assert (eu["requests"], eu["errors"], eu["rate_limited"]) == (4, 1, 1)
    assert eu["cache_lookups"] == 3  # the 429 never reached the cache stage
    assert eu["cache_hits"] == 0
    assert eu["requests_per_s"] > 0
    assert eu["p99_ms"] is not None
    assert eu["p99_ms"] > 0
    region = window["regions"]["eu-west-1"]
    assert (region["requests"], region["errors"]) == (3, 1)  # the 429 reached no region
    assert "us-east-1" not in window["regions"]
    assert window["all"]["requests"] == 4


async def test_config_route_redacts_the_token(
    gw: tuple[str, str], client: aiohttp.ClientSession
) -> None:
    _, admin = gw
    async with client.get(f"{admin}/config", headers=AUTH) as resp:
        assert resp.status == 200
        text = await resp.text()
    config = orjson.loads(text)
    assert config["admin"]["token"] == REDACTED
    assert config["tenants"][0]["keys"] == [REDACTED]
    assert config["gateway"]["region"] == "us-east-1"
    assert TOKEN not in text
    assert hash_key(KEY) not in text


async def test_redacted_config_hides_every_secret_and_keeps_the_rest(tmp_path: Path) -> None:
    raw: dict[str, Any] = {
        "gateway": {"region": "us-east-1", "geodb": str(COUNTRY_TEST_DB)},
        "residency": {"default_zone": "global", "zones": {"eu": {"countries": ["GB"]},
                      "global": {}}},
        "regions": {"us-east-1": {"zones": ["eu", "global"],
                                  "endpoints": ["http://127.0.0.1:9"]}},
        "routes": [{"prefix": "/"}],
        "admin": {"listen": "127.0.0.1:0", "token": "s3cret-admin"},
        "tenants": [{"id": "a", "keys": [hash_key("k1"), hash_key("k2")]}],
        "redis": {"control": "redis://:s3cret-pw@127.0.0.1:6379/0",
                  "cache": {"eu": "rediss://user:s3cret-2@redis.eu.example:6380/1",
                            "global": "redis://127.0.0.1:6379/2"}},
    }  # fmt: skip
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = redacted_config(GatewayServer(load_config(path)))
    assert "s3cret" not in orjson.dumps(config).decode()
    assert config["admin"] == {"listen": {"host": "127.0.0.1", "port": 0}, "token": REDACTED}
    assert config["tenants"][0]["keys"] == [REDACTED, REDACTED]
    assert config["tenants"][0]["id"] == "a"
    assert config["redis"]["control"] == "redis://:***@127.0.0.1:6379/0"
    assert config["redis"]["cache"] == {
        "eu": "rediss://user:***@redis.eu.example:6380/1",
        "global": "redis://127.0.0.1:6379/2",
    }
    assert config["gateway"]["geodb"] == str(COUNTRY_TEST_DB)
