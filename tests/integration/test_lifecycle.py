"""Process life cycle with real processes on loopback: drain, workers, rolling restart, TLS.

Two backends: us-east-1 answers at once (requests from 8.8.8.8, zone us); eu-west-1 streams
slowly, 8 tokens/s, so a chat stream (from 2.125.160.216, zone eu) lasts about 3 s, longer
than the 0.5 s drain grace of the gateways here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import TlsConfig, load_config
from gateway.errors import ConfigError
from gateway.listener import make_ssl_context
from tests.integration.cluster import (
    EMBEDDED_DB,
    ROOT,
    Cluster,
    stop,
    wait_for_line,
)
from tests.netutil import self_signed

pytestmark = pytest.mark.integration

TOKEN = "lifecycle-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
US, GB = "8.8.8.8", "2.125.160.216"
GRACE = 0.5  # seconds: gateway.drain.grace of every gateway here
CHAT = {"model": "geogate-chat", "messages": [{"role": "user", "content": "Where is my data?"}]}
LONG_STREAM = {**CHAT, "stream": True, "max_tokens": 60}


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp=tmp_path_factory.mktemp("lifecycle"))
    speeds = {"us-east-1": ["--ttft-ms", "0"], "eu-west-1": ["--tokens-per-second", "8"]}
    try:
        for region, speed in speeds.items():
            c.add_backend(region, *speed)
        for proc in c.backends.values():
            wait_for_line(proc, b"listening on")
        yield c
    finally:
        for proc in [*c.gateways, *c.backends.values()]:
            stop(proc)


def write_config(c: Cluster, name: str, **gateway: Any) -> Path:
    """The cluster's gateway config with a short drain, plus ``gateway`` keys (e.g. tls)."""
    path = c.gateway_config(
        geodb=EMBEDDED_DB, trusted=["127.0.0.1/32"], name=name, admin_token=TOKEN
    )
    raw = yaml.safe_load(path.read_text())
    raw["gateway"] |= {"drain": {"grace": f"{GRACE}s", "timeout": "10s"}, **gateway}
    path.write_text(yaml.safe_dump(raw))
    return path


def start(c: Cluster, config: Path, *args: str) -> tuple[str, str, subprocess.Popen[bytes]]:
    """Start a gateway; (URL, admin URL, process)."""
    url = c.start_gateway(config, args)
    return url, c.admin_urls[url], c.gateways[-1]


async def wait_exit(proc: subprocess.Popen[bytes], within: float = 15) -> int:
    deadline = time.monotonic() + within
    while proc.poll() is None:
        assert time.monotonic() < deadline, f"pid {proc.pid} still running after {within} s"
        await asyncio.sleep(0.02)
    return proc.returncode


def alive(pid: int | None) -> bool:
    try:
        os.kill(pid or 0, 0)
    except ProcessLookupError:
        return False
    return pid is not None


async def refused(url: str) -> bool:
    """True when a new TCP connection to ``url``'s port is refused."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_sigterm_during_a_long_stream_lets_it_finish_then_exits_0(
    backends: Cluster,
) -> None:
    url, _, proc = start(backends, write_config(backends, "stream"))
    headers = {"X-Forwarded-For": GB}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/chat/completions", json=LONG_STREAM, headers=headers) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["X-Served-Region"] == "eu-west-1"
        payloads = [(await resp.content.readline()).strip()]
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        closed_at = None
        async for line in resp.content:
            if line.startswith(b"data: "):
                payloads.append(line.strip())
            if closed_at is None and await refused(url):
                closed_at = time.monotonic() - began
        finished = time.monotonic() - began
    assert payloads[-1] == b"data: [DONE]"
    assert len(payloads) > 10
    # the listener closed after the grace period, while the stream was still flowing
    assert closed_at is not None
    assert GRACE * 0.8 < closed_at < finished
    assert await wait_exit(proc) == 0


async def test_readiness_fails_and_answers_say_close_during_the_grace_period(
    backends: Cluster,
) -> None:
    url, admin, proc = start(backends, write_config(backends, "ready"))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{admin}/ready") as resp:  # no token needed
            assert (resp.status, await resp.text()) == (200, "ready\n")
        async with session.post(f"{url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
            assert resp.headers.get("Connection", "").lower() != "close"
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(GRACE / 3)
        async with session.get(f"{admin}/ready") as resp:
            assert (resp.status, await resp.text()) == (503, "not ready\n")
        async with session.get(f"{admin}/live") as resp:
            assert resp.status == 200
        # the listener still accepts, and tells keep-alive clients to go elsewhere
        async with session.post(f"{url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
            assert resp.headers["Connection"].lower() == "close"
    assert await wait_exit(proc) == 0
    assert await refused(url)


async def test_tls_terminates_on_the_listener(backends: Cluster, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "gateway")
    config = write_config(backends, "tls", tls={"cert": str(cert), "key": str(key)})
    url, _, _ = start(backends, config)
    https = url.replace("http://", "https://")
    client = ssl.create_default_context(cafile=str(cert))
    client.set_alpn_protocols(["h2", "http/1.1"])
    async with aiohttp.ClientSession() as session:
        headers = {"X-Forwarded-For": US}
        async with session.post(
            f"{https}/v1/chat/completions", json=CHAT, headers=headers, ssl=client
        ) as resp:
            assert resp.status == 200
            assert resp.headers["X-Served-Region"] == "us-east-1"
        with pytest.raises(aiohttp.ClientError):  # plain HTTP on the TLS port
            async with session.get(f"{url}/v1/models", headers=headers) as resp:
                await resp.read()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port), ssl=client)
    tls = writer.get_extra_info("ssl_object")
    assert tls.version() in ("TLSv1.2", "TLSv1.3")
    assert tls.selected_alpn_protocol() == "http/1.1"  # not h2, which the client preferred
    writer.close()
    # TLS 1.0 / 1.1 (RFC 8996): this OpenSSL's clients refuse them already, so check the
    # server context itself rather than a handshake that would fail either way
    server_ctx = make_ssl_context(TlsConfig(cert=cert, key=key))
    assert server_ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_tls_config_errors_name_the_file_and_key(backends: Cluster, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "gateway")
    bad = write_config(backends, "tls-missing", tls={"cert": "nope.pem", "key": str(key)})
    with pytest.raises(ConfigError) as missing:
        load_config(bad)
    assert [str(i) for i in missing.value.issues] == [
        f"{bad}:gateway.tls.cert: {bad.parent / 'nope.pem'}: no such file"
    ]
    mismatch = write_config(backends, "tls-mismatch", tls={"cert": str(cert), "key": str(cert)})
    with pytest.raises(ConfigError) as wrong:
        load_config(mismatch)
    (issue,) = wrong.value.issues
    assert str(issue).startswith(f"{mismatch}:gateway.tls: cannot load the certificate and key")


# --- --workers 2 ---------------------------------------------------------------------------


class Workers:
    """A ``--workers 2`` gateway: URL, admin URL and the supervisor process."""

    def __init__(self, url: str, admin: str, proc: subprocess.Popen[bytes]) -> None:
        self.url, self.admin, self.proc = url, admin, proc

    async def status(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(f"{self.admin}/status", headers=AUTH) as resp:
            assert resp.status == 200
            return dict(orjson.loads(await resp.read()))

    async def pids(self, session: aiohttp.ClientSession) -> list[int | None]:
        return [w["pid"] for w in (await self.status(session))["workers"]]

    async def wait_all_ready(self, session: aiohttp.ClientSession, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while not all(w["ready"] for w in (await self.status(session))["workers"]):
            assert time.monotonic() < deadline, "workers not ready in time"
            await asyncio.sleep(0.05)

    async def counter(self, session: aiohttp.ClientSession, name: str, query: str = "") -> float:
        async with session.get(f"{self.admin}/metrics{query}") as resp:  # open, like Prometheus
            assert resp.status == 200
            text = await resp.text()
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name
        )


@pytest.fixture(scope="module")
def workers(backends: Cluster) -> Iterator[Workers]:
    url, admin, proc = start(backends, write_config(backends, "workers"), "--workers", "2")
    yield Workers(url, admin, proc)
    assert stop(proc) == 0  # SIGTERM drains every worker; the supervisor exits 0


async def test_both_workers_take_traffic_and_metrics_merge(workers: Workers) -> None:
    requests = "geogate_requests_total"
    async with aiohttp.ClientSession() as admin:
        pids = await workers.pids(admin)
        assert len(set(pids)) == 2
        assert workers.proc.pid not in pids
        before = [await workers.counter(admin, requests, f"?worker={i}") for i in (0, 1)]
        # a new connection per request: the kernel spreads connections over the two sockets
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            for _ in range(40):
                headers = {"X-Forwarded-For": US}
                async with s.post(
                    f"{workers.url}/v1/chat/completions", json=CHAT, headers=headers
                ) as r:
                    assert r.status == 200
        after = [await workers.counter(admin, requests, f"?worker={i}") for i in (0, 1)]
        served = [a - b for a, b in zip(after, before, strict=True)]
        assert sum(served) == 40
        assert min(served) > 0, served
        assert await workers.counter(admin, requests) == sum(after)  # counters are summed
        async with admin.get(f"{workers.admin}/metrics") as resp:
            families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
        gauge = next(f for f in families.values() if f.type == "gauge")
        assert {s.labels["worker"] for s in gauge.samples} == {"0", "1"}  # gauges kept apart


async def test_admin_posts_go_to_every_worker(workers: Workers) -> None:
    async with aiohttp.ClientSession() as admin:
        async with admin.post(f"{workers.admin}/regions/eu-west-1/drain") as resp:
            assert resp.status == 401  # the supervisor checks the token
        for action in ("drain", "undrain"):
            async with admin.post(
                f"{workers.admin}/regions/eu-west-1/{action}", headers=AUTH
            ) as resp:
                assert resp.status == 200
                answer = orjson.loads(await resp.read())
            assert [w["slot"] for w in answer["workers"]] == [0, 1]
            assert all(w["body"]["drained"] is (action == "drain") for w in answer["workers"])
        async with admin.post(f"{workers.admin}/regions/nowhere/drain", headers=AUTH) as resp:
            assert resp.status == 404  # the worst status of the workers' answers


async def test_a_crashed_worker_is_restarted(workers: Workers) -> None:
    async with aiohttp.ClientSession() as admin:
        old = await workers.pids(admin)
        assert old[1] is not None
        os.kill(old[1], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while (pids := await workers.pids(admin))[1] == old[1] or not all(
            w["ready"] for w in (await workers.status(admin))["workers"]
        ):
            assert time.monotonic() < deadline, "the worker was not restarted"
            await asyncio.sleep(0.05)
        assert pids[0] == old[0]
        assert (await workers.status(admin))["workers"][1]["restarts"] >= 1


async def test_rolling_restart_under_load_fails_no_request(workers: Workers) -> None:
    results: list[int | str] = []
    done = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        while not done.is_set():
            try:
                async with session.post(
                    f"{workers.url}/v1/chat/completions", json=CHAT,
                    headers={"X-Forwarded-For": US},
                ) as resp:  # fmt: skip
                    await resp.read()
                    results.append(resp.status)
            except aiohttp.ClientError as exc:
                results.append(repr(exc))

    async with aiohttp.ClientSession() as admin, aiohttp.ClientSession() as load:
        await workers.wait_all_ready(admin)
        old = await workers.pids(admin)
        clients = [asyncio.create_task(client(load)) for _ in range(6)]
        try:
            await asyncio.sleep(0.3)
            workers.proc.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 40
            while set(await workers.pids(admin)) & set(old) or not all(
                w["ready"] for w in (await workers.status(admin))["workers"]
            ):
                assert time.monotonic() < deadline, "rolling restart did not finish"
                await asyncio.sleep(0.05)
            while any(alive(pid) for pid in old):  # the last one drains: keep the load on
                assert time.monotonic() < deadline, f"old workers {old} did not exit"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
        finally:
            done.set()
            await asyncio.gather(*clients)
    failed = [r for r in results if r != 200]
    assert failed == [], (len(results), failed[:5])
    assert len(results) > 50


def test_workers_need_a_free_port(backends: Cluster) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = write_config(backends, "taken")
        raw = yaml.safe_load(config.read_text())
        raw["gateway"]["listen"] = f"127.0.0.1:{taken.getsockname()[1]}"
        config.write_text(yaml.safe_dump(raw))
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "gateway", "-c", str(config), "--workers", "2"],
            cwd=ROOT, capture_output=True, timeout=30,
        )  # fmt: skip
    assert out.returncode == 1
    assert b"cannot listen on" in out.stderr
