"""SIGHUP on a real ``python -m gateway gateway -c FILE`` process reloads FILE.

One gateway process in front of one scripted loopback upstream (test_proxy's ``Upstream``): a
route added to the file answers after SIGHUP; a broken file and another SIGHUP leave the
process serving the previous config, with the failure counted in its metrics.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.gateway.test_proxy import Upstream
from tests.integration.cluster import TEST_DB_DIR, Cluster, stop

pytestmark = pytest.mark.integration

TOKEN = "sighup-test-token"


async def answers(session: aiohttp.ClientSession, url: str, status: int) -> None:
    """Poll ``url`` until it answers ``status`` (the reload runs after the signal returns)."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        async with session.get(url) as resp:
            await resp.read()
            if resp.status == status:
                return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{url} did not answer {status} within 10 s")
        await asyncio.sleep(0.05)


async def test_sighup_applies_a_changed_file_and_survives_a_broken_one(
    aiohttp_raw_server: Any, tmp_path: Path
) -> None:
    up = Upstream("us-east-1")
    up.url = f"http://127.0.0.1:{(await aiohttp_raw_server(up.handle)).port}"
    cluster = Cluster(tmp=tmp_path, endpoints={"us-east-1": [up.url]})
    path = cluster.gateway_config(
        geodb=TEST_DB_DIR / "GeoIP2-Country-Test.mmdb", trusted=["127.0.0.1/32"], name="gw",
        route={"prefix": "/a/"}, admin_token=TOKEN,
    )  # fmt: skip
    raw = yaml.safe_load(path.read_text())
    raw["gateway"]["drain"] = {"grace": "0s", "timeout": "2s"}
    path.write_text(yaml.safe_dump(raw))
    url = await asyncio.to_thread(cluster.start_gateway, path)
    proc = cluster.gateways[0]
    try:
        async with aiohttp.ClientSession() as session:
            await answers(session, f"{url}/b/x", 404)
            raw["routes"].append({"prefix": "/b/"})
            path.write_text(yaml.safe_dump(raw))
            proc.send_signal(signal.SIGHUP)
            await answers(session, f"{url}/b/x", 200)

            path.write_text("routes: 5\n")  # not a valid config
            proc.send_signal(signal.SIGHUP)
            metrics = f"{cluster.admin_urls[url]}/metrics"
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                async with session.get(metrics) as resp:
                    text = await resp.text()
                if 'geogate_config_reloads_total{result="error"} 1.0' in text:
                    break
                assert asyncio.get_running_loop().time() < deadline, "no failed reload counted"
                await asyncio.sleep(0.05)
            assert 'geogate_config_reloads_total{result="success"} 1.0' in text
            assert proc.poll() is None
            await answers(session, f"{url}/b/x", 200)  # the previous config still runs
    finally:
        assert await asyncio.to_thread(stop, proc) == 0
