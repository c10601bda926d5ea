"""Compare GeoGate with nginx, HAProxy, a plain aiohttp proxy and LiteLLM (issue 7).

``python bench/perf.py`` starts everything on 127.0.0.1 with ephemeral ports and measures,
interleaved and repeated, CPU time per request of the proxy under test, req/s, latency
percentiles and streaming delays. ``--quick`` is a 2 s, 1 repeat, few targets run for
development; ``--record`` appends a section to bench/RESULTS.md; JSON and a PNG plot of the
latency distributions go to bench/out/.

Processes (``--targets``; the upstreams always run):

- the fast upstream: nginx with fixed answers (``return 200``) for ``GET /small``,
  ``GET /health`` and ``POST [/cached|/limited]/v1/chat/completions`` (an OpenAI-shaped
  completion with ``finish_reason`` and ``usage``); ``/sse/...`` goes on, unbuffered, to
  ``bench/sse_upstream.py`` (a slow token stream on a clock). Target ``direct`` is this nginx.
- ``nginx-static``: the same fixed answers from an nginx on the proxies' CPU (the floor for a
  cache hit); ``nginx``: ``proxy_pass`` with an upstream keep-alive pool; ``haproxy``: HTTP
  mode, one thread, ``http-reuse always``; ``plain-aiohttp``: ``bench/plain_proxy.py``.
- ``geogate`` (``python -m gateway gateway -c CFG``, one process), ``geogate-2w``
  (``--workers 2``: supervisor + 2 workers) and ``geogate-redis`` (the Redis rate limiter,
  a throwaway ``redis-server``), all with the full pipeline on: an API key per request
  (``auth: required``; wrk sends it), ``X-Forwarded-For: 8.8.8.8`` from the trusted loopback
  peer so every request is located through the GeoIP database (US -> zone ``us``), residency
  (region us-east-1 serves ``us`` and ``global``), a rate limit per tenant too high to refuse
  (in process, or in Redis), the llm-exact cache on the ``/cached/`` route only, metrics (an
  admin listener serves them); access log off (the default: no ``access_log`` section).
- ``litellm`` (only with ``--litellm``): LiteLLM's proxy, one worker, in its own venv
  (bench/out/litellm-venv, ``litellm[proxy]`` from PyPI, installed on first use), its one
  model an OpenAI-compatible endpoint at the fast upstream. Not measured if it cannot be
  installed or started; the report says so.

Scenarios (``--scenarios``): ``get-small`` (GET, c64), ``chat`` (POST non-streaming, c64),
``cache-hit`` (``/cached/``: llm-exact hits through GeoGate, checked on its /metrics, against
nginx-static), ``rate-limited`` (a tenant over 1 request/s: CPU per 429; nginx with
``limit_req`` on the same path), ``latency-c4`` (chat at 4 connections: p50 against direct,
p99 against nginx), ``think-1000`` (16 connections with a 16 ms think time each: about
1000 req/s; the proxy's CPU share of a core), ``sse`` (an aiohttp client in this process:
time to the first chunk, each chunk's delivery delay from the upstream's send time, whole
stream). ``--soak SECONDS``: afterwards, GeoGate at the think-1000 rate for that long after a
warm-up, its RSS sampled every 10 s; growth reported.

Pinning (as bench/run.py): the proxies on the first allowed CPU, the upstreams, Redis, wrk
and this harness on the second. CPU per request: user + system time of the target's process
tree (nginx master + worker, GeoGate's supervisor + workers...) from ``/proc/<pid>/stat``,
read right before and after each run, divided by its successful responses (every response
in ``rate-limited``). Each repeat runs every target of a scenario back to back, the order
rotated per repeat; ratios are taken within a repeat, then the median over repeats.

Bounded: each wrk run ``--duration`` + 30 s, start-up 60 s (LiteLLM 180 s), stop 15 s;
children are stopped on every exit path and get SIGTERM should this process die.
Exit status: 0 done (missed targets are reported, not failed), 1 errors in runs or the
benchmark could not run, 2 bad arguments, 130 interrupted.
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
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/perf.py` puts bench/, not the project, on the path
    sys.path.insert(0, str(ROOT))

from bench.processes import CLK_TCK, BenchError, Service  # noqa: E402
from bench.ratelimit_bench import Gateway, decisions, start_redis  # noqa: E402
from bench.report import render_markdown, render_text  # noqa: E402
from bench.run import (  # noqa: E402
    ADMIN_READY,
    CACHE_HIT,
    GATEWAY_READY,
    OUT_DIR,
    RESULTS_MD,
    WRK_DIR,
    Scenario as WrkScenario,
    _command_line,
    _cpu_list,
    _first_line,
    _hits_only,
    _on_sigterm,
    _rotated,
    cache_lookups,
    choose_pins,
    gateway_config,
    machine_info,
    record,
    run_wrk,
)
from gateway.tenants import hash_key  # noqa: E402

__all__ = [
    "SCENARIOS",
    "TARGETS",
    "PerfRun",
    "build_parser",
    "evaluate_checks",
    "geogate_config",
    "haproxy_config",
    "litellm_config",
    "main",
    "nginx_config",
    "render_template",
    "summarise",
]

BENCH_DIR = ROOT / "bench"
PLOTS_DIR = BENCH_DIR / "plots"
LITELLM_VENV = OUT_DIR / "litellm-venv"
PERF_LUA = WRK_DIR / "perf.lua"

TARGETS = (
    "direct", "nginx-static", "nginx", "haproxy", "plain-aiohttp",
    "geogate", "geogate-2w", "geogate-redis", "litellm",
)  # fmt: skip
GEOGATES = ("geogate", "geogate-2w", "geogate-redis")
QUICK_TARGETS = ("direct", "nginx-static", "nginx", "haproxy", "plain-aiohttp", "geogate")

# API keys, new each run (loopback only, thrown away). API_KEY is also LiteLLM's master key,
# which it wants to start with "sk-".
API_KEY = f"sk-bench-{secrets.token_hex(16)}"  # the tenant whose limit never refuses
API_KEY_OVER = f"sk-bench-over-{secrets.token_hex(8)}"  # the tenant over 1 request/s
CLIENT_ADDRESS = "8.8.8.8"  # X-Forwarded-For: located as US -> zone us
CHAT_BODY = (WRK_DIR / "chat_body.json").read_bytes().strip()
SSE_BODY = json.dumps({**json.loads(CHAT_BODY), "stream": True}, separators=(",", ":")).encode()
CHAT_RESPONSE = json.dumps(
    {
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
        "model": "geogate-chat",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant",
            "content": "Your data stays in the region that serves your residency zone."}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 12, "total_tokens": 24},
    },
    separators=(",", ":"),
)  # fmt: skip

HIGH = 1_000_000  # requests/s and burst of the limit that never refuses
CHECK_TIMEOUT = 10.0
READY_TIMEOUT = 60.0
LITELLM_READY_TIMEOUT = 180.0
LITELLM_INSTALL_TIMEOUT = 1200.0
SSE_TIMEOUT = 30.0
RSS_INTERVAL = 10.0  # seconds between RSS samples in the soak
SOAK_WARMUP = 30  # seconds of load before the first soak sample
_PLACEHOLDER = re.compile(r"@[A-Z_]+@")
_READY = re.compile(r"listening on (http://\S+)")


# --- scenarios ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    """One kind of load, sent the same way to each of its targets."""

    name: str
    method: str
    path: str
    targets: tuple[str, ...]
    connections: int = 64
    body: bytes | None = None
    key: str = API_KEY
    think_ms: int = 0  # wrk delay() after each response, per connection
    status: int = 200  # the status every response must have
    cpu_ref: str | None = "nginx"  # CPU per request is compared with this target's
    sse: bool = False  # measured by this process's SSE client instead of wrk


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="get-small", method="GET", path="/small",
            targets=("direct", "nginx", "haproxy", "plain-aiohttp", "geogate", "geogate-2w"),
        ),
        Scenario(
            name="chat", method="POST", path="/v1/chat/completions", body=CHAT_BODY,
            targets=("direct", "nginx-static", "nginx", "haproxy", "plain-aiohttp", "geogate",
                     "geogate-2w", "geogate-redis", "litellm"),
        ),
        Scenario(
            name="cache-hit", method="POST", path="/cached/v1/chat/completions", body=CHAT_BODY,
            targets=("nginx-static", "nginx", "geogate"), cpu_ref="nginx-static",
        ),
        Scenario(
            name="rate-limited", method="POST", path="/limited/v1/chat/completions",
            body=CHAT_BODY, key=API_KEY_OVER, status=429,
            targets=("nginx", "geogate", "geogate-redis"),
        ),
        Scenario(
            name="latency-c4", method="POST", path="/v1/chat/completions", body=CHAT_BODY,
            connections=4, targets=("direct", "nginx", "haproxy", "plain-aiohttp", "geogate"),
        ),
        Scenario(
            name="think-1000", method="POST", path="/v1/chat/completions", body=CHAT_BODY,
            connections=16, think_ms=16,
            targets=("nginx", "haproxy", "plain-aiohttp", "geogate"),
        ),
        Scenario(
            name="sse", method="POST", path="/sse/v1/chat/completions", body=SSE_BODY,
            connections=4, sse=True, cpu_ref="nginx",
            targets=("direct", "nginx", "haproxy", "plain-aiohttp", "geogate"),
        ),
    )
}  # fmt: skip


# --- configs ------------------------------------------------------------------------------------


def render_template(template: Path, values: dict[str, str]) -> str:
    """``template`` with each ``@NAME@`` replaced by ``values["NAME"]``.

    Raises:
        BenchError: a placeholder without a value.
    """
    text = template.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    if left := sorted(set(_PLACEHOLDER.findall(text))):
        raise BenchError(f"{template.name}: no value for {', '.join(left)}")
    return text


def nginx_config(workdir: Path, kind: str, values: dict[str, str]) -> Path:
    """Render bench/nginx/nginx.conf.in + ``<kind>.conf.in`` (upstream or proxy) into
    ``workdir``; return the nginx.conf path."""
    workdir.mkdir(parents=True, exist_ok=True)
    values = {**values, "DIR": str(workdir)}
    (workdir / "server.conf").write_text(
        render_template(BENCH_DIR / "nginx" / f"{kind}.conf.in", values)
    )
    conf = workdir / "nginx.conf"
    conf.write_text(render_template(BENCH_DIR / "nginx" / "nginx.conf.in", values))
    return conf


def haproxy_config(workdir: Path, listen: str, upstream: str) -> Path:
    """Render bench/haproxy/haproxy.cfg.in into ``workdir``; return its path."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "haproxy.cfg"
    values = {"LISTEN": listen, "UPSTREAM": upstream}
    cfg.write_text(render_template(BENCH_DIR / "haproxy" / "haproxy.cfg.in", values))
    return cfg


def geogate_config(upstream_url: str, *, redis_url: str | None = None) -> dict[str, Any]:
    """GeoGate with the full pipeline on, in front of the fast upstream (see the docstring)."""
    cfg = gateway_config(upstream_url)
    cfg["gateway"]["trusted_proxies"] = ["127.0.0.0/8"]
    cfg["routes"] = [
        {"prefix": "/", "auth": "required", "rate_limit": "bench"},
        {
            "prefix": "/cached/",
            "auth": "required",
            "rate_limit": "bench",
            "cache": {"policy": "llm-exact", "default_temperature": 0},
        },
    ]
    cfg["rate_limits"] = {
        "bench": {"requests_per_second": HIGH, "burst": HIGH},
        "tight": {"requests_per_second": 1, "burst": 1},
    }
    cfg["tenants"] = [
        {"id": "bench", "keys": [hash_key(API_KEY)]},
        {"id": "over", "keys": [hash_key(API_KEY_OVER)], "limits": {"/": "tight"}},
    ]
    cfg["admin"] = {"listen": "127.0.0.1:0"}
    if redis_url is not None:
        cfg["redis"] = {"control": redis_url}
    return cfg


def litellm_config(upstream_url: str) -> str:
    """LiteLLM proxy config (YAML): one model, an OpenAI-compatible endpoint at the upstream."""
    return "\n".join(
        [
            "model_list:",
            "  - model_name: geogate-chat",
            "    litellm_params:",
            "      model: openai/geogate-chat",
            f"      api_base: {upstream_url}/v1",
            "      api_key: sk-bench-not-a-secret",
            "litellm_settings:",
            "  telemetry: false",
            "general_settings:",
            f"  master_key: {API_KEY}",
            "",
        ]
    )


# --- processes ----------------------------------------------------------------------------------


def find_program(name: str) -> str | None:
    """``name`` on PATH, or in /usr/sbin (nginx and haproxy live there; not every PATH has it)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


def ensure_programs(install: bool) -> None:
    """Install nginx, HAProxy, wrk and redis-server from Debian's packages when missing.

    Raises:
        BenchError: one is still missing.
    """
    wanted = ("nginx", "haproxy", "wrk", "redis-server")
    if install and any(find_program(p) is None for p in wanted):
        script = ROOT / "scripts" / "install-bench-deps.sh"
        print(f"installing missing programs: bash {script}", file=sys.stderr)
        subprocess.run(["bash", str(script)], check=False, timeout=900)
    if missing := [p for p in wanted if find_program(p) is None]:
        raise BenchError(f"{', '.join(missing)} not found: run scripts/install-bench-deps.sh")


def ensure_matplotlib() -> bool:
    """Import matplotlib, installing the ``bench`` extra's copy into this venv if missing."""
    try:
        import matplotlib
    except ImportError:
        print("installing matplotlib (the bench extra) for the plot", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "matplotlib>=3.8"]
        if subprocess.run(cmd, check=False, timeout=600).returncode != 0:
            return False
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(service: Service, port: int, timeout: float = READY_TIMEOUT) -> None:
    """Wait until 127.0.0.1:``port`` accepts a connection.

    Raises:
        BenchError: ``service`` exited, or ``timeout`` seconds passed.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise BenchError(
                f"{service.name} exited with {service.proc.returncode}:\n{service.log_tail()}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"{service.name} not listening on {port} in {timeout:.0f} s")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2 :].split()  # state is field 3 (index 0 here)


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (scanning /proc for parent ids)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, ()))
    return out


def tree_cpu(root: int) -> float:
    """User + system CPU seconds of ``root`` and its descendants (all their threads).

    Raises:
        BenchError: ``root`` is gone.
    """
    total = 0.0
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields is None:
            if pid == root:
                raise BenchError(f"process {pid} exited during the benchmark")
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def tree_rss_kib(root: int) -> int:
    """Resident set size of ``root`` and its descendants, KiB (VmRSS, summed)."""
    total = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


Ready = tuple[str, str | None]  # (base URL, admin base URL or None)


@dataclass(slots=True)
class Target:
    """A running target: where it answers and the process tree whose CPU is measured."""

    name: str
    url: str
    service: Service
    admin: str | None = None  # GeoGate: admin base URL (/metrics)

    def cpu(self) -> float:
        return tree_cpu(self.service.proc.pid)


@dataclass(slots=True)
class Stack:
    """Everything started for one benchmark."""

    upstream: Target
    targets: dict[str, Target] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # target -> why not measured


def _nginx(stack: contextlib.ExitStack, workdir: Path, name: str, kind: str,
           values: dict[str, str], cpus: frozenset[int] | None) -> tuple[Service, int]:  # fmt: skip
    port = free_port()
    conf = nginx_config(workdir / name, kind, {**values, "LISTEN": f"127.0.0.1:{port}"})
    nginx = find_program("nginx") or "nginx"
    service = Service(
        name,
        [nginx, "-p", str(conf.parent), "-c", str(conf), "-e", str(conf.parent / "error.log")],
        log_path=workdir / f"{name}.log",
        cpus=cpus,
    )
    stack.callback(service.stop)
    return service, port


def install_litellm(venv: Path = LITELLM_VENV) -> Path:
    """LiteLLM's ``litellm`` command in its own venv, created and installed when missing.

    Raises:
        BenchError: the install failed (the message says how).
    """
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    print(f"installing litellm[proxy] into {venv} (first use; a few minutes)", file=sys.stderr)
    log = venv.parent / "litellm-install.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        for cmd in (
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
        ):
            try:
                rc = subprocess.run(
                    cmd, stdout=out, stderr=subprocess.STDOUT, timeout=LITELLM_INSTALL_TIMEOUT
                ).returncode
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise BenchError(f"{' '.join(cmd)}: {exc}") from exc
            if rc != 0:
                raise BenchError(f"{' '.join(cmd)} exited with {rc} (see {log})")
    if not exe.exists():
        raise BenchError(f"no {exe} after the install (see {log})")
    return exe


def start_stack(
    stack: contextlib.ExitStack,
    workdir: Path,
    pins: dict[str, frozenset[int] | None],
    targets: Sequence[str],
    args: argparse.Namespace,
) -> Stack:
    """Start the upstreams and the targets asked for; wait until each answers."""
    proxy_cpus, up_cpus = pins["gateway"], pins["backend"]
    sse = Service(
        "sse-upstream",
        [sys.executable, str(BENCH_DIR / "sse_upstream.py"), "--ttft-ms", str(args.sse_ttft_ms),
         "--interval-ms", str(args.sse_interval_ms), "--chunks", str(args.sse_chunks)],
        log_path=workdir / "sse-upstream.log", cpus=up_cpus,
    )  # fmt: skip
    stack.callback(sse.stop)
    sse_addr = sse.wait_ready(_READY).group(1).removeprefix("http://")
    values = {"SSE": sse_addr, "CHAT_RESPONSE": CHAT_RESPONSE}
    up_service, up_port = _nginx(stack, workdir, "direct", "upstream", values, up_cpus)
    wait_port(up_service, up_port)
    upstream_addr = f"127.0.0.1:{up_port}"
    upstream_url = f"http://{upstream_addr}"
    st = Stack(upstream=Target("direct", upstream_url, up_service))
    if "direct" in targets:
        st.targets["direct"] = st.upstream

    pending: list[tuple[str, Service, Callable[[Service], Ready]]] = []

    def by_port(port: int, timeout: float = READY_TIMEOUT) -> Callable[[Service], Ready]:
        def ready(service: Service) -> tuple[str, str | None]:
            wait_port(service, port, timeout)
            return f"http://127.0.0.1:{port}", None

        return ready

    def by_log(service: Service) -> tuple[str, str | None]:
        url = f"http://{service.wait_ready(GATEWAY_READY).group(1)}"
        return url, f"http://{service.wait_ready(ADMIN_READY).group(1)}"

    if "nginx-static" in targets:
        service, port = _nginx(stack, workdir, "nginx-static", "upstream", values, proxy_cpus)
        pending.append(("nginx-static", service, by_port(port)))
    if "nginx" in targets:
        proxy_values = {"UPSTREAM": upstream_addr}
        service, port = _nginx(stack, workdir, "nginx", "proxy", proxy_values, proxy_cpus)
        pending.append(("nginx", service, by_port(port)))
    if "haproxy" in targets:
        port = free_port()
        cfg = haproxy_config(workdir / "haproxy", f"127.0.0.1:{port}", upstream_addr)
        service = Service(
            "haproxy", [find_program("haproxy") or "haproxy", "-db", "-f", str(cfg)],
            log_path=workdir / "haproxy.log", cpus=proxy_cpus,
        )  # fmt: skip
        stack.callback(service.stop)
        pending.append(("haproxy", service, by_port(port)))
    if "plain-aiohttp" in targets:
        service = Service(
            "plain-aiohttp",
            [sys.executable, str(BENCH_DIR / "plain_proxy.py"), "--upstream", upstream_url],
            log_path=workdir / "plain-aiohttp.log", cpus=proxy_cpus,
        )  # fmt: skip
        stack.callback(service.stop)
        pending.append(("plain-aiohttp", service, lambda s: (s.wait_ready(_READY).group(1), None)))
    redis_url = None
    if "geogate-redis" in targets:
        _, redis_url = start_redis(stack, workdir, up_cpus)
    for name in (n for n in GEOGATES if n in targets):
        cfg = geogate_config(upstream_url, redis_url=redis_url if name == "geogate-redis" else None)
        path = workdir / f"{name}.yaml"
        path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
        argv = [sys.executable, "-m", "gateway", "--log-level", "WARNING", "gateway", "-c",
                str(path)]  # fmt: skip
        if name == "geogate-2w":
            argv += ["--workers", "2"]
        service = Service(name, argv, log_path=workdir / f"{name}.log", cpus=proxy_cpus)
        stack.callback(service.stop)
        pending.append((name, service, by_log))
    if "litellm" in targets:
        try:
            exe = install_litellm()
        except BenchError as exc:
            st.skipped["litellm"] = f"install failed: {exc}"
            print(f"litellm not measured: {exc}", file=sys.stderr)
        else:
            port = free_port()
            cfg_path = workdir / "litellm.yaml"
            cfg_path.write_text(litellm_config(upstream_url))
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch
            service = Service(
                "litellm",
                [str(exe), "--config", str(cfg_path), "--host", "127.0.0.1", "--port", str(port),
                 "--num_workers", "1"],
                log_path=workdir / "litellm.log", cpus=proxy_cpus,
            )  # fmt: skip
            stack.callback(service.stop)
            pending.append(("litellm", service, by_port(port, LITELLM_READY_TIMEOUT)))
    for name, service, ready in pending:
        try:
            url, admin = ready(service)
        except BenchError as exc:
            if name != "litellm":
                raise
            st.skipped["litellm"] = f"did not start: {service.log_tail(1).strip()}"
            print(f"litellm not measured: {exc}", file=sys.stderr)
            continue
        st.targets[name] = Target(name, url, service, admin)
    return st


# --- checks before measuring --------------------------------------------------------------------


def _headers(scenario: Scenario) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {scenario.key}", "X-Forwarded-For": CLIENT_ADDRESS}
    if scenario.body is not None:
        headers["Content-Type"] = "application/json"
    return headers


def _send(scenario: Scenario, base: str) -> tuple[http.client.HTTPResponse, bytes]:
    host = base.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=CHECK_TIMEOUT)
    try:
        conn.request(scenario.method, scenario.path, body=scenario.body, headers=_headers(scenario))
        resp = conn.getresponse()
        return resp, resp.read()
    except OSError as exc:
        raise BenchError(f"{scenario.method} {base}{scenario.path}: {exc}") from exc
    finally:
        conn.close()


def check_target(scenario: Scenario, target: Target) -> None:
    """Send the scenario's request to ``target`` (twice, or more for a cache hit or a 429);
    require the answer the scenario measures.

    Raises:
        BenchError: another status; a chat answer without ``choices``; a GeoGate answer
            without its ``Via`` (or, on cache-hit, not a hit); an SSE answer without chunks.
    """
    where = f"{scenario.name} {target.name} {scenario.method} {target.url}{scenario.path}"
    # a 429 comes once the burst is spent; a cache hit once the first answer was stored
    sends = 3 if scenario.status == 429 else 2 if scenario.name == "cache-hit" else 1
    for _ in range(sends):
        resp, body = _send(scenario, target.url)
    if resp.status != scenario.status:
        raise BenchError(
            f"{where}: status {resp.status}, expected {scenario.status}: {body[:300]!r}"
        )
    if scenario.status != 200:
        return
    geogate = target.name.startswith("geogate")
    cache_status = resp.getheader("Cache-Status") or ""
    if geogate and scenario.name == "cache-hit":
        if not cache_status.startswith(CACHE_HIT):
            raise BenchError(f"{where}: not a cache hit (Cache-Status {cache_status!r})")
    elif geogate and "geogate" not in (resp.getheader("Via") or ""):
        raise BenchError(f"{where}: no 'Via: 1.1 geogate': not answered by the gateway")
    if scenario.sse:
        if b"bench_sent" not in body or not body.rstrip().endswith(b"data: [DONE]"):
            raise BenchError(f"{where}: not the SSE stream: {body[:300]!r}")
    elif scenario.body is not None and b'"choices"' not in body:
        raise BenchError(f"{where}: not a chat completion: {body[:300]!r}")


# --- measuring ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PerfRun:
    """One measured run of a scenario against a target.

    ``responses``: the denominator of CPU per request (successful responses; in
    rate-limited, every response with the expected 429). ``errors``: socket errors and
    responses other than the expected status. ``metrics``: the run's own figures (keys as in
    ``METRICS``); ``percentiles``: latency percentile (as wrk names it) -> ms.
    """

    scenario: str
    target: str
    repeat: int
    seq: int
    duration: float
    responses: int
    errors: int
    cpu: float  # seconds of the target's process tree
    metrics: dict[str, float | None]
    percentiles: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_us(self) -> float | None:
        return self.cpu / self.responses * 1e6 if self.responses > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "target": self.target,
            "repeat": self.repeat,
            "seq": self.seq,
            "duration_s": round(self.duration, 3),
            "responses": self.responses,
            "errors": self.errors,
            "cpu_s": round(self.cpu, 3),
            "metrics": {k: None if v is None else round(v, 4) for k, v in self.metrics.items()},
            "percentiles_ms": self.percentiles,
            "notes": self.notes,
        }


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the children started meanwhile (wrk reads them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wrk_once(
    scenario: Scenario,
    url: str,
    *,
    duration: int,
    cpus: frozenset[int] | None,
    workdir: Path,
    connections: int | None = None,
) -> tuple[Any, dict[str, float]]:
    """One wrk run with bench/wrk/perf.lua: (its WrkSummary, latency percentiles in ms)."""
    pct = workdir / "wrk-percentiles.json"
    pct.unlink(missing_ok=True)
    body = workdir / "wrk-body.json"
    if scenario.body is not None:
        body.write_bytes(scenario.body)
    env = {
        "GEOGATE_PERF_METHOD": scenario.method,
        "GEOGATE_PERF_BODY": str(body) if scenario.body is not None else "",
        "GEOGATE_PERF_HEADERS": "\n".join(
            f"{k}: {v}" for k, v in _headers(scenario).items() if k != "Content-Type"
        ),
        "GEOGATE_PERF_THINK_MS": str(scenario.think_ms),
        "GEOGATE_PERF_PERCENTILES": str(pct),
    }
    wrk_scenario = WrkScenario(
        name=scenario.name, method=scenario.method, path=scenario.path, script=PERF_LUA
    )
    with _env(env):
        summary, _ = run_wrk(
            wrk_scenario, url, duration=duration, threads=1, cpus=cpus,
            connections=connections or scenario.connections,
        )  # fmt: skip
    percentiles = {}
    with contextlib.suppress(OSError, ValueError):
        percentiles = {k: v / 1000 for k, v in json.loads(pct.read_text()).items()}
    return summary, percentiles


def measure_wrk(
    scenario: Scenario, target: Target, repeat: int, seq: int, args: argparse.Namespace,
    pins: dict[str, frozenset[int] | None], workdir: Path,
) -> PerfRun:  # fmt: skip
    """One wrk run against ``target`` with the CPU of its process tree around it."""
    notes: dict[str, Any] = {}
    cached = scenario.name == "cache-hit" and target.name.startswith("geogate")
    metrics_url = f"{target.admin}/metrics" if target.admin else None
    lookups = cache_lookups(metrics_url) if cached and metrics_url else {}
    gw = Gateway(target.service, target.url, target.admin or "")
    redis_before = decisions(gw, "bench") if target.name == "geogate-redis" else {}
    c0 = target.cpu()
    summary, percentiles = wrk_once(
        scenario, target.url, duration=args.duration, cpus=pins["wrk"], workdir=workdir
    )
    c1 = target.cpu()
    if cached and metrics_url:
        notes["cache_hits"] = _hits_only(lookups, cache_lookups(metrics_url), summary)
    if redis_before:
        after = decisions(gw, "bench")
        delta = {k: after.get(k, 0.0) - redis_before.get(k, 0.0) for k in after}
        notes["ratelimit_decisions"] = {k: int(v) for k, v in delta.items() if v}
    if scenario.status == 200:
        responses = summary.ok_requests
        errors = summary.errors
    else:  # every response must be the expected refusal (checked before; wrk cannot tell)
        responses = summary.requests
        errors = summary.errors - summary.errors_status
    metrics = {
        "rps": summary.rps,
        "p50_ms": summary.p50 * 1e3,
        "p99_ms": summary.p99 * 1e3,
        "errors": float(errors),
    }
    return PerfRun(
        scenario=scenario.name, target=target.name, repeat=repeat, seq=seq,
        duration=summary.duration, responses=responses, errors=errors, cpu=c1 - c0,
        metrics=metrics, percentiles=percentiles, notes=notes,
    )  # fmt: skip


async def _sse_one(session: Any, url: str, headers: dict[str, str]) -> dict[str, Any]:
    t0 = time.monotonic()
    first: float | None = None
    delays: list[float] = []
    async with session.post(url, data=SSE_BODY, headers=headers) as resp:
        if resp.status != 200:
            return {"error": f"status {resp.status}"}
        async for line in resp.content:
            now = time.monotonic()
            if not line.startswith(b"data: {"):
                continue
            if first is None:
                first = now - t0
            delays.append(now - json.loads(line[6:])["bench_sent"])
    if first is None:
        return {"error": "no chunk"}
    return {"ttft": first, "total": time.monotonic() - t0, "delays": delays}


async def sse_streams(
    url: str, headers: dict[str, str], streams: int, concurrency: int
) -> list[dict[str, Any]]:
    """``streams`` SSE requests, ``concurrency`` at a time; each one's TTFT, chunk delays, total."""
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=SSE_TIMEOUT)

    async def one(session: aiohttp.ClientSession) -> dict[str, Any]:
        async with sem:
            try:
                return await _sse_one(session, url, headers)
            except (aiohttp.ClientError, TimeoutError) as exc:
                return {"error": type(exc).__name__}

    async with aiohttp.ClientSession(timeout=timeout) as session:
        return list(await asyncio.gather(*(one(session) for _ in range(streams))))


def _pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def measure_sse(
    scenario: Scenario, target: Target, repeat: int, seq: int, args: argparse.Namespace
) -> PerfRun:
    """``--sse-streams`` streams through ``target``, with the CPU of its process tree."""
    c0, t0 = target.cpu(), time.monotonic()
    results = asyncio.run(
        sse_streams(target.url + scenario.path, _headers(scenario), args.sse_streams,
                    scenario.connections)
    )  # fmt: skip
    wall, c1 = time.monotonic() - t0, target.cpu()
    good = [r for r in results if "error" not in r]
    errors = len(results) - len(good)
    ms: dict[str, float | None] = dict.fromkeys(
        ("ttft_p50_ms", "ttft_p99_ms", "delay_p50_ms", "delay_p99_ms", "total_p50_ms")
    )
    if good:
        ttft = [r["ttft"] * 1e3 for r in good]
        delays = [d * 1e3 for r in good for d in r["delays"]]
        ms = {
            "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99),
            "delay_p50_ms": _pct(delays, 50), "delay_p99_ms": _pct(delays, 99),
            "total_p50_ms": _pct([r["total"] * 1e3 for r in good], 50),
        }  # fmt: skip
    notes = {"errors": sorted({r["error"] for r in results if "error" in r})} if errors else {}
    return PerfRun(
        scenario=scenario.name, target=target.name, repeat=repeat, seq=seq, duration=wall,
        responses=len(good), errors=errors, cpu=c1 - c0,
        metrics={"streams": float(len(good)), "errors": float(errors), **ms}, notes=notes,
    )  # fmt: skip


def soak(target: Target, args: argparse.Namespace, pins: dict[str, frozenset[int] | None],
         workdir: Path) -> dict[str, Any]:  # fmt: skip
    """GeoGate at the think-1000 rate: warm-up, then ``--soak`` seconds with RSS samples."""
    scenario = SCENARIOS["think-1000"]
    print(f"soak: {SOAK_WARMUP} s warm-up, then {args.soak} s on {target.name}", file=sys.stderr)
    wrk_once(scenario, target.url, duration=SOAK_WARMUP, cpus=pins["wrk"], workdir=workdir)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            samples.append((round(time.monotonic() - t0, 1), tree_rss_kib(target.service.proc.pid)))
            stop.wait(RSS_INTERVAL)

    thread = threading.Thread(target=sample, daemon=True)
    c0 = target.cpu()
    thread.start()
    try:
        summary, _ = wrk_once(
            scenario, target.url, duration=args.soak, cpus=pins["wrk"], workdir=workdir
        )
    finally:
        stop.set()
        thread.join(RSS_INTERVAL + 5)
    samples.append((float(args.soak), tree_rss_kib(target.service.proc.pid)))
    first, last = samples[0][1], samples[-1][1]
    return {
        "target": target.name,
        "seconds": args.soak,
        "rps": round(summary.rps, 1),
        "errors": summary.errors,
        "cpu_share": round((target.cpu() - c0) / summary.duration, 4),
        "rss_kib": samples,
        "rss_first_kib": first,
        "rss_last_kib": last,
        "rss_max_kib": max(s[1] for s in samples),
        "growth_pct": round(100 * (last - first) / first, 2) if first else None,
    }


# --- figures ------------------------------------------------------------------------------------

Metrics = dict[str, float | None]


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _derived(scenario: Scenario, group: dict[str, PerfRun]) -> dict[str, Metrics]:
    """Each run's figures plus its ratios to the other targets of the same repeat."""
    out: dict[str, Metrics] = {}
    for name, run in group.items():
        m = dict(run.metrics)
        m["cpu_us"] = run.cpu_us
        m["cpu_pct"] = 100 * run.cpu / run.duration if run.duration > 0 else None
        m["rps_per_core"] = _div(1e6, run.cpu_us)
        out[name] = m
    for m in out.values():
        ref = out.get(scenario.cpu_ref or "")
        m["cpu_vs_ref"] = _div(m["cpu_us"], ref["cpu_us"]) if ref else None
        direct, nginx = out.get("direct"), out.get("nginx")
        if scenario.sse:
            m["ttft_delta_ms"] = _sub(m["ttft_p50_ms"], direct["ttft_p50_ms"]) if direct else None
            m["delay_delta_ms"] = (
                _sub(m["delay_p99_ms"], direct["delay_p99_ms"]) if direct else None
            )
        else:
            m["p50_delta_ms"] = _sub(m["p50_ms"], direct["p50_ms"]) if direct else None
            m["p99_vs_nginx"] = _div(m["p99_ms"], nginx["p99_ms"]) if nginx else None
    return out


def summarise(runs: Sequence[PerfRun]) -> dict[str, dict[str, Any]]:
    """Per scenario: each repeat's figures and ratios by target, and their medians.

    Returns:
        ``{scenario: {"targets": [...], "repeats": [{"repeat": n, "metrics": {target:
        {key: value}}}], "median": {target: {key: value}}, "percentiles": {target:
        {percentile: ms}}}}``, scenarios and targets in the order they ran first.
    """
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r.scenario for r in runs):
        scenario = SCENARIOS[name]
        mine = [r for r in runs if r.scenario == name]
        targets = [t for t in scenario.targets if any(r.target == t for r in mine)]
        repeats = []
        for repeat in sorted({r.repeat for r in mine}):
            group = {r.target: r for r in mine if r.repeat == repeat}
            repeats.append({"repeat": repeat, "metrics": _derived(scenario, group)})
        median: dict[str, Metrics] = {}
        percentiles: dict[str, dict[str, float]] = {}
        for t in targets:
            per = [rep["metrics"][t] for rep in repeats if t in rep["metrics"]]
            keys = dict.fromkeys(k for m in per for k in m)
            median[t] = {k: _median([m.get(k) for m in per]) for k in keys}
            pcts = [r.percentiles for r in mine if r.target == t and r.percentiles]
            if pcts:
                percentiles[t] = {
                    p: statistics.median(x[p] for x in pcts if p in x) for p in pcts[0]
                }
        out[name] = {
            "targets": targets,
            "repeats": repeats,
            "median": median,
            "percentiles": percentiles,
        }
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One target of issue 7: a figure per repeat (median taken) against a threshold."""

    name: str
    scenario: str
    value: Callable[[dict[str, Metrics]], float | None]  # a repeat's metrics by target
    op: str  # "<=" or ">="
    threshold: float
    unit: str  # "x", "ms" or "%"


def _metric(target: str, key: str) -> Callable[[dict[str, Metrics]], float | None]:
    return lambda g: g.get(target, {}).get(key)


def _ratio(a: str, b: str, key: str = "cpu_us") -> Callable[[dict[str, Metrics]], float | None]:
    return lambda g: _div(g.get(a, {}).get(key), g.get(b, {}).get(key))


def checks(sse_interval_ms: float) -> list[Check]:
    """Issue 7's targets, as this harness measures them."""
    return [
        Check(name="full pipeline, cache miss: CPU/req vs nginx proxy (chat c64)",
              scenario="chat", value=_ratio("geogate", "nginx"), op="<=", threshold=3.5,
              unit="x"),
        Check(name="plain aiohttp proxy CPU/req vs GeoGate's (chat c64)", scenario="chat",
              value=_ratio("plain-aiohttp", "geogate"), op=">=", threshold=2.5, unit="x"),
        Check(name="Redis rate limiter: CPU/req vs nginx proxy (chat c64)", scenario="chat",
              value=_ratio("geogate-redis", "nginx"), op="<=", threshold=4.5, unit="x"),
        Check(name="cache hit (llm-exact, L1): CPU/req vs nginx static", scenario="cache-hit",
              value=_ratio("geogate", "nginx-static"), op="<=", threshold=6.0, unit="x"),
        Check(name="c4: p50 minus direct p50", scenario="latency-c4",
              value=_metric("geogate", "p50_delta_ms"), op="<=", threshold=0.2, unit="ms"),
        Check(name="c4: p99 vs nginx proxy p99", scenario="latency-c4",
              value=_metric("geogate", "p99_vs_nginx"), op="<=", threshold=2.0, unit="x"),
        Check(name="SSE: TTFT p50 minus direct", scenario="sse",
              value=_metric("geogate", "ttft_delta_ms"), op="<=", threshold=1.0, unit="ms"),
        Check(name="SSE: no extra buffering (chunk delay p99 minus direct's)", scenario="sse",
              value=_metric("geogate", "delay_delta_ms"), op="<=",
              threshold=sse_interval_ms / 2, unit="ms"),
        Check(name="req/s per core vs LiteLLM (chat c64)", scenario="chat",
              value=_ratio("litellm", "geogate"), op=">=", threshold=50.0, unit="x"),
        Check(name="~1000 req/s (think-1000): share of a core", scenario="think-1000",
              value=_metric("geogate", "cpu_pct"), op="<=", threshold=15.0, unit="%"),
    ]  # fmt: skip


def evaluate_checks(
    summary: dict[str, dict[str, Any]], sse_interval_ms: float, soak_result: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Each check's median over repeats, and whether it is met; "not measured" when a
    scenario or target it needs did not run. The soak's RSS growth last, when run."""
    out = []
    for check in checks(sse_interval_ms):
        s = summary.get(check.scenario)
        values = [check.value(rep["metrics"]) for rep in s["repeats"]] if s else []
        value = _median(values)
        result = "not measured"
        if value is not None:
            met = value <= check.threshold if check.op == "<=" else value >= check.threshold
            result = "met" if met else "missed"
        out.append(
            {"name": check.name, "scenario": check.scenario, "value": value,
             "op": check.op, "threshold": check.threshold, "unit": check.unit,
             "result": result, "per_repeat": values}
        )  # fmt: skip
    growth = soak_result["growth_pct"] if soak_result else None
    out.append(
        {"name": "soak: RSS growth after warm-up" + (
            f" ({soak_result['seconds'] // 60} min at {soak_result['rps']:.0f} req/s)"
            if soak_result else " (--soak)"),
         "scenario": "soak", "value": growth, "op": "<", "threshold": 5.0, "unit": "%",
         "result": "not measured" if growth is None else "met" if growth < 5 else "missed",
         "per_repeat": []}
    )  # fmt: skip
    return out


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


WRK_HEADER = [
    "scenario", "repeat", "target", "req/s", "p50 ms", "p99 ms", "errors", "CPU µs/req",
    "CPU % of core", "req/s per core", "CPU vs ref", "p50 - direct ms", "p99 / nginx p99",
]  # fmt: skip
SSE_HEADER = [
    "scenario", "repeat", "target", "streams", "TTFT p50 ms", "TTFT p99 ms", "TTFT - direct ms",
    "chunk delay p50 ms", "chunk delay p99 ms", "delay p99 - direct ms", "stream p50 ms",
    "errors", "CPU µs/stream",
]  # fmt: skip


def _wrk_row(scenario: str, repeat: str, target: str, m: Metrics) -> list[str]:
    errors = m.get("errors") or 0
    return [
        scenario, repeat, target, _f(m["rps"], ".0f"), _f(m["p50_ms"], ".2f"),
        _f(m["p99_ms"], ".2f"), f"{errors:.0f} !" if errors else "0", _f(m["cpu_us"], ".1f"),
        _f(m["cpu_pct"], ".1f"), _f(m["rps_per_core"], ".0f"), _f(m["cpu_vs_ref"], ".2f"),
        _f(m.get("p50_delta_ms"), "+.3f"), _f(m.get("p99_vs_nginx"), ".2f"),
    ]  # fmt: skip


def _sse_row(scenario: str, repeat: str, target: str, m: Metrics) -> list[str]:
    errors = m.get("errors") or 0
    return [
        scenario, repeat, target, _f(m["streams"], ".0f"), _f(m["ttft_p50_ms"], ".2f"),
        _f(m["ttft_p99_ms"], ".2f"), _f(m.get("ttft_delta_ms"), "+.3f"),
        _f(m["delay_p50_ms"], ".3f"), _f(m["delay_p99_ms"], ".3f"),
        _f(m.get("delay_delta_ms"), "+.3f"), _f(m["total_p50_ms"], ".1f"),
        f"{errors:.0f} !" if errors else "0", _f(m["cpu_us"], ".0f"),
    ]  # fmt: skip


def table_rows(
    summary: dict[str, dict[str, Any]], *, sse: bool, medians_only: bool
) -> list[list[str]]:
    """The wrk scenarios' table (``sse=False``) or the SSE table, header first: each
    repeat's rows (unless ``medians_only``), then the medians."""
    rows = [list(SSE_HEADER if sse else WRK_HEADER)]
    row = _sse_row if sse else _wrk_row
    for name, s in summary.items():
        if SCENARIOS[name].sse != sse:
            continue
        if not medians_only:
            for rep in s["repeats"]:
                for t in s["targets"]:
                    if t in rep["metrics"]:
                        rows.append(row(name, str(rep["repeat"]), t, rep["metrics"][t]))
        for t in s["targets"]:
            rows.append(row(name, "median", t, s["median"][t]))
    return rows


def check_rows(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = [["target (issue 7)", "measured", "threshold", "result"]]
    for c in results:
        unit = {"x": "x", "ms": " ms", "%": " %"}[c["unit"]]
        value = "-" if c["value"] is None else f"{c['value']:.2f}{unit}"
        result = {"met": "met", "missed": "**missed**"}.get(c["result"], c["result"])
        rows.append([c["name"], value, f"{c['op']} {c['threshold']:g}{unit}", result])
    return rows


def _checks_markdown(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "| --- | ---: | ---: | --- |"]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


PLOT_SCENARIOS = ("get-small", "chat", "latency-c4", "cache-hit")


def plot(summary: dict[str, dict[str, Any]], path: Path) -> bool:
    """PNG of the latency distributions (median percentiles per target), one panel per
    scenario; x: percentile on a log(1 / (1 - p)) scale. False when matplotlib is missing."""
    if not ensure_matplotlib():
        return False
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [s for s in PLOT_SCENARIOS if summary.get(s, {}).get("percentiles")]
    if not panels:
        return False
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    colors = {t: f"C{i}" for i, t in enumerate(TARGETS)}
    ticks = ["50", "90", "99", "99.9", "99.99"]
    for ax, name in zip(axes, panels, strict=False):
        for target, pcts in summary[name]["percentiles"].items():
            xs = [-math.log10(1 - float(p) / 100) for p in pcts]
            ax.plot(xs, list(pcts.values()), marker=".", label=target, color=colors[target])
        sc = SCENARIOS[name]
        ax.set_title(f"{name} (c{sc.connections})", fontsize=10)
        ax.set_yscale("log")
        ax.set_xticks([-math.log10(1 - float(p) / 100) for p in ticks], ticks)
        ax.set_xlabel("percentile")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[::cols]:
        ax.set_ylabel("latency ms (log)")
    fig.suptitle("Latency distribution (wrk), median per target", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


# --- the run ------------------------------------------------------------------------------------


def _versions(with_litellm: bool) -> dict[str, str]:
    out = {
        "nginx": _first_line([find_program("nginx") or "nginx", "-v"]).removeprefix(
            "nginx version: "
        ),
        "haproxy": " ".join(_first_line([find_program("haproxy") or "haproxy", "-v"]).split()[2:3]),
    }
    if with_litellm and (pip := LITELLM_VENV / "bin" / "pip").exists():
        show = subprocess.run([str(pip), "show", "litellm"], capture_output=True, text=True)
        out["litellm"] = next(
            (ln.split(":", 1)[1].strip() for ln in show.stdout.splitlines()
             if ln.startswith("Version:")), "unknown",
        )  # fmt: skip
    return out


def _progress(run: PerfRun, total: int) -> None:
    m = run.metrics
    if SCENARIOS[run.scenario].sse:
        what = (f"TTFT p50 {_f(m['ttft_p50_ms'], '.2f')} ms, chunk delay p99 "
                f"{_f(m['delay_p99_ms'], '.3f')} ms")  # fmt: skip
    else:
        what = f"{m['rps']:.0f} req/s, p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms"
    print(
        f"[{run.seq + 1}/{total}] repeat {run.repeat} {run.scenario} {run.target}: {what}, "
        f"errors {run.errors}, CPU {_f(run.cpu_us, '.1f')} µs/req"
        + (f" {run.notes}" if run.notes else ""),
        file=sys.stderr,
    )


def benchmark(
    args: argparse.Namespace, scenarios: Sequence[Scenario], targets: Sequence[str]
) -> tuple[dict[str, Any], list[PerfRun]]:
    """Start, check, warm up, measure (interleaved, rotated), soak.

    Raises:
        BenchError: a process did not start, a check failed, wrk failed.
    """
    pins = choose_pins(args)
    started = dt.datetime.now(dt.UTC)
    machine = {**machine_info(), **_versions("litellm" in targets)}  # load average before
    if pins["wrk"]:
        os.sched_setaffinity(0, pins["wrk"])  # this harness (and its SSE client) off CPU 0
    runs: list[PerfRun] = []
    soak_result = None
    with tempfile.TemporaryDirectory(prefix="geogate-perf-") as tmp, contextlib.ExitStack() as st:
        workdir = Path(tmp)
        stack = start_stack(st, workdir, pins, targets, args)
        print(
            "; ".join(f"{t.name} {t.url}" for t in stack.targets.values())
            + f"; upstream {stack.upstream.url}",
            file=sys.stderr,
        )
        plan = {s.name: [t for t in s.targets if t in stack.targets] for s in scenarios}
        for scenario in scenarios:
            for name in plan[scenario.name]:
                check_target(scenario, stack.targets[name])
        if args.warmup:
            warm = SCENARIOS["chat"]
            for name, target in stack.targets.items():
                if name != "direct":
                    wrk_once(warm, target.url, duration=args.warmup, cpus=pins["wrk"],
                             workdir=workdir, connections=16)  # fmt: skip
        total = args.repeats * sum(len(ts) for ts in plan.values())
        for repeat in range(1, args.repeats + 1):
            for scenario in scenarios:
                for name in _rotated(plan[scenario.name], repeat):  # type: ignore[arg-type]
                    target = stack.targets[name]
                    if scenario.sse:
                        run = measure_sse(scenario, target, repeat, len(runs), args)
                    else:
                        run = measure_wrk(scenario, target, repeat, len(runs), args, pins, workdir)
                    runs.append(run)
                    _progress(run, total)
        if args.soak:
            if "geogate" not in stack.targets:
                raise BenchError("--soak needs the geogate target")
            soak_result = soak(stack.targets["geogate"], args, pins, workdir)
        skipped = dict(stack.skipped)
    result: dict[str, Any] = {
        "command": _command_line(),
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "duration_s": args.duration,
            "repeats": args.repeats,
            "warmup_s": args.warmup,
            "scenarios": [s.name for s in scenarios],
            "targets": list(targets),
            "not_measured": skipped,
            "pinning": _pinning(pins),
            "sse": {
                "streams": args.sse_streams,
                "ttft_ms": args.sse_ttft_ms,
                "interval_ms": args.sse_interval_ms,
                "chunks": args.sse_chunks,
            },
            "quick": args.quick,
        },
        "runs": [r.to_json() for r in runs],
        "soak": soak_result,
        "flagged": any(r.errors for r in runs),
    }
    return result, runs


def _pinning(pins: dict[str, frozenset[int] | None]) -> str:
    if all(v is None for v in pins.values()):
        return "not pinned"

    def cpus(key: str) -> str:
        return ",".join(map(str, sorted(pins[key] or ())))

    return (
        f"proxies under test on CPU {cpus('gateway')}; fast upstream nginx, SSE upstream and "
        f"Redis on CPU {cpus('backend')}; wrk and this harness (SSE client) on CPU {cpus('wrk')}"
    )


NOTES = """\
- **CPU µs/req**: user + system CPU of the target's process tree (nginx master + worker,
  GeoGate supervisor + workers, ...) per successful response (rate-limited: per 429);
  **CPU % of core**: its CPU seconds per wall second; **req/s per core**: 10^6 / CPU µs/req.
  `direct` is the fast upstream itself, on the wrk core.
- **CPU vs ref**: CPU µs/req / the reference's in the same repeat; the reference is `nginx`
  (proxy_pass, upstream keep-alive), on cache-hit `nginx-static`. **p50 - direct**: p50 minus
  direct's p50 (ms); **p99 / nginx p99**: p99 over nginx proxy's p99. Median rows: medians
  of the per-repeat figures and ratios.
- SSE: **TTFT** from sending the request to the first chunk; **chunk delay**: each chunk's
  arrival minus the upstream's `time.monotonic()` when it wrote it (same clock): a proxy that
  holds chunks back shows here. `direct` streams through the upstream nginx (`/sse/`,
  unbuffered), as every proxy does.
- GeoGate: full pipeline on (API key, GeoIP from `X-Forwarded-For: 8.8.8.8` via trusted
  loopback, residency, a per-tenant rate limit too high to refuse, metrics; llm-exact cache on
  `/cached/` only); access log off; `geogate-redis`: the rate limiter in a local Redis.
"""


def _plain(table: str) -> str:
    """A medians-only table without render_markdown's bold median rows (every row is one)."""
    return table.replace("**", "")


def markdown_section(
    result: dict[str, Any],
    summary: dict[str, dict[str, Any]],
    check_results: Sequence[dict[str, Any]],
    plot_rel: str | None,
) -> str:
    """The RESULTS.md section of one run: settings, issue-7 checks, median tables, plot."""
    m, s = result["machine"], result["settings"]
    versions = f"{m['nginx']}, HAProxy {m['haproxy']}" + (
        f", LiteLLM {m['litellm']}" if "litellm" in m else ""
    )
    sse = s["sse"]
    lines = [
        f"## Comparative benchmark (issue 7), {result['started_utc'][:16].replace('T', ' ')} "
        f"UTC, commit {m['git_commit']}",
        "",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['kernel']}; Python {m['python']}, "
        f"aiohttp {m['aiohttp']}, uvloop {m['uvloop']}, {m['wrk']}; {versions}",
        f"- Load average (1, 5, 15 min) before: {' '.join(map(str, m['load_average']))}; after:"
        f" {' '.join(map(str, result['load_average_after']))}",
        f"- Pinning: {s['pinning']}",
        f"- Command: `{result['command']}`",
        f"- Per run: {s['duration_s']} s of wrk (1 thread; c64, latency-c4 c4, think-1000 c16 "
        f"with 16 ms think time); {s['repeats']} repeats, target order rotated per repeat; "
        f"warm-up {s['warmup_s']} s per target. SSE: {sse['streams']} streams, 4 at a time, "
        f"first chunk after {sse['ttft_ms']:g} ms, {sse['chunks']} chunks "
        f"{sse['interval_ms']:g} ms apart",
    ]
    for name, why in s["not_measured"].items():
        lines.append(f"- **Not measured: {name}** ({why})")
    lines += [
        "",
        "Issue 7's targets (medians of per-repeat figures):",
        "",
        _checks_markdown(check_rows(check_results)),
        "",
        _plain(render_markdown(table_rows(summary, sse=False, medians_only=True))),
        "",
    ]
    if any(SCENARIOS[n].sse for n in summary):
        lines += [_plain(render_markdown(table_rows(summary, sse=True, medians_only=True))), ""]
    if result.get("soak"):
        sk = result["soak"]
        lines += [
            f"- Soak: {sk['target']}, {sk['seconds']} s at {sk['rps']:.0f} req/s after "
            f"{SOAK_WARMUP} s warm-up: RSS {sk['rss_first_kib'] / 1024:.1f} -> "
            f"{sk['rss_last_kib'] / 1024:.1f} MiB (max {sk['rss_max_kib'] / 1024:.1f}), "
            f"growth {sk['growth_pct']} %; CPU {100 * sk['cpu_share']:.1f} % of a core; "
            f"errors {sk['errors']}",
            "",
        ]
    lines.append(NOTES)
    if plot_rel:
        lines += [f"![latency distributions]({plot_rel})", ""]
    if result["flagged"]:
        lines += ["**Flagged: some runs had errors; their figures are suspect.**", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``bench/perf.py``."""
    p = argparse.ArgumentParser(
        prog="bench/perf.py",
        description="GeoGate against nginx, HAProxy, a plain aiohttp proxy (and LiteLLM): "
        "CPU per request, latency, streaming; interleaved, repeated.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 s runs, 1 repeat, targets " + ",".join(QUICK_TARGETS),
    )
    p.add_argument("--duration", type=int, help="seconds per wrk run (default 8; quick 2)")
    p.add_argument("--repeats", type=int, help="rounds of every target (default 3; quick 1)")
    p.add_argument("--warmup", type=int, help="seconds of load per target first (default 2)")
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--targets",
        help=f"comma-separated, from {', '.join(TARGETS)} (default: all but litellm; quick: fewer)",
    )
    p.add_argument(
        "--litellm",
        action="store_true",
        help="also measure LiteLLM's proxy (installed into bench/out/litellm-venv)",
    )
    p.add_argument(
        "--soak",
        type=int,
        default=0,
        metavar="SECONDS",
        help="afterwards, GeoGate at ~1000 req/s this long, RSS every 10 s",
    )
    p.add_argument("--sse-streams", type=int, help="streams per SSE run (default 24; quick 8)")
    p.add_argument("--sse-ttft-ms", type=float, default=20.0)
    p.add_argument("--sse-interval-ms", type=float, default=10.0)
    p.add_argument("--sse-chunks", type=int, default=30)
    p.add_argument("--out", type=Path, help="JSON file (default bench/out/perf-<UTC>.json)")
    p.add_argument("--record", action="store_true", help="append a section to bench/RESULTS.md")
    p.add_argument("--no-plot", action="store_true", help="no PNG")
    p.add_argument(
        "--no-install",
        action="store_true",
        help="do not install missing nginx/haproxy/wrk/redis-server",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument("--proxy-cpus", dest="gateway_cpus", type=_cpu_list, metavar="LIST")
    p.add_argument("--upstream-cpus", dest="backend_cpus", type=_cpu_list, metavar="LIST")
    p.add_argument("--wrk-cpus", dest="wrk_cpus", type=_cpu_list, metavar="LIST")
    return p


def resolve_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[Scenario], list[str]]:
    """Fill in the defaults (quick or full); return the scenarios and targets to run."""
    quick = args.quick
    args.duration = args.duration or (2 if quick else 8)
    args.repeats = args.repeats or (1 if quick else 3)
    args.warmup = (1 if quick else 2) if args.warmup is None else args.warmup
    args.sse_streams = args.sse_streams or (8 if quick else 24)
    for name in ("duration", "repeats", "sse_streams", "sse_chunks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.soak < 0:
        parser.error("--warmup and --soak must be 0 or more")
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    if not names or (unknown := [n for n in names if n not in SCENARIOS]):
        parser.error(f"--scenarios: choose from {', '.join(SCENARIOS)}")
    if args.targets:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        if not targets or (unknown := [t for t in targets if t not in TARGETS]):
            parser.error(f"--targets: unknown {unknown}; choose from {', '.join(TARGETS)}")
    else:
        targets = list(QUICK_TARGETS if quick else TARGETS[:-1])
    if args.litellm and "litellm" not in targets:
        targets.append("litellm")
    targets = [t for t in TARGETS if t in targets]
    scenarios = [SCENARIOS[n] for n in dict.fromkeys(names)]
    if not any(set(s.targets) & set(targets) for s in scenarios):
        parser.error("no scenario measures any of --targets")
    return scenarios, targets


def main(argv: Sequence[str] | None = None) -> int:
    """Run; print the tables and checks; save JSON and the plot; optionally record."""
    parser = build_parser()
    args = parser.parse_args(argv)
    scenarios, targets = resolve_args(parser, args)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        ensure_programs(install=not args.no_install)
        result, runs = benchmark(args, scenarios, targets)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: every process stopped", file=sys.stderr)
        return 130
    summary = summarise(runs)
    check_results = evaluate_checks(summary, args.sse_interval_ms, result["soak"])
    result["summary"] = summary
    result["checks"] = check_results
    print(render_text(table_rows(summary, sse=False, medians_only=False)))
    if any(s.sse for s in scenarios):
        print()
        print(render_text(table_rows(summary, sse=True, medians_only=False)))
    print()
    print(render_text(check_rows(check_results)))
    stamp = result["started_utc"].replace(":", "")[:17]
    out = args.out or OUT_DIR / f"perf-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"results: {out}", file=sys.stderr)
    plot_rel = None
    if not args.no_plot:
        png = out.with_suffix(".png")
        if plot(summary, png):
            print(f"plot: {png}", file=sys.stderr)
            if args.record:
                kept = PLOTS_DIR / f"perf-{stamp[:10]}.png"
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(png, kept)
                plot_rel = str(kept.relative_to(BENCH_DIR))
        else:
            print("no plot: matplotlib could not be installed", file=sys.stderr)
    if args.record:
        record(markdown_section(result, summary, check_results, plot_rel))
        print(f"recorded in {RESULTS_MD}", file=sys.stderr)
    if result["flagged"]:
        print("FLAGGED: some runs had errors (see the errors column)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
