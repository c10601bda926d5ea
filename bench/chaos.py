"""Chaos under load: kill, hang and restart backends while idempotent requests flow.

``python bench/chaos.py`` starts the four-region topology on loopback (us-east-1 x2,
eu-west-1 x2, eu-central-1 x1, ap-southeast-1 x1; ``python -m backend``, no model delay) and
one gateway in us-east-1 in front of it, with fast probes and an admin listener on an
ephemeral port with a random token. Then, for each scenario, it runs bounded load and breaks
things on a schedule (seconds from the scenario's start, x ``--time-scale``):

* ``replica``: SIGKILL us-east-1#0 at 2 s, restart it at 6 s, load until 9 s.
* ``region``: SIGKILL both eu-west-1 endpoints at 2 s, restart at 6 s. The gateway sends a
  zone to its lowest-latency region and the busy region tends to stay the lowest, so EU
  traffic may sit on eu-central-1 and the kill would hit no live traffic: eu-central-1 is
  drained from 0 to 1 s to put EU traffic on eu-west-1 (the report gives the share of EU
  answers from eu-west-1 in the second before the kill).
* ``zone``: SIGKILL every EU endpoint at 2 s, restart at 6 s. EU requests are expected to
  get 503 naming the zone meanwhile (fail closed); US and global ones must not fail.
* ``hang``: SIGSTOP us-east-1#0 at 2 s, SIGCONT at 6 s.

After each, a quiet recovery: the harness waits, through the admin ``/status``, until every
endpoint is available again before the next scenario starts.

Load: ``--concurrency`` workers (default 8), paced to ``--rate`` requests/s in all (default
400; 0: as fast as the answers come), to the gateway only (127.0.0.1). Requests take turns
over the zones eu (``X-Forwarded-For: 2.125.160.216``, GB), us (8.8.8.8) and global
(133.242.0.3, JP) and over two idempotent kinds: ``GET /ready`` and ``POST /chat/invoke``
with an ``Idempotency-Key`` (the gateway retries both). The pacing keeps the two-core
benchmark machine from saturating, so that detection times measure the gateway's failover
logic rather than CPU queueing on a shared admin/proxy event loop.

Measured per scenario (``bench/chaos_report.py`` defines each precisely): requests, failures
by zone, kind and class (status or exception), expected fail-closed 503s, residency
violations (a 2xx whose backend-stamped ``X-Served-Region`` is not a region of the request's
zone), and from the kill: *detection* (``/status`` polled every 20 ms until the victim
endpoint, or every victim region, shows ``available: false``; the time the answer arrived,
so an upper bound with 20 ms resolution), *probe verdict* (same, ``healthy: false``: the
active probes alone), *failover* (first success of an affected zone after the kill from a
region still alive); from the restart: *recovery* (victim available again).

Targets judged at the end (exit status 1 when one is missed): ``replica`` has no failed
request; ``region`` is detected within ``interval x unhealthy_threshold`` plus one probe
``timeout`` of slack; ``zone`` fails no US/global request; no scenario has a residency
violation, and each recovers.

Bounded and clean: start-up 60 s, each request 10 s, each admin call 2 s, each recovery
30 s; every child is stopped (SIGCONT, SIGTERM, then SIGKILL) on success, error, Ctrl-C or
SIGTERM, and gets SIGTERM from the kernel should this process die (``bench/processes.py``).
When a target is missed the children's logs are kept under ``bench/out/``.

Exit status: 0 every target met, 1 a target missed or the run failed, 2 bad arguments,
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/chaos.py` puts bench/, not the project, on the path
    sys.path.insert(0, str(ROOT))

from bench.chaos_report import (  # noqa: E402
    Observation,
    RequestRecord,
    ScenarioSpec,
    counter_totals,
    judge,
    render_markdown_section,
    render_scenario,
    render_table,
    summarise,
    summary_rows,
)
from bench.processes import READY_TIMEOUT, BenchError, Service  # noqa: E402
from bench.run import _command_line, machine_info, record  # noqa: E402
from gateway.config import parse_duration  # noqa: E402

__all__ = ["SCENARIOS", "TOPOLOGY", "Backend", "Cluster", "Fault", "build_parser", "main"]

OUT_DIR = ROOT / "bench" / "out"
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
OWN_REGION = "us-east-1"

# region -> (zones it may serve, endpoints): the demo's topology
TOPOLOGY: dict[str, tuple[tuple[str, ...], int]] = {
    "us-east-1": (("us", "global"), 2),
    "eu-west-1": (("eu", "global"), 2),
    "eu-central-1": (("eu", "global"), 1),
    "ap-southeast-1": (("global",), 1),
}
ZONE_REGIONS = {
    zone: frozenset(r for r, (zones, _) in TOPOLOGY.items() if zone in zones)
    for zone in ("eu", "us", "global")
}  # eu -> eu-west-1, eu-central-1; us -> us-east-1; global -> every region
CLIENTS = {"eu": "2.125.160.216", "us": "8.8.8.8", "global": "133.242.0.3"}  # GB, US, JP
KINDS = ("GET /ready", "POST /chat/invoke")

# Failover settings besides the probes: counts as the gateway's defaults, durations short
# enough that an endpoint back at 6 s is usable again within the scenario.
OUTLIER = {"consecutive_failures": 5, "base_ejection_time": "1s", "max_ejection_time": "5s"}
BREAKER = {"fail_max": 5, "reset_timeout": "1s"}
ROUTE = {
    "prefix": "/",
    "timeouts": {"connect": "500ms", "first_byte": "1s", "idle": "2s", "total": "5s"},
    "retry": {"attempts": 3},
}

POLL_INTERVAL = 0.02  # seconds between two admin /status polls while watching
REQUEST_TIMEOUT = 10.0  # seconds: one load request, whatever the gateway does
ADMIN_TIMEOUT = 2.0  # seconds: one admin call
RECOVERY_TIMEOUT = 30.0  # seconds for the victims, then everything, to be available again
EXIT_TIMEOUT = 5.0  # seconds for a SIGKILLed backend to be reaped


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """A scenario's schedule and victims.

    Attributes:
        spec: name, description and expectations (for the report).
        victims: ``(region, endpoint index)`` pairs.
        sig: SIGKILL (restored by a restart) or SIGSTOP (restored by SIGCONT).
        watch_regions: detection waits for these regions to be unavailable; empty: for the
            victim endpoints.
        steer_away: regions drained from the start until 1 s before the kill, so that the
            zone's traffic sits on the victim region when it dies (the gateway keeps sending
            a zone to its lowest-latency region, and the busy region tends to stay lowest).
        kill_at, restore_at, end_at: seconds from the scenario's start, before scaling.
    """

    spec: ScenarioSpec
    victims: tuple[tuple[str, int], ...]
    sig: signal.Signals = signal.SIGKILL
    watch_regions: tuple[str, ...] = ()
    steer_away: tuple[str, ...] = ()
    kill_at: float = 2.0
    restore_at: float = 6.0
    end_at: float = 9.0


def _fault(
    name: str,
    victims: tuple[tuple[str, int], ...],
    *,
    sig: signal.Signals = signal.SIGKILL,
    affected: tuple[str, ...],
    dead: tuple[str, ...] = (),
    fail_closed: tuple[str, ...] = (),
    steer_away: tuple[str, ...] = (),
) -> Fault:
    who = ", ".join(f"{r}#{i}" for r, i in victims)
    steer = f" ({'+'.join(steer_away)} drained 0-1 s)" if steer_away else ""
    return Fault(
        spec=ScenarioSpec(
            name=name,
            fault=f"{sig.name} {who}{steer}",
            dead_regions=frozenset(dead),
            affected_zones=affected,
            fail_closed_zones=frozenset(fail_closed),
        ),
        victims=victims,
        sig=sig,
        watch_regions=dead,
        steer_away=steer_away,
    )


SCENARIOS: dict[str, Fault] = {
    "replica": _fault("replica", (("us-east-1", 0),), affected=("us", "global")),
    "region": _fault(
        "region",
        (("eu-west-1", 0), ("eu-west-1", 1)),
        affected=("eu",),
        dead=("eu-west-1",),
        steer_away=("eu-central-1",),
    ),
    "zone": _fault(
        "zone",
        (("eu-west-1", 0), ("eu-west-1", 1), ("eu-central-1", 0)),
        affected=("eu",),
        dead=("eu-west-1", "eu-central-1"),
        fail_closed=("eu",),
    ),
    "hang": _fault("hang", (("us-east-1", 0),), sig=signal.SIGSTOP, affected=("us", "global")),
}

_BACKEND_READY = re.compile(r"backend \S+ listening on (http://127\.0\.0\.1:(\d+))")
_ADMIN_READY = re.compile(r"admin listening on (127\.0\.0\.1:\d+)")
_GATEWAY_READY = re.compile(r"gateway \S+ listening on (127\.0\.0\.1:\d+)")


# --- processes ----------------------------------------------------------------------------------


class Backend:
    """One backend endpoint on a fixed loopback port, restarted in place after a kill.

    The first start asks for port 0 and keeps the port it got, so a restart listens where
    the gateway's config expects it (aiohttp binds with SO_REUSEADDR).
    """

    def __init__(self, region: str, index: int, workdir: Path) -> None:
        self.region = region
        self.index = index
        self.workdir = workdir
        self.port = 0
        self.starts = 0
        self.service: Service | None = None

    @property
    def name(self) -> str:
        return f"{self.region}#{self.index}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        return f"<Backend {self.name} port={self.port} starts={self.starts} {self.service!r}>"

    def spawn(self) -> Service:
        """Start a new process for this endpoint (not waiting for it to listen)."""
        zones = ",".join(TOPOLOGY[self.region][0])
        self.starts += 1
        self.service = Service(
            f"backend {self.name}",
            [sys.executable, "-m", "backend", "--region", self.region, "--zones", zones,
             "--host", "127.0.0.1", "--port", str(self.port), "--ttft-ms", "0",
             "--tokens-per-second", "0", "--health-ttl", "0"],
            log_path=self.workdir / f"backend-{self.region}-{self.index}-{self.starts}.log",
            cpus=None,
        )  # fmt: skip
        return self.service

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the current process."""
        assert self.service is not None
        self.service.proc.send_signal(sig)

    def stop(self) -> None:
        """SIGCONT (a stopped process ignores SIGTERM until then), then Service.stop."""
        if self.service is not None and self.service.proc.poll() is None:
            self.service.proc.send_signal(signal.SIGCONT)
            self.service.stop()


async def wait_listening(service: Service, pattern: re.Pattern[str]) -> re.Match[str]:
    """``Service.wait_ready`` without blocking the event loop (the load keeps going).

    Raises:
        BenchError: the process exited, or READY_TIMEOUT seconds passed.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    while loop.time() < deadline:
        if match := pattern.search(service.log_path.read_text(errors="replace")):
            return match
        if service.proc.poll() is not None:
            raise BenchError(
                f"{service.name} exited with {service.proc.returncode} before it was ready:\n"
                + service.log_tail()
            )
        await asyncio.sleep(0.02)
    raise BenchError(f"{service.name} not ready within {READY_TIMEOUT:.0f} s")


async def wait_exited(service: Service) -> None:
    """Reap a killed process without blocking the loop (bounded by EXIT_TIMEOUT)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EXIT_TIMEOUT
    while service.proc.poll() is None:
        if loop.time() > deadline:
            raise BenchError(f"{service.name} still running {EXIT_TIMEOUT:.0f} s after SIGKILL")
        await asyncio.sleep(0.01)


class Cluster:
    """The topology, the gateway and the admin client, all on 127.0.0.1."""

    def __init__(self, stack: contextlib.ExitStack, workdir: Path, probe: dict[str, Any]) -> None:
        self.workdir = workdir
        self.token = secrets.token_urlsafe(24)
        self.backends: dict[tuple[str, int], Backend] = {}
        for region, (_, count) in TOPOLOGY.items():
            for index in range(count):
                backend = Backend(region, index, workdir)
                stack.callback(backend.stop)
                backend.spawn()
                self.backends[region, index] = backend
        for backend in self.backends.values():  # started together, waited for in turn
            assert backend.service is not None
            backend.port = int(backend.service.wait_ready(_BACKEND_READY).group(2))
        config = workdir / "gateway.json"
        config.write_text(json.dumps(self.gateway_config(probe), indent=2))  # JSON is YAML
        self.gateway = Service(
            "gateway",
            [sys.executable, "-m", "gateway", "--log-level", "WARNING", "gateway", "-c",
             str(config)],
            log_path=workdir / "gateway.log",
            cpus=None,
        )  # fmt: skip
        stack.callback(self.gateway.stop)  # LIFO: the gateway stops before the backends
        self.admin = "http://" + self.gateway.wait_ready(_ADMIN_READY).group(1)
        self.url = "http://" + self.gateway.wait_ready(_GATEWAY_READY).group(1)

    def gateway_config(self, probe: dict[str, Any]) -> dict[str, Any]:
        """The gateway's config: us-east-1, the topology, one route with retries, admin."""
        regions: dict[str, dict[str, Any]] = {}
        for (region, _), backend in self.backends.items():
            entry = regions.setdefault(
                region, {"zones": list(TOPOLOGY[region][0]), "endpoints": []}
            )
            entry["endpoints"].append(backend.url)
        return {
            "gateway": {
                "region": OWN_REGION,
                "listen": "127.0.0.1:0",
                "trusted_proxies": ["127.0.0.1/32"],
                "geodb": str(ROOT / "geodb" / "dbip-country.mmdb"),
                "limits": {"max_body_bytes": "1MiB"},
            },
            "residency": {"policy": str(ROOT / "config" / "residency.yaml")},
            "regions": regions,
            "routes": [ROUTE],
            "upstream": {
                "health": {
                    "interval": f"{probe['interval_ms']}ms",
                    "timeout": f"{probe['timeout_ms']}ms",
                    "healthy_threshold": probe["healthy_threshold"],
                    "unhealthy_threshold": probe["unhealthy_threshold"],
                },
                "outlier": OUTLIER,
                "breaker": BREAKER,
            },
            "admin": {"listen": "127.0.0.1:0", "token": self.token},
        }

    # admin API

    async def status(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        """GET /status (raises aiohttp.ClientError, TimeoutError, BenchError on non-200)."""
        headers = {"Authorization": f"Bearer {self.token}"}
        async with session.get(f"{self.admin}/status", headers=headers) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise BenchError(f"admin /status answered {resp.status}: {body[:200]!r}")
            result: dict[str, Any] = orjson.loads(body)
            return result

    async def set_drained(self, session: aiohttp.ClientSession, region: str, drained: bool) -> None:
        """POST /regions/{region}/drain or /undrain.

        Raises:
            BenchError: the admin API refused.
        """
        headers = {"Authorization": f"Bearer {self.token}"}
        action = "drain" if drained else "undrain"
        async with session.post(f"{self.admin}/regions/{region}/{action}", headers=headers) as r:
            if r.status != 200:
                raise BenchError(f"admin {action} {region} answered {r.status}")

    async def counters(self, session: aiohttp.ClientSession) -> dict[str, float]:
        """The gateway's failover counters from /metrics (``counter_totals``)."""
        async with session.get(f"{self.admin}/metrics") as resp:
            return counter_totals(await resp.text())


# --- status predicates --------------------------------------------------------------------------


def _endpoint(status: dict[str, Any], backend: Backend) -> dict[str, Any]:
    for entry in status["regions"][backend.region]["endpoints"]:
        if entry["url"] == backend.url:
            found: dict[str, Any] = entry
            return found
    raise BenchError(f"{backend.url} missing from the admin /status")


def _reasons(entry: dict[str, Any]) -> set[str]:
    """Why the gateway holds an endpoint unavailable, from its /status entry."""
    out = set()
    if not entry["healthy"]:
        out.add("probe")
    if entry["outlier"].get("state") == "ejected":
        out.add("outlier")
    if entry["breaker"].get("state") == "open":
        out.add("breaker")
    if entry.get("held_for_s", 0) > 0:
        out.add("retry-after")
    return out


def all_available(status: dict[str, Any]) -> bool:
    """Every endpoint available and no region drained."""
    return all(
        e["available"] and not r["drained"]
        for r in status["regions"].values()
        for e in r["endpoints"]
    )


# --- load ---------------------------------------------------------------------------------------


def _problem_summary(body: bytes) -> tuple[str | None, str]:
    """(the ``zone`` member, ``"slug: detail"``) of an RFC 9457 problem body; for another
    body, (None, its first 160 characters)."""
    try:
        problem = orjson.loads(body)
    except orjson.JSONDecodeError:
        problem = None
    if not isinstance(problem, dict):
        return None, body[:160].decode(errors="replace")
    slug = str(problem.get("type", "")).rsplit("/", 1)[-1]
    zone = problem.get("zone")
    return (zone if isinstance(zone, str) else None), f"{slug}: {problem.get('detail', '')}"[:160]


async def one_request(
    session: aiohttp.ClientSession, url: str, *, n: int, tag: str, zone: str, kind: str, t0: float
) -> RequestRecord:
    """Send one idempotent request as a client of ``zone``; never raises for a failure."""
    loop = asyncio.get_running_loop()
    headers = {"X-Forwarded-For": CLIENTS[zone], "X-Request-Id": f"{tag}-{n}"}
    sent = loop.time() - t0
    try:
        if kind == "GET /ready":
            req = session.get(f"{url}/ready", headers=headers)
        else:
            headers["Idempotency-Key"] = f"{tag}-{n}"
            body = {"input": {"question": f"What are the data residency rules? ({n % 7})"}}
            req = session.post(f"{url}/chat/invoke", headers=headers, json=body)
        async with req as resp:
            data = await resp.read()
            problem_zone, detail = None, None
            if not 200 <= resp.status < 300:
                problem_zone, detail = _problem_summary(data)
            return RequestRecord(
                n=n, sent=sent, done=loop.time() - t0, zone=zone, kind=kind,
                status=resp.status, served_region=resp.headers.get("X-Served-Region"),
                problem_zone=problem_zone, detail=detail,
            )  # fmt: skip
    except (aiohttp.ClientError, TimeoutError) as exc:
        return RequestRecord(
            n=n, sent=sent, done=loop.time() - t0, zone=zone, kind=kind, status=0,
            error=type(exc).__name__, detail=str(exc)[:160] or None,
        )  # fmt: skip


async def run_load(
    session: aiohttp.ClientSession,
    url: str,
    *,
    tag: str,
    t0: float,
    stop_at: float,
    concurrency: int,
    rate: float,
    into: list[RequestRecord],
) -> None:
    """Workers send requests until loop time ``stop_at``, each paced to rate/concurrency.

    Request n goes out as zone ``n % 3`` (eu, us, global) and kind ``(n // 3) % 2``, so
    every zone sends both kinds. A worker whose answer is late starts the next request at
    once but never bunches up to catch up.
    """
    loop = asyncio.get_running_loop()
    counter = itertools.count()
    zones = list(CLIENTS)
    spacing = concurrency / rate if rate > 0 else 0.0  # seconds between one worker's sends

    async def worker(k: int) -> None:
        next_at = t0 + spacing * k / concurrency
        while (now := loop.time()) < stop_at:
            if next_at > now:
                await asyncio.sleep(min(next_at, stop_at) - now)
                continue
            n = next(counter)
            into.append(
                await one_request(
                    session,
                    url,
                    n=n,
                    tag=tag,
                    zone=zones[n % 3],
                    kind=KINDS[(n // 3) % 2],
                    t0=t0,
                )
            )
            next_at = max(next_at + spacing, loop.time() - spacing)

    await asyncio.gather(*(worker(k) for k in range(concurrency)))


# --- one scenario -------------------------------------------------------------------------------


async def poll_until(
    cluster: Cluster,
    session: aiohttp.ClientSession,
    check: Callable[[dict[str, Any]], bool],
    *,
    until: float,
) -> tuple[float, dict[str, Any]] | None:
    """Poll /status every POLL_INTERVAL until ``check`` holds or loop time ``until``.

    Returns:
        (loop time the matching answer arrived, that status), or None. A failed poll is
        skipped.
    """
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        try:
            status = await cluster.status(session)
        except (aiohttp.ClientError, TimeoutError):
            status = None
        if status is not None and check(status):
            return loop.time(), status
        await asyncio.sleep(POLL_INTERVAL)
    return None


async def watch_detection(
    cluster: Cluster,
    session: aiohttp.ClientSession,
    fault: Fault,
    victims: Sequence[Backend],
    obs: Observation,
    *,
    t0: float,
    until: float,
) -> None:
    """From the kill until ``until``: note when the victims go unavailable and why, and when
    the probes alone call every victim endpoint unhealthy."""

    def down(status: dict[str, Any]) -> bool:
        if fault.watch_regions:
            return not any(status["regions"][r]["available"] for r in fault.watch_regions)
        return not any(_endpoint(status, b)["available"] for b in victims)

    def check(status: dict[str, Any]) -> bool:
        now = asyncio.get_running_loop().time() - t0
        if obs.detection is None and down(status):
            obs.detection = now
            reasons: set[str] = set()
            for b in victims:
                reasons |= _reasons(_endpoint(status, b))
            obs.detected_by = sorted(reasons)
        if obs.probe_verdict is None and not any(_endpoint(status, b)["healthy"] for b in victims):
            obs.probe_verdict = now
        return obs.detection is not None and obs.probe_verdict is not None

    await poll_until(cluster, session, check, until=until)


async def sleep_until(when: float) -> None:
    await asyncio.sleep(max(0.0, when - asyncio.get_running_loop().time()))


async def run_scenario(
    cluster: Cluster, fault: Fault, args: argparse.Namespace, run_tag: str
) -> dict[str, Any]:
    """Load, fault, restore, recover; return the scenario's summary (``summarise``)."""
    loop = asyncio.get_running_loop()
    scale = args.time_scale
    victims = [cluster.backends[v] for v in fault.victims]
    admin_timeout = aiohttp.ClientTimeout(total=ADMIN_TIMEOUT)
    load_timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    records: list[RequestRecord] = []
    async with (
        aiohttp.ClientSession(timeout=admin_timeout) as admin,
        aiohttp.ClientSession(
            timeout=load_timeout, connector=aiohttp.TCPConnector(limit=args.concurrency)
        ) as load_session,
    ):
        before = await cluster.counters(admin)
        t0 = loop.time()
        obs = Observation(kill=fault.kill_at * scale, restore=fault.restore_at * scale,
                          end=fault.end_at * scale)  # fmt: skip
        load = asyncio.create_task(
            run_load(
                load_session,
                cluster.url,
                tag=f"{run_tag}-{fault.spec.name}",
                t0=t0,
                stop_at=t0 + obs.end,
                concurrency=args.concurrency,
                rate=args.rate,
                into=records,
            )
        )
        try:
            if fault.steer_away:
                for region in fault.steer_away:
                    await cluster.set_drained(admin, region, True)
                await sleep_until(t0 + obs.kill - 1.0 * scale)
                for region in fault.steer_away:
                    await cluster.set_drained(admin, region, False)
            await sleep_until(t0 + obs.kill)
            for backend in victims:
                backend.send(fault.sig)
            obs.kill = loop.time() - t0
            print(f"  {obs.kill:5.2f} s  {fault.spec.fault}", file=sys.stderr)
            await watch_detection(
                cluster, admin, fault, victims, obs, t0=t0, until=t0 + obs.restore
            )
            await sleep_until(t0 + obs.restore)
            obs.restore = loop.time() - t0
            await restore(fault, victims, obs, t0=t0)
            print(f"  {obs.restore:5.2f} s  restored", file=sys.stderr)
            back = await poll_until(
                cluster, admin,
                lambda s: all(_endpoint(s, b)["available"] for b in victims),
                until=loop.time() + RECOVERY_TIMEOUT,
            )  # fmt: skip
            obs.recovery = None if back is None else back[0] - t0
            await load
        finally:
            if not load.done():
                load.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await load
            for region in fault.steer_away:  # no-op unless an error came first
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, BenchError):
                    await cluster.set_drained(admin, region, False)
        settled = await poll_until(
            cluster, admin, all_available, until=loop.time() + RECOVERY_TIMEOUT
        )
        obs.settled = settled is not None
        after = await cluster.counters(admin)
    obs.metrics = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after.keys() | before}
    return summarise(fault.spec, records, obs, ZONE_REGIONS)


async def restore(fault: Fault, victims: Sequence[Backend], obs: Observation, *, t0: float) -> None:
    """SIGCONT the stopped victims, or restart the killed ones on their ports."""
    if fault.sig is signal.SIGSTOP:
        for backend in victims:
            backend.send(signal.SIGCONT)
        return
    for backend in victims:
        assert backend.service is not None
        await wait_exited(backend.service)
    services = [backend.spawn() for backend in victims]
    await asyncio.gather(*(wait_listening(s, _BACKEND_READY) for s in services))
    obs.listening = asyncio.get_running_loop().time() - t0


async def preflight(cluster: Cluster) -> None:
    """Wait until every endpoint is available, then check each zone's client is located and
    served as the scenarios assume.

    Raises:
        BenchError: not available within RECOVERY_TIMEOUT, or a zone answered wrongly.
    """
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        if await poll_until(cluster, session, all_available,
                            until=loop.time() + RECOVERY_TIMEOUT) is None:  # fmt: skip
            raise BenchError(f"not every endpoint available within {RECOVERY_TIMEOUT:.0f} s")
        for zone, ip in CLIENTS.items():
            headers = {"X-Forwarded-For": ip}
            async with session.get(f"{cluster.url}/ready", headers=headers) as resp:
                await resp.read()
                got = (resp.status, resp.headers.get("X-Residency-Zone"))
                region = resp.headers.get("X-Served-Region")
            if got != (200, zone) or region not in ZONE_REGIONS[zone]:
                raise BenchError(
                    f"client {ip} (zone {zone}): status {got[0]}, X-Residency-Zone {got[1]!r}, "
                    f"X-Served-Region {region!r}: the geodb or the policy is not what the "
                    "scenarios assume"
                )


async def run_all(
    cluster: Cluster, faults: Sequence[Fault], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Preflight, then every scenario in turn. SIGTERM cancels it, as Ctrl-C does."""
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    await preflight(cluster)
    run_tag = "chaos" + secrets.token_hex(3)
    results = []
    for fault in faults:
        print(f"scenario {fault.spec.name}: {fault.spec.fault}", file=sys.stderr)
        result = await run_scenario(cluster, fault, args, run_tag)
        print(render_scenario(result), file=sys.stderr)
        results.append(result)
    return results


# --- main ---------------------------------------------------------------------------------------


def _duration_ms(text: str) -> int:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return round(seconds * 1000)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``bench/chaos.py``."""
    p = argparse.ArgumentParser(
        prog="bench/chaos.py",
        description="Kill, hang and restart backends under load; check failover and residency.",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)} (default: all, in that order)",
    )
    p.add_argument("--concurrency", type=int, default=8, help="load workers (default 8)")
    p.add_argument(
        "--rate", type=float, default=400.0,
        help="requests/s over all workers (default 400; 0: unpaced)",
    )  # fmt: skip
    p.add_argument(
        "--probe-interval", type=_duration_ms, default=500, metavar="DURATION",
        help="upstream.health.interval, e.g. 500ms (bare number: seconds; default 500ms)",
    )  # fmt: skip
    p.add_argument(
        "--probe-timeout", type=_duration_ms, default=300, metavar="DURATION",
        help="upstream.health.timeout (default 300ms)",
    )  # fmt: skip
    p.add_argument("--healthy-threshold", type=int, default=2, help="default 2")
    p.add_argument("--unhealthy-threshold", type=int, default=2, help="default 2")
    p.add_argument(
        "--time-scale", type=float, default=1.0,
        help="multiply the schedule (kill 2 s, restore 6 s, end 9 s) by this (default 1)",
    )  # fmt: skip
    p.add_argument(
        "--out", type=Path, help="JSON results file (default bench/out/chaos-<UTC time>.json)"
    )
    p.add_argument("--record", action="store_true", help="append a section to bench/RESULTS.md")
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Fault]:
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if args.rate < 0:
        parser.error("--rate must be 0 or more")
    if args.healthy_threshold < 1 or args.unhealthy_threshold < 1:
        parser.error("thresholds must be at least 1")
    if not 0.1 <= args.time_scale <= 10:
        parser.error("--time-scale must be within [0.1, 10]")
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        parser.error(f"--scenarios: unknown {unknown}; choose from {', '.join(SCENARIOS)}")
    faults = [SCENARIOS[n] for n in dict.fromkeys(names)]
    window = min(f.restore_at - f.kill_at for f in faults) * args.time_scale * 1000
    bound = args.probe_interval * args.unhealthy_threshold + args.probe_timeout
    if window < bound:
        parser.error(
            f"kill -> restore is {window:.0f} ms at this --time-scale, shorter than the "
            f"detection bound {bound} ms: detection could not be seen"
        )
    return faults


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: load cancelled, children stopped


def _settings(args: argparse.Namespace, faults: Sequence[Fault]) -> dict[str, Any]:
    rate = f"paced to {args.rate:g} req/s in all" if args.rate else "unpaced (closed loop)"
    topology = ", ".join(f"{r} x{n} [{', '.join(z)}]" for r, (z, n) in TOPOLOGY.items())
    return {
        "scenarios": [f.spec.name for f in faults],
        "concurrency": args.concurrency,
        "rate_per_s": args.rate,
        "rate_desc": rate,
        "time_scale": args.time_scale,
        "probe": {
            "interval_ms": args.probe_interval,
            "timeout_ms": args.probe_timeout,
            "healthy_threshold": args.healthy_threshold,
            "unhealthy_threshold": args.unhealthy_threshold,
            "jitter": 0.2,  # the gateway's default (upstream.health.jitter)
        },
        "outlier": OUTLIER,
        "breaker": BREAKER,
        "route": ROUTE,
        "topology": topology,
    }


def chaos(args: argparse.Namespace, faults: Sequence[Fault]) -> dict[str, Any]:
    """Start everything, run the scenarios, stop everything; return the results (JSON-ready).

    Raises:
        BenchError: a process did not start, the preflight failed, a restart failed.
    """
    started = dt.datetime.now(dt.UTC)
    result: dict[str, Any] = {
        "command": _command_line(),
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": _settings(args, faults),
    }
    probe = result["settings"]["probe"]
    print(
        f"probes: interval {probe['interval_ms']} ms, timeout {probe['timeout_ms']} ms, "
        f"healthy_threshold {probe['healthy_threshold']}, unhealthy_threshold "
        f"{probe['unhealthy_threshold']}; detection bound "
        f"{probe['interval_ms'] * probe['unhealthy_threshold']} ms (+{probe['timeout_ms']} ms "
        "slack)",
        file=sys.stderr,
    )
    workdir = Path(tempfile.mkdtemp(prefix="geogate-chaos-"))
    keep = False
    try:
        with contextlib.ExitStack() as stack:
            cluster = Cluster(stack, workdir, probe)
            print(f"gateway {cluster.url}, admin {cluster.admin}", file=sys.stderr)
            try:
                result["scenarios"] = asyncio.run(run_all(cluster, faults, args))
            except asyncio.CancelledError:  # SIGTERM (see run_all)
                raise KeyboardInterrupt from None
            except KeyboardInterrupt:
                raise
            except BaseException:
                keep = True
                raise
            finally:  # closing the loop reset SIGTERM to its default
                signal.signal(signal.SIGTERM, _on_sigterm)
        verdicts = judge(result["scenarios"], probe=probe)
        result["verdicts"] = [v.to_json() for v in verdicts]
        result["passed"] = all(v.passed for v in verdicts)
        keep = not result["passed"]
    finally:
        if keep:
            logs = OUT_DIR / f"chaos-logs-{started.strftime('%Y-%m-%dT%H%M%S')}"
            logs.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(workdir, logs, dirs_exist_ok=True)
            print(f"process logs kept in {logs}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
    result["finished_utc"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chaos scenarios; print the tables and verdicts; save JSON; maybe record.

    Returns:
        The exit status (see the module docstring).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    faults = _check_args(parser, args)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        result = chaos(args, faults)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: every process stopped", file=sys.stderr)
        return 130

    print(render_table(summary_rows(result["scenarios"])))
    for verdict in result["verdicts"]:
        print(("PASS " if verdict["passed"] else "FAIL ") + f"{verdict['target']}: "
              f"{verdict['detail']}")  # fmt: skip
    out = args.out or OUT_DIR / f"chaos-{result['started_utc'].replace(':', '')[:17]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"results: {out}", file=sys.stderr)
    if args.record:
        record(render_markdown_section(result), RESULTS_MD)
        print(f"recorded in {RESULTS_MD}", file=sys.stderr)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
