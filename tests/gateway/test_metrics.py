"""Metric names, labels and timings after a scripted set of requests through a real gateway.

The gateway (test_proxy's ``make_gateway``) runs in front of two loopback origins, one per
region, and its admin listener serves ``/metrics``, which the test scrapes over HTTP and
parses with ``prometheus_client.parser``, as Prometheus and the Grafana dashboard see it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import aiohttp
import maxminddb
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from gateway.metrics import LATENCY_BUCKETS, OVERHEAD_BUCKETS, LoopCounter, LoopHistogram
from gateway.tenants import hash_key
from tests.gateway.test_proxy import COUNTRY_TEST_DB, GB, SERVERS, US, GatewayFactory, make_gateway

__all__ = ["make_gateway"]  # a fixture, shared with test_proxy

KEY = "gg_metrics-test-key"
SLOW = 0.1  # seconds the origin waits, before headers on /slow and mid-body on /stream


class Origin:
    """One region's origin: echo, a cacheable document, a slow answer, a slow stream."""

    def __init__(self, region: str) -> None:
        self.region = region
        self.calls = 0

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.calls += 1
        await request.read()
        region = {"X-Served-Region": self.region}
        if request.path.startswith("/docs/"):
            return web.Response(text="doc", headers={**region, "Cache-Control": "max-age=60"})
        if request.path == "/open/slow":
            await asyncio.sleep(SLOW)
        if request.path == "/open/stream":
            resp = web.StreamResponse(headers=region)
            await resp.prepare(request)
            await resp.write(b"first ")
            await asyncio.sleep(SLOW)
            await resp.write(b"second")
            await resp.write_eof()
            return resp
        return web.json_response({"path": request.path}, headers=region)


@pytest.fixture
async def gateway(
    make_gateway: GatewayFactory, aiohttp_raw_server: Any
) -> tuple[str, str, dict[str, Origin]]:
    origins = {region: Origin(region) for region in ("us-east-1", "eu-west-1")}
    urls = {}
    for region, origin in origins.items():
        server = await aiohttp_raw_server(origin.handle)
        urls[region] = [f"http://127.0.0.1:{server.port}"]
    base = await make_gateway(
        urls,
        extra={
            "routes": [
                {"prefix": "/api/", "auth": "required", "rate_limit": "tight"},
                {"prefix": "/docs/", "cache": {"policy": "http"}},
                {"prefix": "/open/"},
            ],
            "rate_limits": {"tight": {"requests_per_second": 1, "burst": 1}},
            "tenants": [{"id": "acme", "keys": [hash_key(KEY)]}],
            "admin": {"listen": "127.0.0.1:0"},
        },
    )
    host, port = SERVERS[base].admin_bound[0]
    return base, f"http://{host}:{port}", origins


async def _get(session: aiohttp.ClientSession, url: str, **headers: str) -> int:
    async with session.get(url, headers=headers) as resp:
        await resp.read()
        return resp.status


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _le(text: str, name: str) -> list[float]:
    """The finite bucket bounds of histogram ``name`` (from its first label set)."""
    bounds: list[float] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == f"{name}_bucket" and s.labels["le"] != "+Inf":
                if bounds and float(s.labels["le"]) <= bounds[-1]:
                    return bounds  # the next label set starts again
                bounds.append(float(s.labels["le"]))
    return bounds


EXPECTED_FAMILIES = {
    "geogate_requests_total": "counter",
    "geogate_request_duration_seconds": "histogram",
    "geogate_request_first_byte_seconds": "histogram",
    "geogate_upstream_duration_seconds": "histogram",
    "geogate_upstream_first_byte_seconds": "histogram",
    "geogate_gateway_overhead_seconds": "histogram",
    "geogate_endpoint_healthy": "gauge",
    "geogate_endpoint_ejected": "gauge",
    "geogate_endpoint_breaker_state": "gauge",
    "geogate_endpoint_in_flight": "gauge",
    "geogate_region_available": "gauge",
    "geogate_region_drained": "gauge",
    "geogate_region_latency_seconds": "gauge",
    "geogate_upstream_ejections_total": "counter",
    "geogate_breaker_transitions_total": "counter",
    "geogate_health_transitions_total": "counter",
    "geogate_retries_total": "counter",
    "geogate_retry_budget_exhausted_total": "counter",
    "geogate_ratelimit_decisions_total": "counter",
    "geogate_cache_lookups_total": "counter",
    "geogate_residency_blocked_total": "counter",
    "geogate_geoip_lookups_total": "counter",
    "geogate_geoip_database_build_timestamp_seconds": "gauge",
    "geogate_build_info": "gauge",
}


def _declared(text: str) -> dict[str, str]:
    """``# TYPE name type`` lines of the exposition: every family, with or without samples."""
    out = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            out[name.removesuffix("_total") + ("_total" if kind == "counter" else "")] = kind
    return out


def _count(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_metric_names_labels_and_timings_after_scripted_requests(
    gateway: tuple[str, str, dict[str, Origin]],
) -> None:
    base, admin, origins = gateway
    auth = {"Authorization": f"Bearer {KEY}", "X-Forwarded-For": US}
    async with aiohttp.ClientSession() as s:
        assert await _get(s, f"{base}/open/echo", **{"X-Forwarded-For": US}) == 200
        assert await _get(s, f"{base}/open/echo", **{"X-Forwarded-For": GB}) == 200
        assert await _get(s, f"{base}/open/echo", **{"X-Forwarded-For": "10.1.2.3"}) == 200
        assert await _get(s, f"{base}/open/echo", **{"X-Forwarded-For": "1.1.1.1"}) == 200
        assert await _get(s, f"{base}/open/slow", **{"X-Forwarded-For": US}) == 200
        assert await _get(s, f"{base}/open/stream", **{"X-Forwarded-For": US}) == 200
        assert await _get(s, f"{base}/missing") == 404
        assert await _get(s, f"{base}/api/x", **{"Authorization": "Bearer wrong"}) == 401
        assert await _get(s, f"{base}/api/x", **auth) == 200
        assert await _get(s, f"{base}/api/x", **auth) == 429
        assert await _get(s, f"{base}/docs/a", **{"X-Forwarded-For": US}) == 200
        assert await _get(s, f"{base}/docs/a", **{"X-Forwarded-For": US}) == 200  # cache hit
        async with s.get(f"{admin}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    assert origins["us-east-1"].calls == 7
    assert origins["eu-west-1"].calls == 1
    declared = _declared(text)
    for name, kind in EXPECTED_FAMILIES.items():
        assert declared.get(name) == kind, name
    samples = _samples(text)

    def requests(route: str, zone: str, region: str, status_class: str) -> float | None:
        return _count(
            samples, "geogate_requests_total",
            route=route, zone=zone, region=region, status_class=status_class,
        )  # fmt: skip

    assert requests("/open/", "us", "us-east-1", "2xx") == 3  # echo, slow, stream
    assert requests("/open/", "eu", "eu-west-1", "2xx") == 1
    assert requests("/open/", "global", "us-east-1", "2xx") == 2  # private, not in the DB
    assert requests("none", "none", "none", "4xx") == 1  # no route: 404
    assert requests("/api/", "none", "none", "4xx") == 1  # 401: before the zone is known
    assert requests("/api/", "us", "us-east-1", "2xx") == 1
    assert requests("/api/", "us", "none", "4xx") == 1  # 429, answered by the gateway
    assert requests("/docs/", "us", "us-east-1", "2xx") == 1  # the miss
    assert requests("/docs/", "us", "none", "2xx") == 1  # the hit
    total = sum(v for (n, _), v in samples.items() if n == "geogate_requests_total")
    assert total == 12

    dur = "geogate_request_duration_seconds"
    first = "geogate_request_first_byte_seconds"
    over = "geogate_gateway_overhead_seconds"
    up = "geogate_upstream_duration_seconds"
    up_first = "geogate_upstream_first_byte_seconds"
    assert _count(samples, f"{dur}_count", route="/open/", zone="us") == 3
    assert _count(samples, f"{first}_count", route="/docs/", zone="us") == 2
    assert _count(samples, f"{over}_count", route="/api/") == 3  # 401, 200, 429
    assert _count(samples, f"{over}_count", route="none") == 1
    assert _count(samples, f"{up}_count", region="us-east-1") == 7  # every attempt answered
    assert _count(samples, f"{up_first}_count", region="eu-west-1") == 1
    # /open/slow waits SLOW before its headers and /open/stream SLOW mid-body: both count in
    # the request's duration, only the first in time to first byte, neither in the overhead
    assert _count(samples, f"{dur}_sum", route="/open/", zone="us") >= 2 * SLOW
    first_sum = _count(samples, f"{first}_sum", route="/open/", zone="us")
    assert first_sum is not None
    assert SLOW <= first_sum < 2 * SLOW
    assert _count(samples, f"{up}_sum", region="us-east-1") >= 2 * SLOW
    overhead_sum = _count(samples, f"{over}_sum", route="/open/")
    assert overhead_sum is not None
    assert overhead_sum < SLOW / 2
    assert _count(samples, f"{over}_bucket", route="/open/", le="+Inf") == 6
    assert _le(text, dur) == list(LATENCY_BUCKETS)
    assert _le(text, over) == list(OVERHEAD_BUCKETS)

    assert _count(samples, "geogate_cache_lookups_total", result="hit", zone="us") == 1
    ratelimit = "geogate_ratelimit_decisions_total"
    assert _count(samples, ratelimit, route="/api/", policy="tight", result="limited") == 1
    geoip = "geogate_geoip_lookups_total"
    # US: echo, slow, stream, /api/ twice (the 401 is refused before the lookup), /docs/ twice
    assert _count(samples, geoip, result="found") == 8  # ... and GB
    assert _count(samples, geoip, result="special") == 1  # 10.1.2.3
    assert _count(samples, geoip, result="not_found") == 1  # 1.1.1.1
    assert _count(samples, geoip, result="error") == 0
    with maxminddb.open_database(str(COUNTRY_TEST_DB)) as reader:
        built = reader.metadata().build_epoch
    assert _count(samples, "geogate_geoip_database_build_timestamp_seconds") == built
    assert _count(samples, "geogate_build_info", version=__version__) == 1


def _labels_of(text: str, names: Iterable[str]) -> set[str]:
    return {
        key
        for family in text_string_to_metric_families(text)
        if family.name in names
        for s in family.samples
        for key in s.labels
    }


async def test_request_labels_are_bounded(gateway: tuple[str, str, dict[str, Origin]]) -> None:
    """Paths, tenants and addresses never become labels: 20 distinct paths, one label set."""
    base, admin, _ = gateway
    async with aiohttp.ClientSession() as s:
        for i in range(20):
            assert await _get(s, f"{base}/open/p{i}?q={i}", **{"X-Forwarded-For": US}) == 200
        async with s.get(f"{admin}/metrics") as resp:
            text = await resp.text()
    samples = _samples(text)
    request_series = [k for k in samples if k[0] == "geogate_requests_total"]
    assert len(request_series) == 1
    names = {"geogate_requests", "geogate_request_duration_seconds",
             "geogate_request_first_byte_seconds", "geogate_gateway_overhead_seconds",
             "geogate_upstream_duration_seconds"}  # fmt: skip
    assert _labels_of(text, names) <= {"route", "zone", "region", "status_class", "le"}


def test_loop_families_expose_what_prometheus_clients_own_do() -> None:
    """Same updates, same samples as the library's Histogram and Counter."""
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    our_count = LoopCounter("n", "doc", ["zone", "result"], registry=ours_registry)
    their_count = Counter("n", "doc", ["zone", "result"], registry=theirs_registry)
    our_plain = LoopCounter("plain", "doc", [], registry=ours_registry)
    their_plain = Counter("plain", "doc", registry=theirs_registry)
    for zone, result, amount in [("eu", "hit", 1), ("eu", "hit", 2.5), ("us", "miss", 1)]:
        our_count.labels(zone, result).inc(amount)
        their_count.labels(zone, result).inc(amount)
        our_plain.inc()
        their_plain.inc()
    ours = LoopHistogram(
        "x_seconds", "doc", ["route"], buckets=LATENCY_BUCKETS, registry=ours_registry
    )
    theirs = Histogram(
        "x_seconds", "doc", ["route"], buckets=LATENCY_BUCKETS, registry=theirs_registry
    )
    values = [0.0, 0.0005, 0.0007, 0.001, 0.3, 2.5, 29.0, 30.0, 31.0, 1e6]  # bounds included
    for route in ("/a", "/b"):
        for v in values[: 7 if route == "/a" else None]:
            ours.labels(route).observe(v)
            theirs.labels(route).observe(v)

    def samples(registry: CollectorRegistry) -> set[tuple[str, tuple[Any, ...], float]]:
        text = generate_latest(registry).decode()
        return {
            (s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if not s.name.endswith("_created")  # the library's creation time: ours has none
        }

    assert samples(ours_registry) == samples(theirs_registry)
    with pytest.raises(ValueError, match="takes labels"):
        ours.labels("/a", "extra")
