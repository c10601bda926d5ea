"""Rate limiting: accuracy across gateways sharing one Redis, and its cost per request.

``python bench/ratelimit_bench.py`` starts everything on 127.0.0.1 with ephemeral ports
(``python -m backend`` with no model delay, ``python -m gateway gateway``, ``redis-server``)
and runs, in this order, the scenarios asked for with ``--scenarios``:

* ``accuracy``: one redis-server, one backend, ``--gateways`` (default 4) gateway processes
  with the same config (``redis.control`` pointing at that Redis), one tenant whose policy is
  ``--rate`` requests/s with ``--burst`` (default 50/s, burst 20). An open-loop client (this
  process, aiohttp) sends the fixed non-streaming chat completion of
  ``bench/wrk/chat_body.json`` on a fixed schedule, round robin over the gateways, for
  ``--duration`` seconds, at ``--overload`` (default 3) times what the limit admits over the
  run: ``overload x (burst + rate x duration) / duration`` requests per second.
* ``accuracy-tokens``: the same processes, another tenant with ``--tokens-per-minute``
  (default 6000: GCRA rate 100 tokens/s, burst 6000) and streamed completions
  (``stream: true``, ``max_tokens`` ``--max-tokens``, ``stream_options.include_usage`` so
  the client reads each answer's true ``usage.total_tokens`` from its last chunk). The
  admitted quantity is the sum of the tokens used by admitted requests; the pacing divides
  by the tokens one answer uses (measured once before the run).
* ``accuracy-local``: one gateway without Redis (the in-process store), the policy of
  ``accuracy``.
* ``overhead``: one redis-server, one backend and two gateways with the same config except
  that one applies a policy too high to refuse anything (limiting *on*: one Redis script per
  request, ``requests_per_second`` only) and the other applies none (*off*); both require
  the API key. wrk (``bench/wrk/post_chat_auth.lua``) runs ``--repeats`` x ``--duration`` s
  against each, interleaved (on, off, then off, on, ...), reusing ``bench/run.py``'s wrk
  runner and pinning: gateways on the first CPU, backend, wrk and this harness on the second
  (``--no-pin`` turns it off); Redis unpinned by default (``--redis-cpus``). Before each
  limiting-on run the harness waits until the gateway decides in Redis again: a burst of
  load can make Redis calls miss ``call_timeout`` (20 ms by default, ``--call-timeout``),
  and after 3 such calls the gateway decides in process for ``breaker_reset_timeout`` (5 s).
  Decisions taken in process during a run are counted (the *fallback* column).

Accuracy is judged by ``bench/ratelimit_report.py``: expected = ``burst + rate x span`` with
``span`` the time from the first to the last request *sent* (client clock); the target is
within 1 % of expected, or one request's cost. Each accuracy scenario also reads the
gateways' ``/metrics`` (an admin listener on an ephemeral port) for the decisions by result,
to show whether any came from the local fallback (Redis slower than ``call_timeout``).

Bounded and clean: every request has a 10 s timeout, each accuracy run ``duration + 30`` s,
each wrk run ``duration + 30`` s, start-up 60 s; every child is stopped (SIGTERM, then
SIGKILL) on success, error, Ctrl-C or SIGTERM, and gets SIGTERM from the kernel should this
process die (``bench/processes.py``).

Exit status: 0 the run was clean (a missed accuracy target is reported, and fails only with
``--strict``), 1 errors other than 429 / wrk errors / the benchmark could not run, 2 bad
arguments, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/ratelimit_bench.py` puts bench/ on the path
    sys.path.insert(0, str(ROOT))

from bench.processes import BenchError, Service  # noqa: E402
from bench.ratelimit_report import (  # noqa: E402
    Accuracy,
    LimitSpec,
    Outcome,
    OverheadRun,
    accuracy_of,
    accuracy_rows,
    gateway_rows,
    overhead_rows,
    overhead_summary,
)
from bench.report import render_markdown, render_text  # noqa: E402
from bench.run import (  # noqa: E402
    OUT_DIR,
    REGION,
    RESULTS_MD,
    WRK_DIR,
    Scenario,
    _command_line,
    _describe_pins,
    choose_pins,
    gateway_config,
    machine_info,
    record,
    run_wrk,
)
from gateway.ratelimit import estimate_tokens  # noqa: E402
from gateway.tenants import hash_key  # noqa: E402

__all__ = ["SCENARIOS", "build_parser", "main", "offer", "stream_usage"]

SCENARIOS = ("accuracy", "accuracy-tokens", "accuracy-local", "overhead")
CHAT_PATH = "/v1/chat/completions"
CHAT_BODY: dict[str, Any] = json.loads((WRK_DIR / "chat_body.json").read_bytes())
API_KEY_ENV = "GEOGATE_BENCH_API_KEY"  # read by bench/wrk/post_chat_auth.lua

REQUEST_TIMEOUT = 10.0  # seconds per client request, whole answer included
RUN_GRACE = 30.0  # seconds an accuracy run may take beyond --duration before it is abandoned
SETTLE = 0.5  # seconds after the last answer before /metrics is read (deferred reconciliation)
START_DELAY = 0.05  # seconds from creating the schedule to its first send
SHARED_TIMEOUT = 20.0  # seconds to wait for a gateway to decide in Redis again (breaker)
HIGH = 1_000_000  # requests/s and burst of the policy that never refuses (warm-up, overhead)

GATEWAY_READY = re.compile(r"gateway \S+ listening on ([\d.]+:\d+)")
ADMIN_READY = re.compile(r"admin listening on ([\d.]+:\d+)")
BACKEND_READY = re.compile(r"listening on (http://\S+)")
REDIS_READY = re.compile(r"Ready to accept connections")
_DECISION = re.compile(r"^geogate_ratelimit_decisions_total\{([^}]*)\} (\S+)$", re.MULTILINE)
_DEGRADED = re.compile(r"^geogate_ratelimit_store_degraded_total (\S+)$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def api_key(tenant: str) -> str:
    """The API key of a benchmark tenant (not a secret: loopback only, thrown away)."""
    return f"gg-bench-{tenant}"


def _auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key(tenant)}", "Content-Type": "application/json"}


# --- processes --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Gateway:
    """A running gateway: its process, base URL and admin base URL (for /metrics)."""

    service: Service
    url: str
    admin: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(
    stack: contextlib.ExitStack, workdir: Path, cpus: frozenset[int] | None
) -> tuple[Service, str]:
    """Start a throwaway redis-server on a free loopback port (nothing saved to disk).

    Returns:
        (the process, ``redis://127.0.0.1:PORT/0``).
    """
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise BenchError("redis-server is not on PATH")
    port = _free_port()
    service = Service(
        "redis",
        [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"],
        log_path=workdir / "redis.log",
        cpus=cpus,
    )  # fmt: skip
    stack.callback(service.stop)
    service.wait_ready(REDIS_READY)
    return service, f"redis://127.0.0.1:{port}/0"


def redis_info(url: str) -> dict[str, str]:
    """``INFO all`` of the Redis at ``url`` (``redis://127.0.0.1:PORT/0``) as field -> value.

    Raises:
        BenchError: no answer, or not a bulk string.
    """
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=REQUEST_TIMEOUT) as s:
            s.sendall(b"*2\r\n$4\r\nINFO\r\n$3\r\nall\r\n")
            data = b""
            while b"\r\n" not in data or len(data) < _bulk_end(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise BenchError(f"INFO {url}: {exc}") from exc
    if not data.startswith(b"$"):
        raise BenchError(f"INFO {url}: unexpected answer {data[:100]!r}")
    body = data[data.index(b"\r\n") + 2 : _bulk_end(data)].decode()
    return dict(ln.split(":", 1) for ln in body.splitlines() if ":" in ln)


def _bulk_end(data: bytes) -> int:
    head = data.index(b"\r\n")
    return head + 2 + int(data[1:head])


def _redis_counts(url: str | None) -> tuple[int, int]:
    """(connections accepted, scripts run: EVALSHA + EVAL calls) so far; (0, 0) without Redis.

    Scripts, not ``total_commands_processed``: that also counts the commands each script
    calls inside Redis.
    """
    if url is None:
        return 0, 0
    info = redis_info(url)
    scripts = 0
    for name in ("cmdstat_evalsha", "cmdstat_eval"):
        if name in info:
            fields = dict(f.split("=", 1) for f in info[name].split(","))
            scripts += int(fields["calls"])
    return int(info["total_connections_received"]), scripts


def start_backend(
    stack: contextlib.ExitStack,
    workdir: Path,
    cpus: frozenset[int] | None,
    *,
    tokens_per_second: float = 0,
) -> tuple[Service, str]:
    """Start ``python -m backend``; return it and its base URL.

    Args:
        tokens_per_second: the offline model's streaming pace; 0: no delay at all.
    """
    backend = Service(
        "backend",
        [sys.executable, "-m", "backend", "--region", REGION, "--zones", "us,global",
         "--host", "127.0.0.1", "--port", "0", "--ttft-ms", "0",
         "--tokens-per-second", f"{tokens_per_second:g}"],
        log_path=workdir / "backend.log",
        cpus=cpus,
    )  # fmt: skip
    stack.callback(backend.stop)
    return backend, backend.wait_ready(BACKEND_READY).group(1)


def limits_config(
    backend_url: str,
    *,
    policies: dict[str, dict[str, Any]],
    redis_url: str | None,
    limiting: bool = True,
    call_timeout_ms: float | None = None,
) -> dict[str, Any]:
    """``bench/run.py``'s gateway config plus API keys, rate limits, Redis and /metrics.

    One tenant per policy (tenant id = policy name, key ``api_key(name)``), each limited by
    its policy on the catch-all route; ``limiting=False`` keeps the tenants and drops every
    policy (limiting off). Auth is required either way. ``call_timeout_ms``: the budget of
    one Redis call (None: the gateway's default, 20 ms).
    """
    cfg = gateway_config(backend_url)
    cfg["routes"] = [{"prefix": "/", "auth": "required"}]
    cfg["admin"] = {"listen": "127.0.0.1:0"}
    cfg["rate_limits"] = policies if limiting else {}
    cfg["tenants"] = [
        {"id": name, "keys": [hash_key(api_key(name))], "limits": {"/": name} if limiting else {}}
        for name in policies
    ]
    if redis_url is not None:
        cfg["redis"] = {"control": redis_url}
        if call_timeout_ms is not None:
            cfg["redis"]["call_timeout"] = f"{call_timeout_ms:g}ms"
    return cfg


def start_gateways(
    stack: contextlib.ExitStack,
    workdir: Path,
    configs: Sequence[tuple[str, dict[str, Any]]],
    cpus: frozenset[int] | None,
) -> list[Gateway]:
    """Start one gateway per (name, config), all at once; wait until each listens."""
    services = []
    for name, config in configs:
        path = workdir / f"{name}.yaml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        service = Service(
            name,
            [sys.executable, "-m", "gateway", "--log-level", "WARNING", "gateway", "-c", str(path)],
            log_path=workdir / f"{name}.log",
            cpus=cpus,
        )
        stack.callback(service.stop)
        services.append(service)
    gateways = []
    for service in services:
        bound = service.wait_ready(GATEWAY_READY).group(1)
        admin = service.wait_ready(ADMIN_READY).group(1)
        gateways.append(Gateway(service, f"http://{bound}", f"http://{admin}"))
    return gateways


# --- the client ---------------------------------------------------------------------------------


def stream_usage(body: bytes) -> int | None:
    """``usage.total_tokens`` of the last SSE chunk that carries one, or None.

    Args:
        body: a whole ``text/event-stream`` answer (``data: {...}`` lines, ``data: [DONE]``).
    """
    total = None
    for line in body.splitlines():
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            continue
        try:
            usage = json.loads(payload).get("usage")
        except (ValueError, AttributeError):
            continue
        if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
            total = usage["total_tokens"]
    return total


async def _one(
    session: aiohttp.ClientSession,
    gateway: int,
    url: str,
    *,
    headers: dict[str, str],
    body: bytes,
    stream: bool,
) -> Outcome:
    loop = asyncio.get_running_loop()
    sent = loop.time()
    try:
        async with session.post(url + CHAT_PATH, data=body, headers=headers) as resp:
            status, raw = resp.status, await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome(
            gateway=gateway,
            sent=sent,
            latency=loop.time() - sent,
            status=None,
            error=type(exc).__name__,
        )
    latency = loop.time() - sent
    tokens: int | None = None
    error: str | None = None
    if stream and 200 <= status < 300:
        tokens = stream_usage(raw)
        if tokens is None:
            error = "2xx stream without usage"
    return Outcome(
        gateway=gateway, sent=sent, latency=latency, status=status, tokens=tokens, error=error
    )


async def offer(
    urls: Sequence[str],
    *,
    headers: dict[str, str],
    body: bytes,
    stream: bool,
    rate: float,
    duration: float,
) -> list[Outcome]:
    """Send ``rate x duration + 1`` requests on a fixed schedule, round robin over ``urls``.

    Open loop: request ``i`` leaves at ``start + i / rate`` whether or not earlier ones have
    been answered, so the offered rate does not drop when the gateways slow down. Each
    outcome records when it was actually sent (a late loop shows up in the span).

    Args:
        rate: requests per second, all URLs together.
        duration: seconds from the first to the last scheduled send.

    Returns:
        One outcome per request, in the order sent; a failed request is an outcome.

    Raises:
        BenchError: the whole run took over ``duration + RUN_GRACE`` seconds.
    """
    count = round(rate * duration) + 1
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=512)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    tasks: list[asyncio.Task[Outcome]] = []
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            asyncio.timeout(duration + RUN_GRACE),
            asyncio.TaskGroup() as group,
        ):
            start = loop.time() + START_DELAY
            for i in range(count):
                if (delay := start + i / rate - loop.time()) > 0:
                    await asyncio.sleep(delay)
                gw = i % len(urls)
                one = _one(session, gw, urls[gw], headers=headers, body=body, stream=stream)
                tasks.append(group.create_task(one))
    except TimeoutError as exc:
        raise BenchError(f"the run took over {duration + RUN_GRACE:.0f} s: abandoned") from exc
    return [t.result() for t in tasks]


def _post(url: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    host = url.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=REQUEST_TIMEOUT)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except OSError as exc:
        raise BenchError(f"POST {url}{path}: {exc}") from exc
    finally:
        conn.close()


def _get(url: str) -> str:
    host, _, path = url.removeprefix("http://").partition("/")
    conn = http.client.HTTPConnection(host, timeout=REQUEST_TIMEOUT)
    try:
        conn.request("GET", "/" + path)
        resp = conn.getresponse()
        text = resp.read().decode()
    except OSError as exc:
        raise BenchError(f"GET {url}: {exc}") from exc
    finally:
        conn.close()
    if resp.status != 200:
        raise BenchError(f"GET {url}: status {resp.status}")
    return text


def warm_up(gateways: Sequence[Gateway], tenant: str, stream_body: bytes) -> int:
    """Through each gateway as ``tenant`` (never refused): 3 chat completions and 1 stream.

    Opens each gateway's pools to the backend and Redis, and checks the answers.

    Returns:
        ``usage.total_tokens`` of the streamed answer (the same for every gateway).

    Raises:
        BenchError: an answer other than 200 with a completion, or a stream without usage.
    """
    plain = json.dumps(CHAT_BODY).encode()
    tokens = 0
    for gw in gateways:
        for _ in range(3):
            status, body = _post(gw.url, CHAT_PATH, plain, _auth(tenant))
            if status != 200 or b'"choices"' not in body:
                raise BenchError(f"{gw.service.name}: warm-up status {status}: {body[:300]!r}")
        status, body = _post(gw.url, CHAT_PATH, stream_body, _auth(tenant))
        used = stream_usage(body) if status == 200 else None
        if used is None:
            raise BenchError(f"{gw.service.name}: streamed warm-up {status}: {body[-300:]!r}")
        tokens = used
    return tokens


def decisions(gateway: Gateway, policy: str) -> dict[str, float]:
    """The gateway's ``geogate_ratelimit_decisions_total`` for ``policy`` by result, plus
    ``store_degraded`` (times its Redis breaker opened)."""
    text = _get(gateway.admin + "/metrics")
    out: dict[str, float] = {}
    for labels, value in _DECISION.findall(text):
        fields = dict(_LABEL.findall(labels))
        if fields.get("policy") == policy:
            out[fields["result"]] = out.get(fields["result"], 0.0) + float(value)
    degraded = _DEGRADED.search(text)
    out["store_degraded"] = float(degraded.group(1)) if degraded else 0.0
    return out


def wait_until_shared(gateway: Gateway, tenant: str) -> float:
    """Send single requests as ``tenant`` until 3 in a row are decided in Redis.

    After a burst of load the gateway may have given up on Redis for a while (its breaker
    opens after 3 calls over ``call_timeout``, for ``breaker_reset_timeout``, 5 s by
    default) and decide in process; a measurement of limiting *through Redis* must not
    start then. The tenant's policy must never refuse.

    Returns:
        Seconds waited (0.0-ish when Redis was deciding already).

    Raises:
        BenchError: Redis did not decide again within SHARED_TIMEOUT seconds.
    """
    started = time.monotonic()
    body = json.dumps(CHAT_BODY).encode()
    streak = 0
    while time.monotonic() - started < SHARED_TIMEOUT:
        allowed = decisions(gateway, tenant).get("allowed", 0.0)
        status, answer = _post(gateway.url, CHAT_PATH, body, _auth(tenant))
        if status != 200:
            raise BenchError(f"{gateway.service.name}: status {status}: {answer[:300]!r}")
        if decisions(gateway, tenant).get("allowed", 0.0) > allowed:  # not "fallback"
            streak += 1
            if streak == 3:
                return time.monotonic() - started
        else:
            streak = 0
            time.sleep(0.2)
    raise BenchError(f"{gateway.service.name}: Redis decided nothing for {SHARED_TIMEOUT} s")


# --- scenarios ----------------------------------------------------------------------------------


def _policies(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return {
        "high": {"requests_per_second": HIGH, "burst": HIGH},
        "requests": {"requests_per_second": args.rate, "burst": args.burst},
        "tokens": {"tokens_per_minute": args.tokens_per_minute},
    }


def _stream_body(max_tokens: int) -> bytes:
    body = {
        **CHAT_BODY,
        "stream": True,
        "max_tokens": max_tokens,
        "stream_options": {"include_usage": True},
    }
    return json.dumps(body).encode()


def _plain_body(max_tokens: int) -> bytes:
    return json.dumps({**CHAT_BODY, "max_tokens": max_tokens}).encode()


def run_accuracy(
    name: str,
    gateways: Sequence[Gateway],
    args: argparse.Namespace,
    *,
    redis_url: str | None,
    tokens_per_answer: int,
) -> tuple[Accuracy, dict[str, Any]]:
    """One accuracy scenario against ``gateways``; returns the figures and extra facts.

    Args:
        redis_url: the shared Redis, None for the in-process store.
        tokens_per_answer: ``usage.total_tokens`` of one streamed answer (for the pacing).
    """
    store = "memory" if redis_url is None else "redis"
    stream = name == "accuracy-tokens"
    if stream:
        n = args.tokens_per_minute
        limit = LimitSpec(unit="tokens", rate=n / 60, burst=n, label=f"{n} tokens/min")
        tenant, body, unit = "tokens", _stream_body(args.max_tokens), tokens_per_answer
    else:
        label = f"{args.rate:g} req/s, burst {args.burst}"
        limit = LimitSpec(unit="requests", rate=args.rate, burst=args.burst, label=label)
        tenant, body, unit = "requests", _plain_body(args.max_tokens), 1
    # overload x what the limit admits over the run, in requests per second
    rate = args.overload * limit.expected(args.duration) / args.duration / unit
    before = [decisions(gw, tenant) for gw in gateways]
    conns0, scripts0 = _redis_counts(redis_url)
    print(
        f"{name}: {rate:.1f} req/s for {args.duration} s over {len(gateways)} gateway(s), "
        f"limit {limit.label}",
        file=sys.stderr,
    )
    outcomes = asyncio.run(
        offer(
            [gw.url for gw in gateways],
            headers=_auth(tenant),
            body=body,
            stream=stream,
            rate=rate,
            duration=args.duration,
        )
    )
    time.sleep(SETTLE)
    after = [decisions(gw, tenant) for gw in gateways]
    conns1, scripts1 = _redis_counts(redis_url)
    per_gateway = [
        {k: after[i].get(k, 0.0) - before[i].get(k, 0.0) for k in after[i]}
        for i in range(len(gateways))
    ]
    total: dict[str, float] = {}
    for d in per_gateway:
        for k, v in d.items():
            total[k] = total.get(k, 0.0) + v
    result = accuracy_of(
        name, store=store, limit=limit, offered_rate=rate, gateways=len(gateways), outcomes=outcomes
    )
    extra: dict[str, Any] = {"decisions": total, "decisions_per_gateway": per_gateway}
    if redis_url is not None:
        extra["redis_connections"] = conns1 - conns0
        extra["redis_scripts"] = scripts1 - scripts0
    if stream:
        extra["tokens_reserved_per_request"] = estimate_tokens(body, 256)
        extra["tokens_used_per_request"] = sorted({o.tokens for o in outcomes if o.tokens})
    admitted_sent = sorted(o.sent for o in outcomes if o.is_admitted)
    if admitted_sent:  # when, from the first send, the first and last admitted were sent
        first = min(o.sent for o in outcomes)
        extra["first_admitted_s"] = round(admitted_sent[0] - first, 4)
        extra["last_admitted_s"] = round(admitted_sent[-1] - first, 4)
    print(
        f"  admitted {result.admitted_units:g} vs expected {result.expected:.1f} "
        f"({result.error_pct:+.2f} %): {'within' if result.is_within else 'MISSED'}; "
        f"429 {result.limited}, other {result.errors}",
        file=sys.stderr,
    )
    return result, extra


def accuracy_group(
    args: argparse.Namespace, names: Sequence[str], workdir: Path, *, redis: bool
) -> list[tuple[Accuracy, dict[str, Any]]]:
    """Start Redis (if asked), a backend and the gateways; run ``names``; stop them all."""
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        redis_url = start_redis(stack, workdir, None)[1] if redis else None
        _, backend_url = start_backend(
            stack, workdir, None, tokens_per_second=args.backend_tokens_per_second
        )
        cfg = limits_config(
            backend_url,
            policies=_policies(args),
            redis_url=redis_url,
            call_timeout_ms=args.call_timeout,
        )
        count = args.gateways if redis else 1
        prefix = "gw" if redis else "gw-local"
        gateways = start_gateways(
            stack, workdir, [(f"{prefix}{i}", cfg) for i in range(count)], None
        )
        used = warm_up(gateways, "high", _stream_body(args.max_tokens))
        for gw in gateways if redis else ():
            wait_until_shared(gw, "high")
        return [
            run_accuracy(name, gateways, args, redis_url=redis_url, tokens_per_answer=used)
            for name in names
        ]


def overhead_group(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Limiting on (Redis) vs off, interleaved wrk runs; see the module docstring."""
    workdir.mkdir(parents=True, exist_ok=True)
    pins = choose_pins(
        argparse.Namespace(no_pin=args.no_pin, gateway_cpus=None, backend_cpus=None, wrk_cpus=None)
    )
    policies = {"high": _policies(args)["high"]}
    scenario = Scenario(
        name="chat-auth",
        method="POST",
        path=CHAT_PATH,
        script=WRK_DIR / "post_chat_auth.lua",
        body=json.dumps(CHAT_BODY).encode(),
        content_type="application/json",
    )
    affinity = os.sched_getaffinity(0)
    runs: list[OverheadRun] = []
    waited: list[float] = []  # seconds before each limiting-on run until Redis decided again
    with contextlib.ExitStack() as stack:
        redis_cpus = {"any": None, "gateway": pins["gateway"], "backend": pins["backend"]}
        redis, redis_url = start_redis(stack, workdir, redis_cpus[args.redis_cpus])
        backend, backend_url = start_backend(stack, workdir, pins["backend"])
        configs = [
            (
                f"gw-{label}",
                limits_config(
                    backend_url,
                    policies=policies,
                    redis_url=redis_url,
                    limiting=label == "on",
                    call_timeout_ms=args.call_timeout,
                ),
            )
            for label in ("on", "off")
        ]
        on, off = start_gateways(stack, workdir, configs, pins["gateway"])
        warm_up([on, off], "high", _stream_body(args.max_tokens))
        os.environ[API_KEY_ENV] = api_key("high")
        if pins["wrk"]:
            os.sched_setaffinity(0, pins["wrk"])  # keep this harness off the gateways' CPU
            stack.callback(os.sched_setaffinity, 0, affinity)
        wrk_opts: dict[str, Any] = {
            "duration": args.duration,
            "connections": args.connections,
            "threads": args.threads,
            "cpus": pins["wrk"],
        }
        for gw in (on, off) if args.warmup else ():
            run_wrk(scenario, gw.url, **{**wrk_opts, "duration": args.warmup})
        warmed = decisions(on, "high")
        for repeat in range(1, args.repeats + 1):
            order = (on, off) if repeat % 2 else (off, on)
            for gw in order:
                if gw is on:
                    waited.append(wait_until_shared(on, "high"))
                fallback = decisions(on, "high").get("fallback", 0.0)
                conns0, scripts0 = _redis_counts(redis_url)
                g0, r0, b0 = gw.service.cpu_seconds(), redis.cpu_seconds(), backend.cpu_seconds()
                summary, _ = run_wrk(scenario, gw.url, **wrk_opts)
                g1, r1, b1 = gw.service.cpu_seconds(), redis.cpu_seconds(), backend.cpu_seconds()
                conns1, scripts1 = _redis_counts(redis_url)
                now_fallback = decisions(on, "high").get("fallback", 0.0)
                run = OverheadRun(
                    repeat=repeat,
                    limiting=gw is on,
                    seq=len(runs),
                    wrk=summary,
                    gateway_cpu=g1 - g0,
                    redis_cpu=r1 - r0,
                    backend_cpu=b1 - b0,
                    redis_connections=conns1 - conns0,
                    redis_scripts=scripts1 - scripts0,
                    fallback=round(now_fallback - fallback),
                )
                runs.append(run)
                us = run.gateway_us_per_request
                print(
                    f"[overhead {len(runs)}/{2 * args.repeats}] limiting {run.label}: "
                    f"{summary.rps:.0f} req/s, p50 {summary.p50 * 1e3:.2f} ms, "
                    f"p99 {summary.p99 * 1e3:.2f} ms, errors {summary.errors}"
                    + (f", gateway {us:.0f} µs/req" if us is not None else ""),
                    file=sys.stderr,
                )
        after = decisions(on, "high")
        off_decisions = decisions(off, "high")
    return {
        "warmup_decisions_on": warmed,
        "waited_for_redis_s": waited,
        "pinning": _describe_pins({**pins, "redis": redis_cpus[args.redis_cpus]})
        + ("" if redis_cpus[args.redis_cpus] else "; redis not pinned"),
        "policy_on": policies["high"],
        "decisions_on": {k: after.get(k, 0.0) - warmed.get(k, 0.0) for k in after},
        "decisions_off": off_decisions,
        "runs": runs,
    }


# --- output -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Results:
    """A finished run: ``data`` is JSON-ready; the objects behind it feed the tables."""

    data: dict[str, Any]
    accuracies: list[tuple[Accuracy, dict[str, Any]]]  # (figures, facts from /metrics etc.)
    overhead_runs: list[OverheadRun]


def markdown_section(results: Results) -> str:
    """The RESULTS.md section of one run: settings, tables, verdicts."""
    result = results.data
    m, s = result["machine"], result["settings"]
    lines = [
        f"## Rate limiting, {result['started_utc'][:16].replace('T', ' ')} UTC, "
        f"commit {m['git_commit']}",
        "",
        "Recorded by `bench/ratelimit_bench.py --record` (its docstring has the method).",
        "",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['kernel']}; Python {m['python']}, "
        f"aiohttp {m['aiohttp']}, uvloop {m['uvloop']}, {m['wrk']}, {s['redis_version']}",
        f"- Load average (1, 5, 15 min) before: {' '.join(map(str, m['load_average']))}; after: "
        f"{' '.join(map(str, result['load_average_after']))}",
        f"- Command: `{result['command']}`",
    ]
    accuracy = result.get("accuracy", [])
    if accuracy:
        lines += [
            f"- Accuracy: open-loop client (aiohttp, this process), {s['overload']:g} x what the "
            f"limit admits over {s['duration_s']} s, round robin over the gateways; expected = "
            "burst + rate x span, **span = first to last request sent** (client monotonic "
            "clock); target within 1 % of expected or one request's cost. Redis scenarios: one "
            f"`redis-server` on loopback, `call_timeout` {s['redis_call_timeout_ms']:g} ms, "
            "`on_redis_trouble: fallback`. Backend: "
            + (
                f"streams at {s['backend_tokens_per_second']:g} tokens/s."
                if s["backend_tokens_per_second"]
                else "no model delay."
            ),
            "",
            render_markdown(accuracy_rows([a for a, _ in results.accuracies])),
            "",
            render_markdown(gateway_rows([a for a, _ in results.accuracies])),
            "",
        ]
        for entry in accuracy:
            extra = entry["extra"]
            note = (
                f"- {entry['scenario']}: gateway decisions (from /metrics) "
                f"{_counts({'fallback': 0, **extra['decisions']})}"
            )
            if "redis_scripts" in extra:
                note += (
                    f"; Redis scripts run {extra['redis_scripts']}, new Redis connections "
                    f"{extra['redis_connections']}"
                )
            note += (
                f"; admitted requests sent from {extra.get('first_admitted_s', 0):.3f} s to "
                f"{extra.get('last_admitted_s', 0):.3f} s"
            )
            note += (
                f"; largest excess of admitted over burst + rate x t on any prefix of the run: "
                f"{entry['peak_excess_units']:+g} at t = {entry['peak_excess_at_s']:.2f} s"
            )
            if "tokens_reserved_per_request" in extra:
                note += (
                    f"; tokens reserved per request {extra['tokens_reserved_per_request']}, "
                    f"used {extra['tokens_used_per_request']}"
                )
            lines.append(note + ".")
        lines.append("")
    if "overhead" in result:
        o = result["overhead"]
        measured, warm = _counts(o["decisions_on"]), _counts(o["warmup_decisions_on"])
        waited = ", ".join(f"{w:.1f}" for w in o["waited_for_redis_s"])
        off = _counts(o["decisions_off"])
        lines += [
            f"- Overhead: wrk {s['connections']} connections, {s['threads']} thread(s), "
            f"{s['repeats']} x {s['duration_s']} s per setting, interleaved, warm-up "
            f"{s['warmup_s']} s each; POST {CHAT_PATH} non-streaming with an API key; "
            f"limiting on = policy `{o['policy_on']}` in Redis on loopback, off = no policy. "
            f"Pinning: {o['pinning']}. *redis scripts* / *redis conns*: scripts Redis ran "
            "(one per rate-limit decision) and connections it accepted during the run (1: the "
            "harness's own INFO); "
            "*fallback*: requests the gateway decided in process because Redis missed "
            "`call_timeout` (`!`: the run did not measure limiting through Redis).",
            "",
            render_markdown(overhead_rows(results.overhead_runs)),
            "",
            f"- Limiting-on gateway: decisions during the measured runs {measured}; during "
            f"the warm-up {warm}; before each limiting-on run the harness waited until Redis "
            f"decided again (3 requests in a row): {waited} s. Limiting-off gateway: {off}.",
            "",
        ]
    if result["flagged"]:
        lines += ["**Flagged: some runs had errors other than 429; their figures are suspect.**"]
    return "\n".join(lines)


def _counts(decided: dict[str, float]) -> str:
    """``allowed 12, fallback 0, breaker openings 0`` from a ``decisions()`` delta."""
    return ", ".join(
        f"{'breaker openings' if k == 'store_degraded' else k} {v:.0f}"
        for k, v in sorted(decided.items())
    )


def _redis_version() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        return "redis-server not found"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    return " ".join(out.stdout.split()[:3])


# --- main ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``bench/ratelimit_bench.py``."""
    p = argparse.ArgumentParser(
        prog="bench/ratelimit_bench.py",
        description="Rate-limit accuracy (shared Redis, tokens, in process) and overhead.",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--duration",
        type=int,
        default=10,
        help="seconds of offered load per accuracy run and per wrk run (default 10)",
    )
    p.add_argument(
        "--gateways",
        type=int,
        default=4,
        help="gateway processes sharing Redis in the accuracy scenarios (default 4)",
    )
    p.add_argument("--rate", type=float, default=50.0, help="requests/s of the limit (default 50)")
    p.add_argument("--burst", type=int, default=20, help="burst of the limit (default 20)")
    p.add_argument(
        "--tokens-per-minute",
        type=int,
        default=6000,
        help="tokens/min of accuracy-tokens (default 6000)",
    )
    p.add_argument("--max-tokens", type=int, default=20, help="max_tokens per request (default 20)")
    p.add_argument(
        "--backend-tokens-per-second",
        type=float,
        default=0,
        help="accuracy scenarios: the backend's streaming pace (default 0: no delay); a slow "
        "stream holds its token reservation longer before usage reconciles it",
    )
    p.add_argument(
        "--overload",
        type=float,
        default=3.0,
        help="offered / what the limit admits over the run (default 3)",
    )
    p.add_argument("--repeats", type=int, default=3, help="overhead on+off pairs (default 3)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--warmup", type=int, default=2, help="wrk warm-up s per gateway (default 2)")
    p.add_argument("--no-pin", action="store_true", help="overhead: do not pin to CPUs")
    p.add_argument(
        "--call-timeout",
        type=float,
        metavar="MS",
        help="redis.call_timeout of every gateway, ms (default: the gateway's, 20 ms)",
    )
    p.add_argument(
        "--redis-cpus",
        choices=("any", "gateway", "backend"),
        default="any",
        help="overhead: Redis unpinned (default), or on the gateways' or the backend's CPU",
    )
    p.add_argument(
        "--out", type=Path, help="JSON results (default bench/out/ratelimit-<UTC time>.json)"
    )
    p.add_argument("--record", action="store_true", help="append a section to bench/RESULTS.md")
    p.add_argument("--strict", action="store_true", help="exit 1 when an accuracy target is missed")
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    for name in (
        "duration",
        "gateways",
        "burst",
        "tokens_per_minute",
        "max_tokens",
        "repeats",
        "connections",
        "threads",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rate <= 0 or args.overload <= 1:
        parser.error("--rate must be > 0 and --overload > 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if args.backend_tokens_per_second < 0:
        parser.error("--backend-tokens-per-second must be 0 or more")
    if args.call_timeout is not None and args.call_timeout <= 0:
        parser.error("--call-timeout must be > 0 ms")
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        parser.error(f"--scenarios: unknown {unknown}; choose from {', '.join(SCENARIOS)}")
    if "overhead" in names and shutil.which("wrk") is None:
        parser.error("wrk is not on PATH (scripts/install-system-deps.sh installs it)")
    return [n for n in SCENARIOS if n in names]  # always in the documented order


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: children stopped


def benchmark(args: argparse.Namespace, names: Sequence[str]) -> Results:
    """Run the scenarios; return the results.

    Raises:
        BenchError: a child did not start, a warm-up answer was wrong, wrk failed.
    """
    started = dt.datetime.now(dt.UTC)
    result: dict[str, Any] = {
        "command": _command_line(),
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {
            "scenarios": list(names),
            "duration_s": args.duration,
            "gateways": args.gateways,
            "rate_per_s": args.rate,
            "burst": args.burst,
            "tokens_per_minute": args.tokens_per_minute,
            "max_tokens": args.max_tokens,
            "overload": args.overload,
            "repeats": args.repeats,
            "connections": args.connections,
            "threads": args.threads,
            "warmup_s": args.warmup,
            "redis_version": _redis_version(),
            "redis_cpus": args.redis_cpus,
            "backend_tokens_per_second": args.backend_tokens_per_second,
            "redis_call_timeout_ms": args.call_timeout or 20,
        },
    }
    accuracies: list[tuple[Accuracy, dict[str, Any]]] = []
    runs: list[OverheadRun] = []
    with tempfile.TemporaryDirectory(prefix="geogate-ratelimit-") as tmp:
        shared = [n for n in names if n in ("accuracy", "accuracy-tokens")]
        if shared:
            accuracies += accuracy_group(args, shared, Path(tmp) / "shared", redis=True)
        if "accuracy-local" in names:
            accuracies += accuracy_group(args, ["accuracy-local"], Path(tmp) / "local", redis=False)
        if "overhead" in names:
            overhead = overhead_group(args, Path(tmp) / "overhead")
            runs = overhead.pop("runs")
            result["overhead"] = {
                **overhead,
                "runs": [r.to_json() for r in runs],
                "summary": overhead_summary(runs),
            }
    result["accuracy"] = [{**a.to_json(), "extra": extra} for a, extra in accuracies]
    result["finished_utc"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    wrk_errors = sum(r["wrk"]["error_count"] for r in result.get("overhead", {}).get("runs", []))
    result["flagged"] = bool(wrk_errors or any(a.errors for a, _ in accuracies))
    result["all_within_target"] = all(a.is_within for a, _ in accuracies)
    return Results(result, accuracies, runs)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the tables; save JSON; optionally record to RESULTS.md.

    Returns:
        The exit status (see the module docstring).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    names = _check_args(parser, args)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        results = benchmark(args, names)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: every process stopped", file=sys.stderr)
        return 130

    result, accuracies = results.data, results.accuracies
    if accuracies:
        print(render_text(accuracy_rows([a for a, _ in accuracies])))
        print()
        print(render_text(gateway_rows([a for a, _ in accuracies])))
        print()
    if "overhead" in result:
        print(render_text(overhead_rows(results.overhead_runs)))
    out = args.out or OUT_DIR / f"ratelimit-{result['started_utc'].replace(':', '')[:17]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"results: {out}", file=sys.stderr)
    if args.record:
        record(markdown_section(results))
        print(f"recorded in {RESULTS_MD}", file=sys.stderr)
    if result["flagged"]:
        print("FLAGGED: errors other than 429 (see the tables)", file=sys.stderr)
        return 1
    if args.strict and not result["all_within_target"]:
        print("MISSED: an accuracy target (see the verdict column)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
