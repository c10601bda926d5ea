"""Hot reload of a running in-process gateway in front of scripted loopback upstreams.

The gateway and upstreams come from test_proxy's fixtures; a test rewrites the gateway's YAML
file as an operator would and reloads it (``GatewayServer.reload`` or the admin call) while a
steady request loop runs. Every request must succeed; the new config must be visible right
after the reload, a broken one must leave the old one running, and state of what did not
change (breakers, ejections, health verdicts, rate-limit counters, admin drains) must survive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp.test_utils import RawTestServer

from gateway.clock import ManualClock
from gateway.config import load_config
from gateway.geo import GeoDatabaseError
from gateway.health import HealthChecker, ProbeSettings
from gateway.reload import config_version, restart_required
from gateway.server import GatewayServer
from gateway.tenants import hash_key
from gateway.upstreams import Upstreams
from tests.gateway.test_health import MakeBackend, make_backend, session
from tests.gateway.test_proxy import (
    COUNTRY_TEST_DB,
    SERVERS,
    US,
    GatewayFactory,
    Upstream,
    client,
    closed_port,
    make_gateway,
    upstreams,
)

__all__ = ["client", "make_backend", "make_gateway", "session", "upstreams"]  # fixtures, re-used

FROM_US = {"X-Forwarded-For": US}  # trusted loopback peer: zone us -> us-east-1
TOKEN = "reload-test-token"


def rewrite(server: GatewayServer, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit the YAML file the running config came from, as an operator would."""
    path = server.config_path
    assert path is not None
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw))


async def eventually(check: Callable[[], bool], *, within: float = 5.0) -> None:
    """Poll ``check`` until it holds; fail after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        if check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached within {within} s")
        await asyncio.sleep(0.005)


class Load:
    """A steady loop of GETs from ``concurrency`` clients until ``stop()``; never raises."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, *, headers: dict[str, str],
        concurrency: int = 8,
    ) -> None:  # fmt: skip
        self.statuses: list[int | str] = []  # a status, or the client error's name
        self._stopped = False
        self._tasks = [
            asyncio.create_task(self._client(session, url, headers)) for _ in range(concurrency)
        ]

    async def _client(
        self, session: aiohttp.ClientSession, url: str, headers: dict[str, str]
    ) -> None:
        while not self._stopped:
            try:
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                    self.statuses.append(resp.status)
            except aiohttp.ClientError as exc:
                self.statuses.append(type(exc).__name__)

    async def until(self, count: int) -> None:
        """Wait until ``count`` requests have been answered (in all)."""
        await eventually(lambda: len(self.statuses) >= count, within=20)

    async def stop(self) -> list[int | str]:
        self._stopped = True
        await asyncio.gather(*self._tasks)
        return self.statuses


async def serve(aiohttp_raw_server: Any, region: str) -> tuple[Upstream, RawTestServer]:
    up = Upstream(region)
    server = await aiohttp_raw_server(up.handle)
    up.url = f"http://127.0.0.1:{server.port}"
    return up, server


# --- a changed config under load ------------------------------------------------------------


async def test_changed_config_under_load_has_no_failed_request_and_applies_at_once(
    make_gateway: GatewayFactory, aiohttp_raw_server: Any, client: aiohttp.ClientSession
) -> None:
    (old, old_server), (new, _), (eu, _) = [
        await serve(aiohttp_raw_server, r) for r in ("us-east-1", "us-east-1", "eu-west-1")
    ]
    url = await make_gateway(
        {"us-east-1": [old.url], "eu-west-1": [eu.url]}, route_extra={"methods": ["GET"]}
    )
    server = SERVERS[url]
    version, old_db = server.config_version, server.geodb
    assert old_db is not None
    async with client.post(f"{url}/echo", data=b"x") as resp:
        assert resp.status == 405  # not a route yet
    # a stream that starts on the old endpoint, which the reload removes
    stream = await client.get(f"{url}/sse", headers=FROM_US)
    assert await stream.content.readline() == b"data: first\n"

    load = Load(client, f"{url}/x", headers=FROM_US)
    await load.until(100)

    def change(raw: dict[str, Any]) -> None:
        raw["regions"]["us-east-1"]["endpoints"] = [new.url]
        raw["routes"].insert(0, {"prefix": "/echo", "methods": ["GET", "POST"]})
        raw["gateway"]["geodb"] = str(COUNTRY_TEST_DB.parent / "GeoLite2-City-Test.mmdb")

    rewrite(server, change)
    result = await server.reload()
    at_swap, answered = len(old.received), len(load.statuses)
    await load.until(answered + 100)
    settled = len(old.received)  # + the requests in flight at the swap: they finish there
    await load.until(answered + 250)
    statuses = await load.stop()

    assert result.ok, result.error
    assert result.version == server.config_version != version
    assert set(statuses) == {200}, f"failed requests during the reload: {set(statuses)}"
    assert settled - at_swap <= 8  # at most one per client of the load
    assert len(old.received) == settled, "a request reached the removed endpoint after reload"
    assert len(new.received) >= 150
    async with client.post(f"{url}/echo", data=b"x", headers=FROM_US) as resp:
        assert resp.status == 200  # the new route
        assert resp.headers["X-Served-Region"] == "us-east-1"
    # the in-flight stream finishes on the endpoint it started on
    old.release.set()
    assert await stream.read() == b"\ndata: second\n\n"
    stream.release()
    # ... and then the gateway closes its pooled connections to the removed endpoint
    await eventually(lambda: not old_server.handler.connections)
    assert server.geodb is not None
    assert server.geodb.database_type == "GeoLite2-City"
    assert server.geodb.lookup(US) == "US"
    with pytest.raises(GeoDatabaseError):  # the replaced database is closed once idle
        old_db.lookup(US)


# --- a broken config under load --------------------------------------------------------------


def _bad_duration(raw: dict[str, Any], tmp: Path) -> str:
    raw["routes"][0]["timeouts"] = {"connect": "5 parsecs"}
    return "routes[0].timeouts.connect: '5 parsecs' is not a duration"


def _listen_changed(raw: dict[str, Any], tmp: Path) -> str:
    raw["gateway"]["listen"] = "127.0.0.1:1"
    raw["regions"]["eu-west-1"]["drained"] = True  # a valid change alongside: not applied either
    return "gateway.listen: changed from 127.0.0.1:0 to 127.0.0.1:1; needs a restart"


def _unreadable_geodb(raw: dict[str, Any], tmp: Path) -> str:
    bad = tmp / "broken.mmdb"
    bad.write_bytes(b"not a MaxMind database" * 64)
    raw["gateway"]["geodb"] = str(bad)
    return "gateway.geodb: "


@pytest.mark.parametrize("breakage", [_bad_duration, _listen_changed, _unreadable_geodb])
async def test_broken_config_under_load_keeps_the_old_one_and_reports_why(
    make_gateway: GatewayFactory,
    upstreams: dict[str, Upstream],
    client: aiohttp.ClientSession,
    tmp_path: Path,
    breakage: Callable[[dict[str, Any], Path], str],
) -> None:
    url = await make_gateway(
        {r: [u.url] for r, u in upstreams.items()},
        extra={"admin": {"listen": "127.0.0.1:0", "token": TOKEN}},
    )
    server = SERVERS[url]
    host, port = server.admin_bound[0]
    admin, auth = f"http://{host}:{port}", {"Authorization": f"Bearer {TOKEN}"}
    running, version = server.config, server.config_version
    expected: list[str] = []
    rewrite(server, lambda raw: expected.append(breakage(raw, tmp_path)))

    load = Load(client, f"{url}/x", headers=FROM_US)
    await load.until(100)
    async with client.post(f"{admin}/reload", headers=auth) as resp:
        assert resp.status == 422
        answer = orjson.loads(await resp.read())
    await load.until(len(load.statuses) + 100)
    statuses = await load.stop()

    assert set(statuses) == {200}, f"failed requests during the reload: {set(statuses)}"
    assert answer["ok"] is False
    assert answer["version"] == version
    assert f"{server.config_path}:{expected[0]}" in answer["error"]
    assert server.config is running
    assert server.config_version == version
    assert server.upstreams.regions["eu-west-1"].drained is False
    async with client.get(f"{admin}/status", headers=auth) as resp:
        assert orjson.loads(await resp.read())["config_version"] == version
    async with client.get(f"{admin}/metrics") as resp:
        text = await resp.text()
    assert 'geogate_config_reloads_total{result="error"} 1.0' in text
    assert 'geogate_config_reloads_total{result="success"} 0.0' in text
    assert f'geogate_config_info{{version="{version}"}} 1.0' in text


# --- state that survives ---------------------------------------------------------------------


async def test_unchanged_endpoint_keeps_breaker_ejection_and_health_new_one_starts_fresh(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], client: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    removed = f"http://127.0.0.1:{closed_port()}"
    added = f"http://127.0.0.1:{closed_port()}"
    eu = upstreams["eu-west-1"].url
    upstream_cfg: dict[str, Any] = {
        # two probes at least (first wait in [0, 0.3) s, then 0.3 s): the requests below
        # open the breaker while the endpoint still counts as healthy
        "health": {"interval": "300ms", "timeout": "100ms", "unhealthy_threshold": 2},
        "breaker": {"fail_max": 2, "reset_timeout": "60s"},
        "outlier": {"consecutive_failures": 2, "base_ejection_time": "60s"},
    }
    url = await make_gateway(
        {"us-east-1": [dead], "eu-west-1": [eu, removed]}, extra={"upstream": upstream_cfg}
    )
    server = SERVERS[url]
    for _ in range(2):  # connect refused on each: the breaker opens, outlier detection ejects
        async with client.get(f"{url}/x", headers=FROM_US) as resp:
            await resp.read()
    assert server.health is not None
    health = server.health
    await eventually(lambda: not health.is_healthy(dead))
    endpoint = server.upstreams.endpoints[dead]
    before = server.upstreams.snapshot()["us-east-1"]["endpoints"][0]  # type: ignore[index]
    assert before["breaker"]["state"] == "open"
    assert before["outlier"]["state"] == "ejected"
    probes_before = health.snapshot()[dead]["probes_total"]

    def change(raw: dict[str, Any]) -> None:
        raw["regions"]["us-east-1"]["endpoints"] = [dead, added]
        raw["regions"]["eu-west-1"]["endpoints"] = [eu]
        raw["upstream"]["breaker"]["fail_max"] = 3  # new limits apply to the kept breaker
        raw["routes"].append({"prefix": "/other/"})

    rewrite(server, change)
    result = await server.reload()
    assert result.ok, result.error

    assert server.upstreams.endpoints[dead] is endpoint
    assert endpoint.breaker.circuit.fail_max == 3
    states = {e["url"]: e for e in server.upstreams.snapshot()["us-east-1"]["endpoints"]}  # type: ignore[index]
    assert states[dead]["healthy"] is False
    assert states[dead]["breaker"]["state"] == "open"
    assert states[dead]["outlier"]["state"] == "ejected"
    assert states[dead]["outlier"]["times_ejected"] == before["outlier"]["times_ejected"]
    assert states[added]["healthy"] is True
    assert states[added]["breaker"]["state"] == "closed"
    assert states[added]["outlier"]["state"] == "active"
    assert server.health is health  # updated, not replaced
    probes = health.snapshot()
    assert removed not in probes
    assert added in probes
    assert probes[dead]["probes_total"] >= probes_before  # its record and loop carry on
    assert removed not in server.upstreams.endpoints


async def test_tenant_rate_limit_survives_a_reload_that_changes_another_tenant(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], client: aiohttp.ClientSession
) -> None:
    keys = {"a": "gg_tenant_a_key", "b": "gg_tenant_b_key", "b2": "gg_tenant_b_new_key"}
    url = await make_gateway(
        {r: [u.url] for r, u in upstreams.items()},
        route_extra={"auth": "required", "rate_limit": "three"},
        extra={
            "rate_limits": {"three": {"requests_per_minute": 3}},
            "tenants": [
                {"id": "a", "keys": [hash_key(keys["a"])]},
                {"id": "b", "keys": [hash_key(keys["b"])]},
            ],
        },
    )
    server = SERVERS[url]

    async def status(key: str) -> int:
        headers = {**FROM_US, "Authorization": f"Bearer {key}"}
        async with client.get(f"{url}/x", headers=headers) as resp:
            await resp.read()
            return resp.status

    assert [await status(keys["a"]) for _ in range(4)] == [200, 200, 200, 429]
    assert await status(keys["b"]) == 200

    def change(raw: dict[str, Any]) -> None:
        raw["tenants"][1]["keys"] = [hash_key(keys["b2"])]  # tenant b rotates its key
        raw["routes"].insert(0, {"prefix": "/first/"})  # shifts the route's position

    rewrite(server, change)
    result = await server.reload()
    assert result.ok, result.error
    assert await status(keys["a"]) == 429  # a's minute is still spent
    assert await status(keys["b"]) == 401  # the old key is gone
    assert [await status(keys["b2"]) for _ in range(3)] == [200, 200, 429]  # b's 1 + 2 more


async def test_health_update_keeps_running_loops_and_cancels_removed_ones(
    make_backend: MakeBackend, session: aiohttp.ClientSession
) -> None:
    kept, gone, new = [await make_backend() for _ in range(3)]
    fast = ProbeSettings(interval=0.02, timeout=0.5, jitter=0.0)
    checker = HealthChecker(session, [kept.origin, gone.origin], fast)
    task = asyncio.create_task(checker.run())
    await kept.wait_for_requests(3)
    await gone.wait_for_requests(1)
    probes_before = checker.snapshot()[kept.origin]["probes_total"]
    assert isinstance(probes_before, int)

    def loops() -> set[str]:
        return {t.get_name() for t in asyncio.all_tasks() if not t.done()}

    assert f"health-probe {gone.origin}" in loops()

    added, removed = checker.update(
        [kept.origin, new.origin], ProbeSettings(interval=0.02, timeout=0.5, path="/ready")
    )
    assert (added, removed) == ([new.origin], [gone.origin])
    await gone.wait_idle()  # a probe in flight at the update is cancelled, not answered
    seen_gone = len(gone.seen)
    await new.wait_for_requests(2)
    await kept.wait_for_requests(len(kept.seen) + 4)  # four more intervals
    running = loops()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert len(gone.seen) == seen_gone
    assert f"health-probe {gone.origin}" not in running
    assert {f"health-probe {kept.origin}", f"health-probe {new.origin}"} <= running
    assert checker.origins == (kept.origin, new.origin)
    assert checker.snapshot()[kept.origin]["probes_total"] >= probes_before + 3  # not reset
    assert kept.seen[-1].path == "/ready"  # the new settings reach the running loop


def test_admin_drain_outlives_a_reload_unless_the_config_changes_that_region() -> None:
    cfg = load_config(Path(__file__).parents[1] / "config" / "good_minimal.yaml")
    clock = ManualClock()
    first = Upstreams(cfg.regions, cfg.upstream, own_region=cfg.gateway.region, clock=clock)
    name = next(iter(cfg.regions))
    first.set_drained(name, True)
    same = Upstreams(
        cfg.regions, cfg.upstream, own_region=cfg.gateway.region, clock=clock,
        previous=first, previous_config=cfg.upstream,
    )  # fmt: skip
    assert same.regions[name].drained is True
    assert same.regions[name].outliers is first.regions[name].outliers
    regions = {**cfg.regions, name: cfg.regions[name].model_copy(update={"drained": True})}
    changed = Upstreams(
        regions, cfg.upstream, own_region=cfg.gateway.region, clock=clock,
        previous=same, previous_config=cfg.upstream,
    )  # fmt: skip
    changed.set_drained(name, False)  # an operator undrains a config-drained region
    back = Upstreams(
        cfg.regions, cfg.upstream, own_region=cfg.gateway.region, clock=clock,
        previous=changed, previous_config=cfg.upstream,
    )  # fmt: skip
    assert back.regions[name].drained is False  # the config's change decides


def test_config_version_names_content_not_formatting(tmp_path: Path) -> None:
    source = Path(__file__).parents[1] / "config" / "good_minimal.yaml"
    raw = yaml.safe_load(source.read_text())
    raw["gateway"]["geodb"] = str((source.parent / raw["gateway"]["geodb"]).resolve())
    first, reordered, changed = (tmp_path / f"{n}.yaml" for n in ("a", "b", "c"))
    first.write_text(yaml.safe_dump(raw))
    reordered.write_text(yaml.safe_dump(dict(reversed(raw.items())), sort_keys=False))
    raw["gateway"]["via"] = "other"
    changed.write_text(yaml.safe_dump(raw))
    a, b, c = (load_config(p) for p in (first, reordered, changed))
    assert config_version(a) == config_version(b) != config_version(c)
    assert len(config_version(a)) == 12
    assert restart_required(a, c) == []


async def test_reload_of_a_stopped_gateway_is_refused(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    server = SERVERS[await make_gateway({r: [u.url] for r, u in upstreams.items()})]
    await server.stop(0)
    result = await server.reload()
    assert not result.ok
    assert "not running" in (result.error or "")
    assert result.version == server.config_version
