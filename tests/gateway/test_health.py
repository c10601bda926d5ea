"""Active health probes against scripted loopback backends.

Each backend is a real aiohttp server on 127.0.0.1 whose answer the test flips (``mode``):
200, 503, hang (never answers), close the connection, reset it, cut the body short; a bound
but not listening socket stands for a backend that is down. Everything runs in real time:
probe timeouts of 30 to 60 ms against a backend that hangs, ``run()`` with intervals of tens
of milliseconds, waits on events (never a fixed sleep), and timing assertions that are lower
bounds, or upper bounds with slack for a busy machine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from pytest_aiohttp import AiohttpRawServer

from gateway.health import (
    PROBE_USER_AGENT,
    HealthChecker,
    ProbeResult,
    ProbeSettings,
    ProbeState,
    next_probe_delay,
)

FAST = ProbeSettings(timeout=0.05)  # single probes: a hang costs 50 ms of real time


@dataclass(frozen=True, slots=True)
class Seen:
    at: float  # loop time the request arrived
    method: str
    path: str
    headers: CIMultiDictProxy[str]
    body: bytes
    peer: tuple[str, int]  # the probe connection's client address


class Backend:
    """A scripted backend; ``mode`` says how it answers the next request."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.origin = ""
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._changed = asyncio.Condition()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        loop_time = asyncio.get_running_loop().time()
        body = await request.read()
        assert request.transport is not None
        peer = request.transport.get_extra_info("peername")
        self.seen.append(
            Seen(loop_time, request.method, request.path_qs, request.headers, body, peer)
        )
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await self._notify()
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1
            await self._notify()

    async def _answer(self, request: web.BaseRequest) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        match self.mode:
            case "ok":
                return web.json_response({"status": "ok"})
            case "204":
                return web.Response(status=204)
            case "503":  # what backend/health.py answers when failing or draining
                problem = {"type": "about:blank", "title": "unhealthy", "status": 503}
                return web.Response(
                    status=503, body=orjson.dumps(problem), content_type="application/problem+json"
                )
            case "hang":  # the probe gives up; handler_cancellation then cancels this
                await asyncio.Event().wait()
            case "close":
                transport.close()
            case "reset":
                sock = transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
            case "cut":
                resp = web.StreamResponse(headers={"Content-Length": "100"})
                await resp.prepare(request)
                await resp.write(b"x" * 10)
                transport.close()
                return resp
        return web.Response()  # never reaches a client: the connection is gone

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for_requests(self, n: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.seen) >= n)

    async def wait_idle(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight == 0)


MakeBackend = Callable[[], Awaitable[Backend]]


@pytest.fixture
def make_backend(aiohttp_raw_server: AiohttpRawServer) -> MakeBackend:
    async def make() -> Backend:
        backend = Backend()
        server = await aiohttp_raw_server(backend.handle)
        backend.origin = str(server.make_url("/")).rstrip("/")
        return backend

    return make


@pytest.fixture
async def backend(make_backend: MakeBackend) -> Backend:
    return await make_backend()


@pytest.fixture
def dead_origin() -> Iterator[str]:
    """A bound, not listening port: connecting to it is refused (and nobody else gets it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A dedicated probe session, as the gateway gives the checker: small, keep-alive."""
    connector = aiohttp.TCPConnector(limit=4, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as s:
        yield s
    assert s.closed


class Calls:
    """Records on_change / on_rtt calls; ``changed`` is set on each verdict change."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, bool]] = []
        self.rtts: list[tuple[str, float]] = []
        self.changed = asyncio.Event()

    def on_change(self, origin: str, healthy: bool) -> None:
        self.changes.append((origin, healthy))
        self.changed.set()

    def on_rtt(self, origin: str, seconds: float) -> None:
        self.rtts.append((origin, seconds))


# --- the delay arithmetic (pure) --------------------------------------------------------


def test_first_delay_spreads_over_one_interval() -> None:
    rng = random.Random(1)
    delays = [next_probe_delay(2.0, 0.2, rng, first=True) for _ in range(2000)]
    assert all(0.0 <= d < 2.0 for d in delays)
    assert min(delays) < 0.05
    assert max(delays) > 1.95


@pytest.mark.parametrize("jitter", [0.0, 0.2, 0.5])
def test_later_delays_stay_in_the_jitter_band(jitter: float) -> None:
    rng = random.Random(2)
    delays = [next_probe_delay(2.0, jitter, rng, first=False) for _ in range(2000)]
    low, high = 2.0 * (1 - jitter), 2.0 * (1 + jitter)
    assert all(low <= d <= high for d in delays)
    if jitter:
        assert min(delays) < low + 0.01 * high
        assert max(delays) > high * 0.99
    else:
        assert set(delays) == {2.0}


def test_settings_default_to_haproxy_inter_rise_fall() -> None:
    s = ProbeSettings()
    assert (s.path, s.interval, s.timeout) == ("/health", 2.0, 1.0)
    assert (s.healthy_threshold, s.unhealthy_threshold) == (2, 3)
    assert s.expected_statuses == frozenset(range(200, 300))
    assert s.initially_healthy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval": 0}, "interval must be > 0 s"),
        ({"timeout": -1.0}, "timeout must be > 0 s"),
        ({"healthy_threshold": 0}, "healthy_threshold must be >= 1"),
        ({"unhealthy_threshold": 0}, "unhealthy_threshold must be >= 1"),
        ({"jitter": 1.0}, "jitter must be in [0, 1)"),
        ({"path": "health"}, "path must start with '/'"),
        ({"expected_statuses": frozenset()}, "expected_statuses must not be empty"),
    ],
)
def test_settings_refuse_out_of_range_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ProbeSettings(**kwargs)  # type: ignore[arg-type]


async def test_endpoints_are_normalised_and_validated(session: aiohttp.ClientSession) -> None:
    origins = ["http://127.0.0.1:9201/", "http://127.0.0.1:9201", "https://eu.example:443"]
    checker = HealthChecker(session, origins, ProbeSettings())
    assert checker.origins == ("http://127.0.0.1:9201", "https://eu.example:443")
    assert checker.is_healthy("http://127.0.0.1:9201")
    with pytest.raises(KeyError):
        checker.is_healthy("http://127.0.0.1:9999")
    for bad in ["127.0.0.1:9201", "ftp://127.0.0.1:21", "http://127.0.0.1:9201/v1"]:
        with pytest.raises(ValueError, match="not an http"):
            HealthChecker(session, [bad], ProbeSettings())


# --- one probe ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "status", "error"),
    [
        ("503", 503, "status 503"),
        ("204", 204, None),  # any 2xx by default
        ("hang", None, "timeout after 0.05 s"),
        ("close", None, "connection closed"),
        ("reset", None, "connection reset"),
        ("cut", 200, "body cut short"),  # the head arrived; the body did not
    ],
)
async def test_probe_once_result_for_each_answer(
    backend: Backend,
    session: aiohttp.ClientSession,
    mode: str,
    status: int | None,
    error: str | None,
) -> None:
    backend.mode = mode
    checker = HealthChecker(session, [backend.origin], FAST)
    result = await checker.probe_once(backend.origin)
    assert (result.ok, result.status, result.error) == (error is None, status, error)
    assert (result.rtt is None) is (status is None or mode == "cut")


async def test_probe_once_succeeds_and_measures_rtt(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    calls = Calls()
    checker = HealthChecker(session, [backend.origin], FAST, on_rtt=calls.on_rtt)
    result = await checker.probe_once(backend.origin)
    assert result == ProbeResult(ok=True, status=200, rtt=result.rtt)
    assert result.rtt is not None
    assert 0 < result.rtt < FAST.timeout
    assert calls.rtts == [(backend.origin, result.rtt)]


async def test_probe_refused_by_a_port_with_nothing_listening(
    dead_origin: str, session: aiohttp.ClientSession
) -> None:
    calls = Calls()
    checker = HealthChecker(session, [dead_origin], FAST, on_rtt=calls.on_rtt)
    assert await checker.probe_once(dead_origin) == ProbeResult(ok=False, error="connect refused")
    assert calls.rtts == []


async def test_only_expected_statuses_count_as_success(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    settings = ProbeSettings(timeout=0.05, expected_statuses=frozenset({200}))
    checker = HealthChecker(session, [backend.origin], settings)
    backend.mode = "204"
    result = await checker.probe_once(backend.origin)
    assert (result.ok, result.error) == (False, "status 204")


async def test_probe_sends_only_probe_fields(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    settings = ProbeSettings(path="/health?deep=1")
    extra = {"Host": "eu-west.backend.internal", "User-Agent": "curl/8", "X-GeoGate-Probe": "0"}
    checker = HealthChecker(session, [backend.origin + "/"], settings, headers=extra)
    await checker.probe_once(backend.origin)
    [seen] = backend.seen
    assert (seen.method, seen.path, seen.body) == ("GET", "/health?deep=1", b"")
    assert seen.headers["User-Agent"] == PROBE_USER_AGENT  # the probe's identity wins
    assert seen.headers["X-GeoGate-Probe"] == "1"
    assert seen.headers["Host"] == "eu-west.backend.internal"
    assert not {"Cookie", "Authorization", "X-Forwarded-For"} & set(seen.headers)


async def test_probes_reuse_one_keep_alive_connection(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    checker = HealthChecker(session, [backend.origin], FAST)
    for _ in range(3):
        assert (await checker.probe_once(backend.origin)).ok
    assert len({s.peer for s in backend.seen}) == 1


# --- thresholds ---------------------------------------------------------------------------


async def test_down_after_three_failures_up_after_two_successes(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    calls = Calls()
    checker = HealthChecker(session, [backend.origin], FAST, on_change=calls.on_change)
    origin = backend.origin

    async def probe(mode: str) -> bool:
        backend.mode = mode
        await checker.probe_once(origin)
        return checker.is_healthy(origin)

    # a failure streak broken by a success does not count
    assert [await probe(m) for m in ("503", "503", "ok", "503", "503")] == [True] * 5
    assert calls.changes == []
    assert await probe("503") is False  # third in a row
    assert calls.changes == [(origin, False)]
    assert checker.state(origin) is ProbeState.UNHEALTHY
    assert [await probe(m) for m in ("503", "ok", "503", "ok")] == [False] * 4
    assert calls.changes == [(origin, False)]  # no call without a transition
    assert await probe("ok") is True  # second success in a row
    assert calls.changes == [(origin, False), (origin, True)]

    snap = checker.snapshot()[origin]
    assert snap["healthy"] is True
    assert snap["probes_total"] == 11
    assert snap["failures_total"] == 7
    assert (snap["consecutive_successes"], snap["consecutive_failures"]) == (2, 0)
    assert (snap["last_status"], snap["last_error"]) == (200, None)
    assert isinstance(snap["last_rtt_ms"], float)
    assert snap["last_rtt_ms"] > 0
    assert isinstance(snap["last_probe_age_s"], float)
    assert 0 <= snap["last_probe_age_s"] < 1


async def test_initially_unhealthy_needs_healthy_threshold_successes(
    dead_origin: str, backend: Backend, session: aiohttp.ClientSession
) -> None:
    calls = Calls()
    settings = ProbeSettings(timeout=0.05, initially_healthy=False)
    checker = HealthChecker(
        session, [backend.origin, dead_origin], settings, on_change=calls.on_change
    )
    snap = checker.snapshot()[dead_origin]
    assert snap["healthy"] is False
    assert snap["last_probe_age_s"] is None
    await checker.probe_once(backend.origin)
    assert not checker.is_healthy(backend.origin)
    await checker.probe_once(backend.origin)
    assert checker.is_healthy(backend.origin)
    for _ in range(4):
        await checker.probe_once(dead_origin)
    assert calls.changes == [(backend.origin, True)]  # already down: no transition to report
    assert checker.snapshot()[dead_origin]["last_error"] == "connect refused"


# --- run(): scheduling, cancellation, isolation (real time, intervals of tens of ms) -------

SLACK = 0.15  # s: loopback round trips plus scheduling on a busy machine; upper bounds only


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_run_jitters_every_wait_including_the_first(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    settings = ProbeSettings(interval=0.05, jitter=0.5, timeout=0.5)
    checker = HealthChecker(session, [backend.origin], settings, rng=random.Random(3))
    seeded = random.Random(3)
    delays = [next_probe_delay(0.05, 0.5, seeded, first=i == 0) for i in range(4)]
    assert min(delays[1:]) < 0.045
    assert max(delays[1:]) > 0.055
    start = asyncio.get_running_loop().time()
    task = asyncio.create_task(checker.run())
    async with asyncio.timeout(5):
        await backend.wait_for_requests(4)
    await _cancel(task)
    waits = _gaps([start, *(s.at for s in backend.seen[:4])])
    # a wait never ends before its seeded delay (asyncio timers do not fire early) and the
    # probe in between takes only a loopback round trip
    assert all(d - 1e-3 <= w < d + SLACK for w, d in zip(waits, delays, strict=True)), (
        waits,
        delays,
    )


async def test_a_slow_probe_never_overlaps_the_next(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    backend.mode = "hang"
    settings = ProbeSettings(interval=0.02, timeout=0.06)  # the probe outlasts the interval
    checker = HealthChecker(session, [backend.origin], settings)
    task = asyncio.create_task(checker.run())
    async with asyncio.timeout(5):
        await backend.wait_for_requests(3)
    await _cancel(task)
    assert backend.max_in_flight == 1
    assert all(g >= 0.06 + 0.02 * 0.8 - 1e-3 for g in _gaps([s.at for s in backend.seen]))
    assert checker.snapshot()[backend.origin]["last_error"] == "timeout after 0.06 s"


async def test_run_flips_the_verdict_and_cancels_cleanly(
    make_backend: MakeBackend, dead_origin: str, session: aiohttp.ClientSession
) -> None:
    up, hanging = await make_backend(), await make_backend()
    hanging.mode = "hang"
    calls = Calls()
    settings = ProbeSettings(interval=0.02, timeout=0.03)
    checker = HealthChecker(
        session, [up.origin, hanging.origin, dead_origin], settings, on_change=calls.on_change
    )
    task = asyncio.create_task(checker.run())
    async with asyncio.timeout(5):
        while len(calls.changes) < 2:  # both failing endpoints go DOWN
            await calls.changed.wait()
            calls.changed.clear()
        await hanging.wait_for_requests(len(hanging.seen) + 2)  # more failures, and one in flight
    assert sorted(calls.changes) == sorted([(hanging.origin, False), (dead_origin, False)])
    assert checker.is_healthy(up.origin)
    assert len(up.seen) >= 3

    await _cancel(task)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("health-probe")]
    assert not session.closed  # the caller's session: not ours to close
    async with asyncio.timeout(5):
        await hanging.wait_idle()  # the cancelled probe dropped its connection
    assert (await checker.probe_once(up.origin)).ok  # and the session still works


async def test_an_endpoint_raising_does_not_stop_the_others(
    make_backend: MakeBackend, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="geogate.health")
    broken, other = await make_backend(), await make_backend()
    calls = Calls()
    raising = True
    recovered = asyncio.Event()

    def on_rtt(origin: str, seconds: float) -> None:
        if origin == broken.origin:
            if raising:
                raise RuntimeError("metrics bug")
            recovered.set()

    settings = ProbeSettings(interval=0.02, timeout=0.5)
    checker = HealthChecker(
        session, [broken.origin, other.origin], settings, on_change=calls.on_change, on_rtt=on_rtt
    )
    task = asyncio.create_task(checker.run())
    async with asyncio.timeout(5):
        await broken.wait_for_requests(4)
        other.mode = "503"
        await calls.changed.wait()  # the other endpoint's loop goes on and flips
        assert calls.changes == [(other.origin, False)]
        assert checker.is_healthy(broken.origin)  # a bug is no evidence against an endpoint
        assert checker.snapshot()[broken.origin]["last_error"] == "internal error: RuntimeError"
        raising = False
        await recovered.wait()
    await _cancel(task)
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count(f"health probe of {broken.origin} failed unexpectedly") == 1
    assert f"health probe of {broken.origin} works again" in messages
    assert f"upstream {other.origin} is DOWN after 3 failed probes (last: status 503)" in messages
