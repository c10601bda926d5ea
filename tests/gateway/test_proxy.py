"""The gateway in-process in front of scripted loopback upstreams: the proxy's HTTP behaviour.

Each upstream is a real aiohttp server on 127.0.0.1 whose handler is scripted per path
(echo, hop-by-hop headers, SSE, stalls, mid-body cuts). The gateway is the real GatewayServer
listening on an ephemeral loopback port, configured from a YAML file as an operator would.
"""

from __future__ import annotations

import asyncio
import socket
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
from tests.netutil import unresponsive_port

ROOT = Path(__file__).resolve().parents[2]
COUNTRY_TEST_DB = ROOT / "tests" / "data" / "geodb" / "GeoIP2-Country-Test.mmdb"
GB, US, CN, SE = "81.2.69.142", "216.160.83.56", "175.16.199.1", "89.160.20.112"


class Upstream:
    """A scripted upstream of one region; records what it received."""

    def __init__(self, region: str) -> None:
        self.region = region
        self.received: list[dict[str, Any]] = []
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read() if request.path != "/upload-stream" else b""
        if request.path == "/upload-stream":
            async for chunk in request.content.iter_any():
                body += chunk
        self.received.append(
            {"method": request.method, "path": request.path_qs, "headers": request.headers.copy(),
             "body": body, "peer": request.transport.get_extra_info("peername")}
        )  # fmt: skip
        region = {"X-Served-Region": self.region}
        if request.path == "/hop":
            return web.Response(
                text="hop",
                headers={**region, "Connection": "X-Up-Secret", "X-Up-Secret": "1",
                         "Keep-Alive": "timeout=5", "Proxy-Authenticate": "Basic",
                         "X-Normal": "kept"},
            )  # fmt: skip
        if request.path == "/sse":
            resp = web.StreamResponse(headers={**region, "Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b"data: first\n\n")
            try:
                await self.release.wait()  # the test sets it once the client saw "first"
            except asyncio.CancelledError:
                self.cancelled.set()  # the gateway dropped our connection
                raise
            await resp.write(b"data: second\n\n")
            await resp.write_eof()
            return resp
        if request.path == "/stall":
            await asyncio.Event().wait()
        if request.path == "/stall-body":
            resp = web.StreamResponse(headers=region)
            await resp.prepare(request)
            await resp.write(b"partial")
            await asyncio.Event().wait()
        if request.path == "/big":
            resp = web.StreamResponse(headers=region)
            await resp.prepare(request)
            for _ in range(64):
                await resp.write(b"x" * 65536)
            await resp.write_eof()
            return resp
        if request.path == "/flaky" and self.region == "us-east-1":
            extra = {"Retry-After": request.query["ra"]} if "ra" in request.query else {}
            return web.Response(status=503, text="flaky", headers={**region, **extra})
        if request.path == "/status/503":
            return web.Response(status=503, text="busy", headers={**region, "Retry-After": "3"})
        if request.path == "/head-length":
            return web.Response(body=b"12345", headers=region)
        return web.json_response(
            {"method": request.method, "path": request.path_qs, "len": len(body)}, headers=region
        )


@pytest.fixture
async def upstreams(aiohttp_raw_server: Any) -> dict[str, Upstream]:
    out = {}
    for region in ("us-east-1", "eu-west-1"):
        up = Upstream(region)
        server = await aiohttp_raw_server(up.handle)
        up.url = f"http://127.0.0.1:{server.port}"
        out[region] = up
    yield out
    for up in out.values():
        up.release.set()


GatewayFactory = Callable[..., Awaitable[str]]
SERVERS: dict[str, GatewayServer] = {}  # base URL -> server, for tests that look inside


@pytest.fixture
async def make_gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    started: list[GatewayServer] = []

    async def make(
        endpoints: dict[str, list[str]],
        *,
        trusted: tuple[str, ...] = ("127.0.0.0/8",),
        limits: dict[str, Any] | None = None,
        timeouts: dict[str, Any] | None = None,
        route_body_limit: str | None = None,
        header: str = "x-forwarded-for",
        route_extra: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        route: dict[str, Any] = {"prefix": "/", "timeouts": timeouts or {}, **(route_extra or {})}
        if route_body_limit:
            route["max_body_bytes"] = route_body_limit
        raw = {
            "gateway": {
                "region": "us-east-1", "listen": "127.0.0.1:0", "trusted_proxies": list(trusted),
                "geodb": str(COUNTRY_TEST_DB), "limits": limits or {},
                "client_address_header": header,
            },
            "residency": {
                "default_zone": "global",
                "zones": {"eu": {"countries": ["GB", "SE", "DE"]}, "us": {"countries": ["US"]},
                          "cn": {"countries": ["CN"]}, "global": {}},
            },
            "regions": {
                "us-east-1": {"zones": ["us", "global"], "endpoints": endpoints["us-east-1"]},
                "eu-west-1": {"zones": ["eu", "global"], "endpoints": endpoints["eu-west-1"]},
            },
            "routes": [route],
            # probes would add their own requests to what the scripted upstreams record
            "upstream": {"health": {"enabled": False}},
            **(extra or {}),
        }  # fmt: skip
        path = tmp_path / f"gateway-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(raw))
        server = GatewayServer(load_config(path))
        await server.start()
        started.append(server)
        host, port = server.bound[0]
        SERVERS[f"http://{host}:{port}"] = server
        return f"http://{host}:{port}"

    yield make
    for server in started:
        await server.stop(0)


@pytest.fixture
async def gw(make_gateway: GatewayFactory, upstreams: dict[str, Upstream]) -> str:
    return await make_gateway({r: [u.url] for r, u in upstreams.items()})


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def raw_request(base: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (the gateway closes after errors)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if data.startswith(b"HEAD "):
        body = b""
    else:
        body = await reader.read(int(headers.get("content-length", "0")) or -1)
    writer.close()
    return status, headers, body


# --- residency routing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_ip", "zone", "region"),
    [(GB, "eu", "eu-west-1"), (SE, "eu", "eu-west-1"), (US, "us", "us-east-1"),
     ("10.1.2.3", "global", "us-east-1"), ("2001:218::1", "global", "us-east-1")],
)  # fmt: skip
async def test_zone_decides_region(
    gw: str, client: aiohttp.ClientSession, upstreams: dict[str, Upstream],
    client_ip: str, zone: str, region: str,
) -> None:  # fmt: skip
    async with client.get(f"{gw}/echo", headers={"X-Forwarded-For": client_ip}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Served-Region"] == region
        assert resp.headers["X-Residency-Zone"] == zone
    [seen] = upstreams[region].received
    assert seen["headers"]["X-Residency-Zone"] == zone


async def test_zone_without_region_is_451(gw: str, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{gw}/echo", headers={"X-Forwarded-For": CN}) as resp:
        assert resp.status == 451
        assert resp.content_type == "application/problem+json"
        problem = orjson.loads(await resp.read())
    assert problem["zone"] == "cn"
    assert problem["status"] == 451
    assert problem["request_id"] == resp.headers["X-Request-Id"]


async def test_client_sent_residency_header_is_replaced(
    gw: str, client: aiohttp.ClientSession, upstreams: dict[str, Upstream]
) -> None:
    headers = {"X-Forwarded-For": GB, "X-Residency-Zone": "us"}
    async with client.get(f"{gw}/echo", headers=headers) as resp:
        assert resp.headers["X-Served-Region"] == "eu-west-1"
    [seen] = upstreams["eu-west-1"].received
    assert seen["headers"].getall("X-Residency-Zone") == ["eu"]


async def test_spoofed_forwarded_for_from_untrusted_peer_is_ignored(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], client: aiohttp.ClientSession
) -> None:
    base = await make_gateway({r: [u.url] for r, u in upstreams.items()}, trusted=("10.0.0.0/8",))
    spoof = {"X-Forwarded-For": GB, "Forwarded": f"for={GB}"}
    async with client.get(f"{base}/echo", headers=spoof) as resp:
        # the peer 127.0.0.1 is not trusted: its claim to be in GB is ignored -> global zone
        assert resp.headers["X-Residency-Zone"] == "global"
        assert resp.headers["X-Served-Region"] == "us-east-1"
    [seen] = upstreams["us-east-1"].received
    assert seen["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert GB not in seen["headers"]["Forwarded"]


@pytest.mark.parametrize(
    ("header", "zone"), [("x-forwarded-for", "global"), ("forwarded", "eu"), ("both", "eu")]
)
async def test_forwarded_header_is_believed_only_when_configured(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], client: aiohttp.ClientSession,
    header: str, zone: str,
) -> None:  # fmt: skip
    base = await make_gateway({r: [u.url] for r, u in upstreams.items()}, header=header)
    async with client.get(f"{base}/echo", headers={"Forwarded": f'for="{GB}:4711"'}) as resp:
        assert resp.headers["X-Residency-Zone"] == zone


async def test_forwarding_headers_from_trusted_peer_are_extended(
    gw: str, client: aiohttp.ClientSession, upstreams: dict[str, Upstream]
) -> None:
    headers = {"X-Forwarded-For": GB, "Host": "api.example.com", "Via": "1.1 edge"}
    async with client.get(f"{gw}/echo?q=1", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Via"].endswith("1.1 geogate")
    [seen] = upstreams["eu-west-1"].received
    h = seen["headers"]
    assert seen["path"] == "/echo?q=1"
    assert h["X-Forwarded-For"] == f"{GB}, 127.0.0.1"
    assert h["X-Forwarded-Host"] == "api.example.com"
    assert h["X-Forwarded-Proto"] == "http"
    assert h["Forwarded"] == "for=127.0.0.1;proto=http;host=api.example.com"
    assert h["Via"] == "1.1 edge, 1.1 geogate"
    assert h["X-Request-Id"] == resp.headers["X-Request-Id"]


async def test_request_id_is_echoed_when_sane(gw: str, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{gw}/echo", headers={"X-Request-Id": "abc-123"}) as resp:
        assert resp.headers["X-Request-Id"] == "abc-123"
    async with client.get(f"{gw}/echo", headers={"X-Request-Id": "bad id\tx"}) as resp:
        assert resp.headers["X-Request-Id"] != "bad id\tx"
        assert len(resp.headers["X-Request-Id"]) == 32


# --- hop-by-hop ---------------------------------------------------------------------------


async def test_hop_by_hop_and_connection_listed_headers_are_stripped_both_ways(
    gw: str, upstreams: dict[str, Upstream]
) -> None:
    status, headers, body = await raw_request(
        gw,
        b"GET /hop HTTP/1.1\r\nHost: gw\r\nConnection: keep-alive, X-Client-Secret\r\n"
        b"X-Client-Secret: s\r\nKeep-Alive: timeout=9\r\nTE: trailers\r\n"
        b"Proxy-Authorization: Basic abc\r\nUpgrade: h2c\r\nX-Normal: yes\r\n\r\n",
    )
    assert status == 200
    assert body == b"hop"
    assert headers["x-normal"] == "kept"
    for name in ("x-up-secret", "keep-alive", "proxy-authenticate"):
        assert name not in headers
    [seen] = upstreams["us-east-1"].received
    for name in ("X-Client-Secret", "Keep-Alive", "TE", "Proxy-Authorization", "Upgrade"):
        assert name not in seen["headers"]
    assert seen["headers"]["X-Normal"] == "yes"


# --- streaming ----------------------------------------------------------------------------


async def test_sse_passes_through_incrementally(
    gw: str, client: aiohttp.ClientSession, upstreams: dict[str, Upstream]
) -> None:
    up = upstreams["us-east-1"]
    async with client.get(f"{gw}/sse") as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        # the upstream holds "second" back until we saw "first": a buffering proxy would hang
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout=10)
        assert first == b"data: first\n\n"
        up.release.set()
        rest = await asyncio.wait_for(resp.content.read(), timeout=10)
    assert rest == b"data: second\n\n"


async def test_large_response_streams_intact(gw: str, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{gw}/big") as resp:
        body = await resp.read()
    assert len(body) == 64 * 65536


async def test_large_chunked_upload_streams_to_upstream(
    gw: str, client: aiohttp.ClientSession, upstreams: dict[str, Upstream]
) -> None:
    async def gen() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"y" * 65536

    async with client.post(f"{gw}/upload-stream", data=gen()) as resp:
        assert resp.status == 200
        assert (await resp.json())["len"] == 20 * 65536
    [seen] = upstreams["us-east-1"].received
    assert len(seen["body"]) == 20 * 65536


async def test_head_keeps_upstream_content_length(gw: str) -> None:
    status, headers, _ = await raw_request(gw, b"HEAD /head-length HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 200
    assert headers["content-length"] == "5"


async def test_upstream_error_status_passes_through(gw: str, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{gw}/status/503") as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "3"
        assert await resp.text() == "busy"


# --- limits -------------------------------------------------------------------------------


async def test_body_over_content_length_limit_is_413_without_upstream_call(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], client: aiohttp.ClientSession
) -> None:
    base = await make_gateway(
        {r: [u.url] for r, u in upstreams.items()}, limits={"max_body_bytes": "1KiB"}
    )
    async with client.post(f"{base}/echo", data=b"z" * 2048) as resp:
        assert resp.status == 413
        assert resp.content_type == "application/problem+json"
    assert upstreams["us-east-1"].received == []


async def test_chunked_body_over_limit_is_413(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], client: aiohttp.ClientSession
) -> None:
    base = await make_gateway({r: [u.url] for r, u in upstreams.items()}, route_body_limit="100KiB")

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 65536

    async with client.post(f"{base}/upload-stream", data=gen()) as resp:
        assert resp.status == 413


async def test_header_field_too_large_is_431(gw: str) -> None:
    status, headers, body = await raw_request(
        gw, b"GET /echo HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    )
    assert status == 431
    assert headers["content-type"] == "application/problem+json"
    problem = orjson.loads(body)
    assert problem["status"] == 431
    assert problem["request_id"] == headers["x-request-id"]


async def test_too_many_headers_is_431(gw: str) -> None:
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    status, _, _ = await raw_request(gw, b"GET /echo HTTP/1.1\r\nHost: gw\r\n" + fields + b"\r\n")
    assert status == 431


async def test_request_line_too_long_is_414(gw: str) -> None:
    status, _, _ = await raw_request(gw, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 414


@pytest.mark.parametrize(
    "garbage",
    [b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\nHost: gw\r\n\r\n",
     b"GET / HTTP/1.1\r\nHost: gw\r\nContent-Length: -5\r\n\r\n",
     b"GET / HTTP/1.1\r\nHost: gw\r\nBad Header\r\n\r\n"],
)  # fmt: skip
async def test_malformed_http_is_400(gw: str, garbage: bytes) -> None:
    status, headers, _ = await raw_request(gw, garbage)
    assert status == 400
    assert headers["content-type"] == "application/problem+json"


async def test_connect_and_foreign_absolute_form_are_refused(
    gw: str, upstreams: dict[str, Upstream]
) -> None:
    status, _, _ = await raw_request(
        gw, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    )
    assert status in (400, 404, 405)
    status, _, body = await raw_request(
        gw, b"GET http://example.com/echo HTTP/1.1\r\nHost: gw\r\n\r\n"
    )
    assert status == 404
    assert b"not a forward proxy" in body
    assert all(u.received == [] for u in upstreams.values())


# --- upstream failures --------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_connect_failure_is_retried_in_another_region_of_the_zone(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], client: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    base = await make_gateway({"us-east-1": [dead], "eu-west-1": [upstreams["eu-west-1"].url]})
    # zone global: us-east-1 (own region) first, then eu-west-1, which also serves global
    async with client.post(f"{base}/echo", data=b"not idempotent, never sent") as resp:
        assert resp.status == 200
        assert resp.headers["X-Served-Region"] == "eu-west-1"


async def test_connect_failure_with_no_other_endpoint_in_the_zone_is_502(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], client: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    base = await make_gateway({"us-east-1": [dead], "eu-west-1": [upstreams["eu-west-1"].url]})
    async with client.get(f"{base}/echo", headers={"X-Forwarded-For": US}) as resp:
        assert resp.status == 502
        problem = orjson.loads(await resp.read())
    assert problem["type"].endswith("/upstream-connect-error")


async def test_first_byte_timeout_is_504(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], client: aiohttp.ClientSession
) -> None:
    base = await make_gateway(
        {r: [u.url] for r, u in upstreams.items()}, timeouts={"first_byte": "50ms"}
    )
    async with client.get(f"{base}/stall") as resp:
        assert resp.status == 504
        problem = orjson.loads(await resp.read())
    assert problem["phase"] == "first_byte"


async def test_connect_timeout_is_504(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], client: aiohttp.ClientSession
) -> None:
    with unresponsive_port() as port:
        base = await make_gateway(
            {"us-east-1": [f"http://127.0.0.1:{port}"], "eu-west-1": [upstreams["eu-west-1"].url]},
            timeouts={"connect": "100ms"},
        )
        async with client.get(f"{base}/echo", headers={"X-Forwarded-For": US}) as resp:
            assert resp.status == 504
            problem = orjson.loads(await resp.read())
    assert problem["phase"] == "connect"


async def test_idle_timeout_mid_body_cuts_the_connection(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], client: aiohttp.ClientSession
) -> None:
    base = await make_gateway(
        {r: [u.url] for r, u in upstreams.items()}, timeouts={"idle": "100ms"}
    )
    async with client.get(f"{base}/stall-body") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()  # an incomplete body, never a clean end that looks like success


async def test_no_route_is_404(
    make_gateway: GatewayFactory, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    raw = yaml.safe_load((ROOT / "tests" / "config" / "good_minimal.yaml").read_text())
    raw["routes"] = [{"prefix": "/v1/"}]
    raw["gateway"]["geodb"] = str(COUNTRY_TEST_DB)
    path = tmp_path / "only-v1.yaml"
    path.write_text(yaml.safe_dump(raw))
    server = GatewayServer(load_config(path))
    await server.start()
    try:
        host, port = server.bound[0]
        async with client.get(f"http://{host}:{port}/admin") as resp:
            assert resp.status == 404
            assert orjson.loads(await resp.read())["type"].endswith("/route-not-found")
    finally:
        await server.stop(0)


async def test_expect_100_continue_is_answered_before_the_body(
    gw: str, upstreams: dict[str, Upstream]
) -> None:
    host, port = gw.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    [seen] = upstreams["us-east-1"].received
    assert seen["body"] == b"hello"
    assert "Expect" not in seen["headers"]


async def test_upstream_connections_are_pooled(
    gw: str, client: aiohttp.ClientSession, upstreams: dict[str, Upstream]
) -> None:
    for _ in range(10):
        async with client.get(f"{gw}/echo") as resp:
            assert resp.status == 200
            await resp.read()
    peers = {seen["peer"] for seen in upstreams["us-east-1"].received if seen["path"] == "/echo"}
    assert len(peers) == 1  # ten requests, one keep-alive connection to the upstream


# --- retries (zone global: us-east-1, the own region, first; then eu-west-1) ----------------


async def test_idempotent_request_is_retried_on_another_endpoint_of_the_zone(
    gw: str, client: aiohttp.ClientSession, upstreams: dict[str, Upstream]
) -> None:
    async with client.get(f"{gw}/flaky") as resp:
        assert resp.status == 200
        assert resp.headers["X-Served-Region"] == "eu-west-1"
    assert [r["path"] for r in upstreams["us-east-1"].received] == ["/flaky"]


async def test_post_is_not_retried_without_idempotency_key(
    gw: str, client: aiohttp.ClientSession, upstreams: dict[str, Upstream]
) -> None:
    async with client.post(f"{gw}/flaky", data=b"{}") as resp:
        assert resp.status == 503
        assert await resp.text() == "flaky"
    assert upstreams["eu-west-1"].received == []
    async with client.post(f"{gw}/flaky", data=b"{}", headers={"Idempotency-Key": "k1"}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Served-Region"] == "eu-west-1"


async def test_retry_is_never_sent_outside_the_zone(
    gw: str, client: aiohttp.ClientSession, upstreams: dict[str, Upstream]
) -> None:
    # zone us has only us-east-1: the 503 stands, eu-west-1 is never asked
    async with client.get(f"{gw}/flaky", headers={"X-Forwarded-For": US}) as resp:
        assert resp.status == 503
    assert upstreams["eu-west-1"].received == []


async def test_upstream_retry_after_holds_the_endpoint(
    gw: str, client: aiohttp.ClientSession, upstreams: dict[str, Upstream]
) -> None:
    async with client.get(f"{gw}/flaky?ra=30") as resp:
        assert resp.status == 200
    for _ in range(5):
        async with client.get(f"{gw}/echo") as resp:
            assert resp.headers["X-Served-Region"] == "eu-west-1"  # us-east-1 is held 30 s
    assert len(upstreams["us-east-1"].received) == 1


async def test_client_disconnect_cancels_the_upstream_request(
    gw: str, upstreams: dict[str, Upstream]
) -> None:
    async with aiohttp.ClientSession() as session:
        resp = await session.get(f"{gw}/sse")
        assert await resp.content.readuntil(b"\n\n") == b"data: first\n\n"
        resp.close()  # the client leaves mid-stream
    await asyncio.wait_for(upstreams["us-east-1"].cancelled.wait(), timeout=5)
    server = SERVERS[gw]
    endpoint = server.upstreams.endpoints[upstreams["us-east-1"].url]
    for _ in range(100):  # the handler's finally runs right after the cancellation
        if endpoint.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert endpoint.in_flight == 0
    assert endpoint.breaker.snapshot()["failures"] == 0  # leaving is not the upstream's fault


async def test_requests_are_counted_by_route_zone_and_status_class(
    gw: str, client: aiohttp.ClientSession
) -> None:
    for ip in (GB, GB, US, CN):
        async with client.get(f"{gw}/echo", headers={"X-Forwarded-For": ip}) as resp:
            await resp.read()
    registry = SERVERS[gw].metrics.registry
    sample = registry.get_sample_value
    assert (
        sample("geogate_requests_total",
               {"route": "/", "zone": "eu", "region": "eu-west-1", "status_class": "2xx"}) == 2
    )  # fmt: skip
    assert (
        sample("geogate_requests_total",
               {"route": "/", "zone": "us", "region": "us-east-1", "status_class": "2xx"}) == 1
    )  # fmt: skip
    assert (
        sample("geogate_requests_total",
               {"route": "/", "zone": "cn", "region": "none", "status_class": "4xx"}) == 1
    )  # fmt: skip


# --- tenants ---------------------------------------------------------------------------------

KEY_A, KEY_B = "gg_key-of-tenant-a", "gg_key-of-tenant-b"


@pytest.fixture
async def authed(make_gateway: GatewayFactory, upstreams: dict[str, Upstream]) -> str:
    from gateway.tenants import hash_key

    return await make_gateway(
        {r: [u.url] for r, u in upstreams.items()},
        route_extra={"auth": "required"},
        extra={"tenants": [
            {"id": "tenant-a", "keys": [hash_key(KEY_A)]},
            {"id": "tenant-b", "keys": [hash_key(KEY_B)], "residency": "eu"},
        ]},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("headers", "detail"),
    [({}, "send an API key"), ({"Authorization": "Bearer nope"}, "unknown API key"),
     ({"X-API-Key": "nope"}, "unknown API key"), ({"Authorization": "Basic Zm9vOmJhcg=="},
     "send an API key")],
)  # fmt: skip
async def test_missing_or_unknown_key_is_401(
    authed: str, client: aiohttp.ClientSession, upstreams: dict[str, Upstream],
    headers: dict[str, str], detail: str,
) -> None:  # fmt: skip
    async with client.get(f"{authed}/echo", headers=headers) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert detail in orjson.loads(await resp.read())["detail"]
    assert all(u.received == [] for u in upstreams.values())


@pytest.mark.parametrize("header", ["Authorization", "X-API-Key"])
async def test_known_key_is_accepted_and_never_forwarded(
    authed: str, client: aiohttp.ClientSession, upstreams: dict[str, Upstream], header: str
) -> None:
    value = f"Bearer {KEY_A}" if header == "Authorization" else KEY_A
    async with client.get(f"{authed}/echo", headers={header: value, "X-Forwarded-For": US}) as r:
        assert r.status == 200
    [seen] = upstreams["us-east-1"].received
    assert "Authorization" not in seen["headers"]
    assert "X-API-Key" not in seen["headers"]
    assert seen["headers"]["X-Tenant-Id"] == "tenant-a"


async def test_tenant_pin_beats_the_clients_country(
    authed: str, client: aiohttp.ClientSession
) -> None:
    headers = {"Authorization": f"Bearer {KEY_B}", "X-Forwarded-For": US}
    async with client.get(f"{authed}/echo", headers=headers) as resp:
        assert resp.headers["X-Residency-Zone"] == "eu"  # pinned, although the client is in US
        assert resp.headers["X-Served-Region"] == "eu-west-1"
