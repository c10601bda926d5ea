"""Failover with real backend processes: kills, hangs, cut streams, drains; never a zone crossed.

One gateway process (own region us-east-1) with fast probes (200 ms), a short breaker reset
and short ejections, in front of the four-region topology. Each test restores what it broke
and waits, through the admin API, until the gateway sees every endpoint healthy again.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest

from tests.integration.cluster import EMBEDDED_DB, EU_REGIONS, Cluster

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token"
GB, US = "2.125.160.216", "8.8.8.8"
ZONE_REGIONS = {"eu": EU_REGIONS, "us": {"us-east-1"}}


@dataclass
class Gateway:
    url: str
    admin: str

    async def status(self, session: aiohttp.ClientSession) -> dict:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with session.get(f"{self.admin}/status", headers=headers) as resp:
            assert resp.status == 200
            return orjson.loads(await resp.read())

    async def admin_post(self, session: aiohttp.ClientSession, path: str) -> int:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with session.post(f"{self.admin}{path}", headers=headers) as resp:
            await resp.read()
            return resp.status


@pytest.fixture(scope="module")
def gateway(cluster: Cluster) -> Gateway:
    config = cluster.gateway_config(
        geodb=EMBEDDED_DB,
        trusted=["127.0.0.1/32"],
        name="failover",
        upstream={
            "health": {"interval": "200ms", "timeout": "300ms", "healthy_threshold": 2,
                       "unhealthy_threshold": 2},
            "outlier": {"consecutive_failures": 3, "base_ejection_time": "1s"},
            "breaker": {"fail_max": 3, "reset_timeout": "1s"},
        },
        route={"prefix": "/", "timeouts": {"connect": "500ms", "first_byte": "1s", "idle": "2s"},
               "retry": {"attempts": 3}},
        admin_token=TOKEN,
    )  # fmt: skip
    url = cluster.start_gateway(config)
    return Gateway(url, cluster.admin_urls[url])


async def wait_until(
    gw: Gateway, session: aiohttp.ClientSession, check: Callable[[dict], bool], within: float = 15
) -> dict:
    """Poll the admin status until ``check`` holds (bounded: fails after ``within`` s)."""
    deadline = time.monotonic() + within
    while True:
        status = await gw.status(session)
        if check(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached in {within} s: {status['regions']}")
        await asyncio.sleep(0.05)


def all_healthy(status: dict) -> bool:
    return all(e["available"] for r in status["regions"].values() for e in r["endpoints"]) and all(
        not r["drained"] for r in status["regions"].values()
    )


@pytest.fixture
async def session(gateway: Gateway, cluster: Cluster) -> aiohttp.ClientSession:
    async with aiohttp.ClientSession() as s:
        await wait_until(gateway, s, all_healthy)
        yield s
    # restore: restart whatever a test killed, undrain, wait for the gateway to see it
    for url, proc in cluster.backends.items():
        if proc.poll() is not None:
            cluster.start_backend(url)
        elif proc.returncode is None:
            proc.send_signal(signal.SIGCONT)
    async with aiohttp.ClientSession() as s:
        for region in cluster.endpoints:
            await gateway.admin_post(s, f"/regions/{region}/undrain")
        await wait_until(gateway, s, all_healthy, within=20)


@dataclass
class Load:
    """Results of a bounded load run: (zone, status, region or error) per request."""

    results: list[tuple[str, int, str]] = field(default_factory=list)

    def failures(self, zone: str | None = None) -> list[tuple[str, int, str]]:
        return [r for r in self.results if r[1] != 200 and (zone is None or r[0] == zone)]

    def violations(self) -> list[tuple[str, int, str]]:
        """Answers served by a region outside the request's zone: must never happen."""
        return [r for r in self.results if r[1] == 200 and r[2] not in ZONE_REGIONS[r[0]]]


async def run_load(
    gw: Gateway, session: aiohttp.ClientSession, load: Load, stop: asyncio.Event,
    *, clients: dict[str, str], concurrency: int = 6,
) -> None:  # fmt: skip
    """Idempotent requests (GET, and POST with Idempotency-Key) until ``stop`` is set."""
    counter = itertools.count()

    async def worker(zone: str, ip: str) -> None:
        while not stop.is_set():
            n = next(counter)
            headers = {"X-Forwarded-For": ip, "Idempotency-Key": f"k{n}"}
            try:
                if n % 2:
                    req = session.get(f"{gw.url}/ready", headers=headers)
                else:
                    req = session.post(
                        f"{gw.url}/chat/invoke", headers=headers,
                        json={"input": {"question": f"q{n % 7}"}},
                    )  # fmt: skip
                async with req as resp:
                    await resp.read()
                    load.results.append(
                        (zone, resp.status, resp.headers.get("X-Served-Region", "-"))
                    )
            except aiohttp.ClientError as exc:
                load.results.append((zone, 0, type(exc).__name__))

    await asyncio.gather(
        *(worker(zone, ip) for zone, ip in clients.items() for _ in range(concurrency // 2))
    )


async def test_killing_one_of_two_endpoints_under_load_fails_no_idempotent_request(
    gateway: Gateway, cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    load, stop = Load(), asyncio.Event()
    task = asyncio.create_task(run_load(gateway, session, load, stop, clients={"us": US, "eu": GB}))
    await asyncio.sleep(0.5)
    victim = cluster.endpoints["us-east-1"][0]
    cluster.kill_backend(victim)
    await wait_until(
        gateway, session,
        lambda s: not next(e for e in s["regions"]["us-east-1"]["endpoints"]
                           if e["url"] == victim)["available"],
    )  # fmt: skip
    await asyncio.sleep(0.5)  # more load with the endpoint gone
    stop.set()
    await task
    assert len(load.results) > 50
    assert load.failures() == []
    assert load.violations() == []


async def test_killing_a_region_moves_its_zone_to_the_other_region(
    gateway: Gateway, cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    for url in cluster.endpoints["eu-west-1"]:
        cluster.kill_backend(url)
    await wait_until(gateway, session, lambda s: not s["regions"]["eu-west-1"]["available"])
    regions = Counter()
    for _ in range(20):
        async with session.get(f"{gateway.url}/ready", headers={"X-Forwarded-For": GB}) as resp:
            assert resp.status == 200
            regions[resp.headers["X-Served-Region"]] += 1
    assert regions == {"eu-central-1": 20}


async def test_killing_every_eu_region_fails_closed_and_leaves_us_alone(
    gateway: Gateway, cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    load, stop = Load(), asyncio.Event()
    task = asyncio.create_task(run_load(gateway, session, load, stop, clients={"us": US, "eu": GB}))
    await asyncio.sleep(0.3)
    for region in EU_REGIONS:
        for url in cluster.endpoints[region]:
            cluster.kill_backend(url)
    await wait_until(
        gateway, session,
        lambda s: not any(s["regions"][r]["available"] for r in EU_REGIONS),
    )  # fmt: skip
    async with session.get(f"{gateway.url}/ready", headers={"X-Forwarded-For": GB}) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"].isdigit()
        problem = orjson.loads(await resp.read())
    assert problem["zone"] == "eu"
    assert "eu" in problem["detail"]
    await asyncio.sleep(0.5)
    stop.set()
    await task
    assert load.violations() == []  # not one EU request was served outside the EU
    assert load.failures("us") == []
    assert any(r[0] == "eu" and r[1] == 503 for r in load.results)
    metrics = await (await session.get(f"{gateway.admin}/metrics")).text()
    assert 'geogate_residency_blocked_total{zone="eu"}' in metrics


async def test_hanging_backend_opens_the_breaker_and_recovers_through_half_open(
    gateway: Gateway, cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    victim = cluster.endpoints["eu-central-1"][0]
    # eu-central-1 has one endpoint: drain eu-west-1 so that every EU request goes there
    assert await gateway.admin_post(session, "/regions/eu-west-1/drain") == 200
    cluster.kill_backend(victim, signal.SIGSTOP)
    statuses = Counter()

    async def one() -> None:
        async with session.get(f"{gateway.url}/ready", headers={"X-Forwarded-For": GB}) as r:
            await r.read()
            statuses[r.status] += 1

    await asyncio.gather(*(one() for _ in range(4)))  # each waits out first_byte (1 s)
    assert statuses[504] >= 1
    status = await wait_until(
        gateway, session,
        lambda s: s["regions"]["eu-central-1"]["endpoints"][0]["breaker"]["state"] == "open"
        or not s["regions"]["eu-central-1"]["available"],
    )  # fmt: skip
    started = time.monotonic()
    async with session.get(f"{gateway.url}/ready", headers={"X-Forwarded-For": GB}) as r:
        assert r.status == 503  # at once: no upstream call while the zone has no endpoint
    assert time.monotonic() - started < 0.5
    cluster.kill_backend(victim, signal.SIGCONT)
    status = await wait_until(
        gateway, session, lambda s: s["regions"]["eu-central-1"]["available"], within=20
    )
    for _ in range(5):
        async with session.get(f"{gateway.url}/ready", headers={"X-Forwarded-For": GB}) as r:
            assert r.status == 200
            assert r.headers["X-Served-Region"] == "eu-central-1"
    status = await gateway.status(session)
    assert status["regions"]["eu-central-1"]["endpoints"][0]["breaker"]["state"] == "closed"
    metrics = await (await session.get(f"{gateway.admin}/metrics")).text()
    for state in ("open", "half_open", "closed"):  # the whole path, in the breaker's history
        sample = (
            f'geogate_breaker_transitions_total{{endpoint="{victim}",region="eu-central-1",'
            f'state="{state}"}}'
        )
        assert sample in metrics, state


async def read_all(resp: aiohttp.ClientResponse, into: list[bytes]) -> None:
    async for chunk in resp.content.iter_any():
        into.append(chunk)


@pytest.mark.parametrize("dialect", ["openai", "langserve"])
async def test_stream_cut_midway_ends_with_an_explicit_error(
    gateway: Gateway, cluster: Cluster, session: aiohttp.ClientSession, dialect: str
) -> None:
    victim = cluster.endpoints["eu-central-1"][0]
    assert await gateway.admin_post(session, "/regions/eu-west-1/drain") == 200
    if dialect == "openai":
        url = f"{gateway.url}/v1/chat/completions"
        body = {
            "model": "geogate-chat",
            "stream": True,
            "max_tokens": 400,
            "messages": [{"role": "user", "content": "Tell me everything about residency."}],
        }
    else:
        url = f"{gateway.url}/chat/stream"
        body = {"input": {"question": "Tell me everything about data residency rules."}}
    received = b""
    async with session.post(url, json=body, headers={"X-Forwarded-For": GB}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Served-Region"] == "eu-central-1"
        # first event only (LangServe frames events with CRLF, as sse_starlette does)
        received += await resp.content.readuntil(b"\n\n" if dialect == "openai" else b"\r\n\r\n")
        cluster.kill_backend(victim)
        chunks: list[bytes] = []
        with pytest.raises(aiohttp.ClientPayloadError):  # cut: no clean end
            await read_all(resp, chunks)
        received += b"".join(chunks)
    if dialect == "openai":
        assert b'data: {"error":' in received
        assert b"[DONE]" not in received
    else:
        assert b"event: error" in received
        assert b"event: end" not in received


async def test_admin_drain_moves_traffic_and_requires_the_token(
    gateway: Gateway, session: aiohttp.ClientSession
) -> None:
    async with session.post(f"{gateway.admin}/regions/eu-west-1/drain") as resp:
        assert resp.status == 401
    assert await gateway.admin_post(session, "/regions/eu-west-1/drain") == 200
    assert await gateway.admin_post(session, "/regions/mars-1/drain") == 404
    for _ in range(10):
        async with session.get(f"{gateway.url}/ready", headers={"X-Forwarded-For": GB}) as resp:
            assert resp.headers["X-Served-Region"] == "eu-central-1"
    status = await gateway.status(session)
    assert status["regions"]["eu-west-1"]["drained"] is True
    assert await gateway.admin_post(session, "/regions/eu-west-1/undrain") == 200


@pytest.fixture(scope="module")
def caching_gateway(cluster: Cluster) -> Gateway:
    config = cluster.gateway_config(
        geodb=EMBEDDED_DB,
        trusted=["127.0.0.1/32"],
        name="failover-cache",
        upstream={
            "health": {"interval": "200ms", "timeout": "300ms", "healthy_threshold": 2,
                       "unhealthy_threshold": 2},
        },
        route={"prefix": "/", "timeouts": {"connect": "500ms", "first_byte": "2s"},
               "cache": {"policy": "llm-exact", "default_temperature": 0, "ttl": "1ms",
                         "stale_if_error": "10m"}},
        admin_token=TOKEN,
    )  # fmt: skip
    url = cluster.start_gateway(config)
    return Gateway(url, cluster.admin_urls[url])


async def test_stale_answer_is_served_while_the_zone_has_no_region(
    caching_gateway: Gateway, cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    gw = caching_gateway
    await wait_until(gw, session, all_healthy)
    body = {"model": "geogate-chat", "messages": [{"role": "user", "content": "Residency?"}]}
    headers = {"X-Forwarded-For": GB}
    async with session.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200
        fresh = orjson.loads(await r.read())
    for region in EU_REGIONS:
        for url in cluster.endpoints[region]:
            cluster.kill_backend(url)
    await wait_until(
        gw, session, lambda s: not any(s["regions"][r]["available"] for r in EU_REGIONS)
    )
    async with session.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200  # instead of 503: the stale answer, within stale_if_error
        assert "stale-if-error" in r.headers["Cache-Status"]
        assert r.headers["X-Residency-Zone"] == "eu"
        stale = orjson.loads(await r.read())
    assert stale["choices"][0]["message"]["content"] == fresh["choices"][0]["message"]["content"]
    other = {**body, "messages": [{"role": "user", "content": "Never asked before"}]}
    async with session.post(f"{gw.url}/v1/chat/completions", json=other, headers=headers) as r:
        assert r.status == 503  # nothing stored for this one: fail closed, naming the zone
