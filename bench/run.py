"""Benchmark the gateway against its own backend, interleaved, in one run: ``make bench``.

``python bench/run.py`` starts one backend (``python -m backend``, no artificial model delay)
and, in front of it, the gateways the targets need (``python -m gateway gateway``), all on
127.0.0.1 with ephemeral ports. Targets (``--targets``, default all three):

- ``direct``: wrk -> backend, the reference;
- ``gateway``: wrk -> gateway -> backend, no cache on its route;
- ``gateway-cached``: wrk -> a second gateway with the same config plus
  ``cache: {policy: llm-exact, default_temperature: 0}`` on its route, so the chat body
  (which sends no ``temperature``) is deterministic and answered from the cache. Only
  scenarios that can be cached measure it (``chat``; ``health`` is a GET the llm-exact policy
  never looks at, so it would measure the uncached gateway again).

The harness checks that each scenario answers 200 with ``X-Served-Region`` (and ``Via``
through a gateway); for gateway-cached it then sends the request again and requires
``Cache-Status: geogate; hit`` (else it stops: the figures would be of proxied requests).
It warms up through each gateway, then, for each repeat and scenario, runs wrk against each
target one right after the other, rotating the order (repeat 1 direct first, repeat 2
starting at the next target, ...): a steady drift of the machine then does not always favour
the same target. Around each gateway-cached run it reads the cached gateway's
``geogate_cache_lookups_total`` (``/metrics`` on an admin listener, read outside the CPU
window) and stops if any lookup was not a hit or there were fewer hits than responses.

Scenarios: ``health`` is ``GET /health``; ``chat`` is ``POST /v1/chat/completions`` with the
fixed non-streaming body in ``bench/wrk/chat_body.json``. wrk's Lua ``done()``
(``bench/wrk/summary.lua``) prints a JSON summary that is parsed instead of wrk's text.

CPU per request: user + system time of the gateway the run went through (and of the backend)
from ``/proc/<pid>/stat``, read right before and right after each wrk run, divided by the
responses with status < 400 in that run.

Pinning (default when this process may use 2 CPUs or more): the gateways on the first allowed
CPU (only one of them is busy at a time; the other idles); the backend, wrk and this harness
on the second. All targets then see the same backend on the same core, and a gateway's CPU
neither steals from nor waits for the backend's; on a 2-core machine this made figures
visibly steadier than letting the scheduler move three busy processes over two cores.
``--no-pin`` turns it off.

Bounded and clean: every wrk run has a timeout (its duration + 30 s), start-up 60 s, stop
15 s; the children are stopped (SIGTERM, then SIGKILL) on success, error, Ctrl-C or SIGTERM,
and get SIGTERM from the kernel should this process die without cleaning up
(``PR_SET_PDEATHSIG``).

Exit status: 0 success, 1 a run had errors (the figures are still printed and saved, the
run is flagged) or the benchmark could not run, 2 bad arguments, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/run.py` puts bench/, not the project, on the path
    sys.path.insert(0, str(ROOT))

from bench.processes import BenchError, Service, child_setup  # noqa: E402
from bench.report import (  # noqa: E402
    Run,
    Target,
    WrkSummary,
    parse_wrk_output,
    render_markdown,
    render_text,
    summarise,
    table_rows,
)

__all__ = [
    "SCENARIOS",
    "Scenario",
    "Services",
    "benchmark",
    "check_responses",
    "main",
    "run_wrk",
    "start_services",
]

BENCH_DIR = ROOT / "bench"
WRK_DIR = BENCH_DIR / "wrk"
OUT_DIR = BENCH_DIR / "out"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
REGION = "us-east-1"

WRK_GRACE = 30.0  # seconds a wrk run may overrun its --duration before it is killed
WRK_REQUEST_TIMEOUT = 5  # seconds: wrk --timeout, a slower response counts as a timeout error
CHECK_TIMEOUT = 10.0  # seconds for each response of the pre-measurement check
CACHE_HIT = "geogate; hit"  # how the cached gateway's Cache-Status starts on a hit
GATEWAY_READY = re.compile(r"gateway \S+ listening on ([\d.]+:\d+)")
ADMIN_READY = re.compile(r"admin listening on ([\d.]+:\d+)")
_CACHE_LOOKUPS = re.compile(r"^geogate_cache_lookups_total\{([^}]*)\} (\S+)$", re.MULTILINE)
_RESULT_LABEL = re.compile(r'result="([^"]*)"')


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    """One kind of request, sent the same way to each of its targets."""

    name: str
    method: str
    path: str
    script: Path  # the wrk Lua script that sends it
    body: bytes | None = None
    content_type: str | None = None
    targets: tuple[Target, ...] = (Target.DIRECT, Target.GATEWAY)  # those it can measure


SCENARIOS: dict[str, Scenario] = {
    "health": Scenario(name="health", method="GET", path="/health", script=WRK_DIR / "get.lua"),
    "chat": Scenario(
        name="chat",
        method="POST",
        path="/v1/chat/completions",
        script=WRK_DIR / "post_chat.lua",
        body=(WRK_DIR / "chat_body.json").read_bytes().strip(),
        content_type="application/json",
        targets=tuple(Target),  # no temperature: deterministic at default_temperature 0
    ),
}
GATEWAY_TARGETS = (Target.GATEWAY, Target.GATEWAY_CACHED)


def gateway_config(backend_url: str, *, cached: bool = False) -> dict[str, Any]:
    """The gateway's config: region us-east-1 with the one backend, one catch-all route.

    ``cached``: the route answers deterministic LLM POSTs from the llm-exact cache (bodies
    without ``temperature`` count as temperature 0), and an admin listener serves
    ``/metrics`` so that the harness can count the hits.
    """
    route: dict[str, Any] = {"prefix": "/"}
    if cached:
        route["cache"] = {"policy": "llm-exact", "default_temperature": 0}
    config: dict[str, Any] = {
        "gateway": {
            "region": REGION,
            "listen": "127.0.0.1:0",
            "geodb": str(ROOT / "geodb" / "dbip-country.mmdb"),
        },
        "residency": {"policy": str(ROOT / "config" / "residency.yaml")},
        "regions": {REGION: {"zones": ["us", "global"], "endpoints": [backend_url]}},
        "routes": [route],
    }
    if cached:
        config["admin"] = {"listen": "127.0.0.1:0"}
    return config


@dataclass(frozen=True, slots=True, kw_only=True)
class Services:
    """The running processes and where each target answers."""

    backend: Service
    gateways: dict[Target, Service]  # gateway and/or gateway-cached, as the targets need
    urls: dict[Target, str]  # base URL of each selected target
    cache_metrics: str | None  # the cached gateway's /metrics URL; None when not started


def start_services(
    stack: contextlib.ExitStack,
    workdir: Path,
    pins: dict[str, frozenset[int] | None],
    targets: Sequence[Target] = (Target.DIRECT, Target.GATEWAY),
) -> Services:
    """Start the backend, then the gateways ``targets`` need in front of it (both gateways on
    ``pins["gateway"]``); each is stopped when ``stack`` closes, gateways first."""
    backend = Service(
        "backend",
        [sys.executable, "-m", "backend", "--region", REGION, "--zones", "us,global",
         "--host", "127.0.0.1", "--port", "0", "--ttft-ms", "0", "--tokens-per-second", "0"],
        log_path=workdir / "backend.log",
        cpus=pins["backend"],
    )  # fmt: skip
    stack.callback(backend.stop)
    backend_url = backend.wait_ready(re.compile(r"listening on (http://\S+)")).group(1)

    gateways: dict[Target, Service] = {}
    for target in (t for t in GATEWAY_TARGETS if t in targets):
        name = str(target)
        config = workdir / f"{name}.yaml"
        cfg = gateway_config(backend_url, cached=target is Target.GATEWAY_CACHED)
        config.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
        gateways[target] = Service(
            name,
            [sys.executable, "-m", "gateway", "--log-level", "WARNING", "gateway", "-c",
             str(config)],
            log_path=workdir / f"{name}.log",
            cpus=pins["gateway"],
        )  # fmt: skip
        stack.callback(gateways[target].stop)  # the ExitStack stops gateways, then the backend
    urls = {Target.DIRECT: backend_url} if Target.DIRECT in targets else {}
    cache_metrics = None
    for target, gateway in gateways.items():
        urls[target] = f"http://{gateway.wait_ready(GATEWAY_READY).group(1)}"
        if target is Target.GATEWAY_CACHED:
            cache_metrics = f"http://{gateway.wait_ready(ADMIN_READY).group(1)}/metrics"
    return Services(
        backend=backend,
        gateways=gateways,
        urls={t: urls[t] for t in Target if t in urls},
        cache_metrics=cache_metrics,
    )


# --- checks and wrk -------------------------------------------------------------------------


def _request(scenario: Scenario, base: str) -> tuple[http.client.HTTPResponse, bytes]:
    where = f"{scenario.method} {base}{scenario.path}"
    split = urlsplit(base)  # http://127.0.0.1:PORT
    conn = http.client.HTTPConnection(split.netloc, timeout=CHECK_TIMEOUT)
    try:
        headers = {"Content-Type": scenario.content_type} if scenario.content_type else {}
        conn.request(scenario.method, scenario.path, body=scenario.body, headers=headers)
        resp = conn.getresponse()
        return resp, resp.read()
    except OSError as exc:
        raise BenchError(f"{where}: {exc}") from exc
    finally:
        conn.close()


def check_responses(scenarios: Sequence[Scenario], urls: dict[Target, str]) -> None:
    """Send each scenario once to each of its targets in ``urls``; require a real answer.

    For gateway-cached the first answer may be forwarded (it fills the cache); the request is
    then sent again and that answer must be a cache hit.

    Raises:
        BenchError: a status other than 200, no ``X-Served-Region: us-east-1`` on an answer
            from the backend, a gateway answer without the gateway's ``Via``, a chat answer
            without a message, or a second gateway-cached answer that is not a hit.
    """
    for scenario in scenarios:
        for target, base in urls.items():
            if target not in scenario.targets:
                continue
            where = f"{scenario.name} {target} {scenario.method} {base}{scenario.path}"
            resp, body = _request(scenario, base)
            _check_answer(where, scenario, target, resp, body)
            if target is not Target.GATEWAY_CACHED:
                continue
            resp, body = _request(scenario, base)  # the entry is stored: this must be a hit
            status = resp.getheader("Cache-Status") or ""
            if not status.startswith(CACHE_HIT):
                raise BenchError(
                    f"{where}: second request not answered from the cache (Cache-Status "
                    f"{status!r}, expected {CACHE_HIT!r}...): gateway-cached would measure "
                    "proxied requests"
                )
            _check_answer(where, scenario, target, resp, body)


def _check_answer(
    where: str, scenario: Scenario, target: Target, resp: http.client.HTTPResponse, body: bytes
) -> None:
    if resp.status != 200:
        raise BenchError(f"{where}: status {resp.status}: {body[:300]!r}")
    hit = (resp.getheader("Cache-Status") or "").startswith(CACHE_HIT)
    if not hit:  # a hit is the gateway's own answer: no Via, no backend headers
        if resp.getheader("X-Served-Region") != REGION:
            raise BenchError(f"{where}: X-Served-Region {resp.getheader('X-Served-Region')!r}")
        if target is not Target.DIRECT and "geogate" not in (resp.getheader("Via") or ""):
            raise BenchError(f"{where}: no 'Via: 1.1 geogate': not answered by the gateway")
    if scenario.name == "chat":
        try:
            json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise BenchError(f"{where}: not a chat completion: {body[:300]!r}") from exc


def cache_lookups(metrics_url: str) -> dict[str, float]:
    """The gateway's ``geogate_cache_lookups_total`` by result (all zones summed).

    Raises:
        BenchError: /metrics did not answer 200.
    """
    split = urlsplit(metrics_url)
    conn = http.client.HTTPConnection(split.netloc, timeout=CHECK_TIMEOUT)
    try:
        conn.request("GET", split.path)
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
    except OSError as exc:
        raise BenchError(f"GET {metrics_url}: {exc}") from exc
    finally:
        conn.close()
    if resp.status != 200:
        raise BenchError(f"GET {metrics_url}: status {resp.status}")
    out: dict[str, float] = {}
    for labels, value in _CACHE_LOOKUPS.findall(text):
        if (result := _RESULT_LABEL.search(labels)) is not None:
            out[result.group(1)] = out.get(result.group(1), 0.0) + float(value)
    return out


def _hits_only(before: dict[str, float], after: dict[str, float], summary: WrkSummary) -> int:
    """The hits between two ``cache_lookups`` readings around a gateway-cached run.

    Raises:
        BenchError: a lookup was not a hit, or fewer hits than responses (some requests did
            not go through the cache).
    """
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after.keys() | before.keys()}
    hits = int(delta.pop("hit", 0.0))
    others = {k: int(v) for k, v in delta.items() if v}
    if others:
        raise BenchError(f"gateway-cached: lookups other than hits during a measured run: {others}")
    if hits < summary.ok_requests:
        raise BenchError(
            f"gateway-cached: {hits} cache hits for {summary.ok_requests} responses: some "
            "requests were not answered from the cache"
        )
    return hits


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped children: the wrk runs
    return usage.ru_utime + usage.ru_stime


def run_wrk(
    scenario: Scenario,
    base_url: str,
    *,
    duration: int,
    connections: int,
    threads: int,
    cpus: frozenset[int] | None,
) -> tuple[WrkSummary, float]:
    """Run wrk for ``duration`` seconds against ``base_url`` + the scenario's path.

    Returns:
        (wrk's summary, wrk's own CPU seconds).

    Raises:
        BenchError: wrk failed or printed no summary.
    """
    argv = [
        "wrk", "--threads", str(threads), "--connections", str(connections),
        "--duration", f"{duration}s", "--timeout", f"{WRK_REQUEST_TIMEOUT}s",
        "--script", str(scenario.script), base_url + scenario.path,
    ]  # fmt: skip
    before = _children_cpu()
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=duration + WRK_GRACE,
            check=False,
            preexec_fn=child_setup(cpus),
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk ran over {duration + WRK_GRACE:.0f} s: killed") from exc
    wrk_cpu = _children_cpu() - before
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with {proc.returncode}: {proc.stderr.strip()}")
    try:
        return parse_wrk_output(proc.stdout), wrk_cpu
    except ValueError as exc:
        raise BenchError(f"{exc}\nwrk stdout:\n{proc.stdout}\nwrk stderr:\n{proc.stderr}") from exc


# --- machine and pinning ---------------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def machine_info() -> dict[str, Any]:
    """Where the figures come from: CPUs, kernel, versions, load, commit."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("aiohttp", "uvloop"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    commit = _first_line(["git", "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "nproc": os.cpu_count(),
        "allowed_cpus": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        **versions,
        "wrk": _first_line(["wrk", "-v"]).split(" Copyright")[0],
        "git_commit": commit + ("+dirty" if dirty not in ("", "unknown") else ""),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _cpu_list(text: str) -> frozenset[int]:
    try:
        cpus = frozenset(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CPU list such as 0 or 1,2") from None
    if not cpus <= os.sched_getaffinity(0):
        raise argparse.ArgumentTypeError(
            f"CPUs {sorted(cpus)} not all allowed (allowed: {sorted(os.sched_getaffinity(0))})"
        )
    return cpus


def choose_pins(args: argparse.Namespace) -> dict[str, frozenset[int] | None]:
    """CPUs for gateway, backend and wrk (None: not pinned); see the module docstring."""
    allowed = sorted(os.sched_getaffinity(0))
    if args.no_pin or len(allowed) < 2:
        return {"gateway": None, "backend": None, "wrk": None}
    first, second = frozenset(allowed[:1]), frozenset(allowed[1:2])
    return {
        "gateway": args.gateway_cpus or first,
        "backend": args.backend_cpus or second,
        "wrk": args.wrk_cpus or second,
    }


def _describe_pins(pins: dict[str, frozenset[int] | None]) -> str:
    if all(v is None for v in pins.values()):
        return "not pinned"
    return ", ".join(
        f"{name} on CPU {','.join(map(str, sorted(c)))}" for name, c in pins.items() if c
    )


# --- output -------------------------------------------------------------------------------------

RESULTS_HEADER = """\
# GeoGate benchmark results

Recorded by `bench/run.py --record` (see its docstring for the method). Each section is one
run: the backend measured directly, through the gateway and (chat) through a second gateway
answering from its llm-exact cache, interleaved, on one machine.

- **ratio req/s, ratio p50, ratio p99**: gateway (or gateway-cached) figure / direct figure
  of the same repeat; a req/s ratio below 1 and a p50 ratio above 1 are the gateway's cost.
  On a *median* row: the median of the per-repeat ratios.
- **gw CPU µs/req**: gateway user + system CPU time per request (from `/proc/<pid>/stat`);
  **gw CPU %**: gateway CPU seconds per wall second (100 = one core fully busy: the gateway
  is the bottleneck). **backend CPU µs/req**: the same for the backend, in both kinds of runs.
- **cached/gw req/s, p50, p99, CPU**: gateway-cached figure / uncached gateway figure of the
  same repeat (CPU: gateway CPU µs per request): what a cache hit costs against the same
  request proxied.
- **errors**: socket errors + responses with status >= 400 (`!` flags a run that had any).
- Absolute req/s drift 20-30 % between minutes on a shared machine: compare ratios and CPU
  per request across sections, not req/s.
"""


CACHED_NOTE = (
    "- gateway-cached: a second gateway, same config plus `cache: {policy: llm-exact, "
    "default_temperature: 0}` on its route; every measured request was a cache hit "
    "(checked: `Cache-Status: geogate; hit` before measuring, and only hits in its "
    "`geogate_cache_lookups_total` during each run). **cached/gw** columns: gateway-cached / "
    "uncached gateway, same repeat (CPU: gateway CPU µs per request)."
)


def markdown_section(result: dict[str, Any], rows: list[list[str]]) -> str:
    m, s = result["machine"], result["settings"]
    cached = Target.GATEWAY_CACHED in s.get("targets", ())
    lines = [
        f"## {result['started_utc'][:16].replace('T', ' ')} UTC, commit {m['git_commit']}",
        "",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['kernel']}; Python {m['python']}, "
        f"aiohttp {m['aiohttp']}, uvloop {m['uvloop']}, {m['wrk']}",
        f"- Load average (1, 5, 15 min) before: {' '.join(map(str, m['load_average']))}; after: "
        f"{' '.join(map(str, result['load_average_after']))}",
        f"- Pinning: {s['pinning']}",
        f"- Command: `{result['command']}`",
        f"- Per run: {s['duration_s']} s, {s['connections']} connections, {s['threads']} wrk "
        f"thread(s); {s['repeats']} repeats; warm-up {s['warmup_s']} s per scenario and gateway",
        *([CACHED_NOTE] if cached else []),
        "",
        render_markdown(rows),
        "",
    ]
    if result["flagged"]:
        lines += ["**Flagged: some runs had errors; their figures are suspect.**", ""]
    return "\n".join(lines)


def record(section: str, path: Path | None = None) -> None:
    """Append ``section`` to ``path`` (default bench/RESULTS.md), header first if it is new."""
    path = path or RESULTS_MD
    text = path.read_text() if path.exists() else RESULTS_HEADER
    path.write_text(text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n")


def _command_line() -> str:
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(ROOT)
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    return shlex.join([str(exe), str(script), *sys.argv[1:]])


# --- main ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``bench/run.py``."""
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="wrk: the backend directly, through the gateway and through a caching "
        "gateway, interleaved, repeated.",
    )
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument(
        "--repeats", type=int, default=3, help="rounds of one run per target (default 3)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="seconds of load per scenario through each gateway before measuring (default 2)",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--targets",
        default=",".join(Target),
        help=f"comma-separated, from {', '.join(Target)} (default: all); a scenario measures "
        "those it can (health: not gateway-cached)",
    )
    p.add_argument(
        "--out", type=Path, help="JSON results file (default bench/out/bench-<UTC time>.json)"
    )
    p.add_argument("--record", action="store_true", help="append a section to bench/RESULTS.md")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    for name, help_ in (
        ("gateway", "CPUs for both gateways"),
        ("backend", "CPUs for the backend"),
        ("wrk", "CPUs for wrk and this harness"),
    ):
        p.add_argument(f"--{name}-cpus", type=_cpu_list, metavar="LIST", help=help_)
    return p


def _check_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[Scenario], list[Target]]:
    for name in ("duration", "connections", "threads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if args.connections < args.threads:
        parser.error("--connections must be at least --threads (wrk's rule)")
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        parser.error(f"--scenarios: unknown {unknown}; choose from {', '.join(SCENARIOS)}")
    wanted = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in set(Target)]
    if unknown or not wanted:
        parser.error(f"--targets: unknown {unknown}; choose from {', '.join(Target)}")
    targets = [t for t in Target if t in wanted]  # always in Target order
    scenarios = [SCENARIOS[n] for n in dict.fromkeys(names)]
    for scenario in scenarios:
        if not set(targets) & set(scenario.targets):
            parser.error(
                f"scenario {scenario.name} measures none of --targets {','.join(targets)} "
                f"(it can: {', '.join(scenario.targets)})"
            )
    if shutil.which("wrk") is None:
        parser.error("wrk is not on PATH (scripts/install-system-deps.sh installs it)")
    return scenarios, targets


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: wrk killed, children stopped


def _rotated(targets: Sequence[Target], repeat: int) -> list[Target]:
    """Repeat 1: ``targets`` in order; repeat 2 starts at the second; and so on."""
    k = (repeat - 1) % len(targets)
    return [*targets[k:], *targets[:k]]


def benchmark(
    args: argparse.Namespace, scenarios: list[Scenario], targets: Sequence[Target] = tuple(Target)
) -> tuple[dict[str, Any], list[Run]]:
    """Start the processes, check, warm up, measure.

    Returns:
        (the results, JSON-ready; the runs in the order they ran).

    Raises:
        BenchError: see ``start_services``, ``check_responses``, ``run_wrk`` and
            ``_hits_only``.
    """
    pins = choose_pins(args)
    started = dt.datetime.now(dt.UTC)
    plan = {s.name: [t for t in targets if t in s.targets] for s in scenarios}
    shown_pins = dict(pins)
    if Target.GATEWAY_CACHED in targets:  # on the same CPUs as the gateway
        shown_pins = {"gateway": pins["gateway"], "gateway-cached": pins["gateway"], **pins}
    result: dict[str, Any] = {
        "command": _command_line(),
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {
            "duration_s": args.duration,
            "connections": args.connections,
            "threads": args.threads,
            "repeats": args.repeats,
            "warmup_s": args.warmup,
            "scenarios": [s.name for s in scenarios],
            "targets": [str(t) for t in targets],
            "targets_per_scenario": {name: [str(t) for t in ts] for name, ts in plan.items()},
            "pinning": _describe_pins(shown_pins),
        },
    }
    if pins["wrk"]:
        os.sched_setaffinity(0, pins["wrk"])  # keep this harness off the gateways' CPU
    wrk_opts: dict[str, Any] = {
        "connections": args.connections,
        "threads": args.threads,
        "cpus": pins["wrk"],
    }
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="geogate-bench-") as tmp, contextlib.ExitStack() as st:
        sv = start_services(st, Path(tmp), pins, targets)
        where = ", ".join(f"{t} {u}" for t, u in sv.urls.items())
        print(f"{where}; {_describe_pins(shown_pins)}", file=sys.stderr)
        check_responses(scenarios, sv.urls)
        for scenario in scenarios if args.warmup else ():
            # through each gateway: warms its path and pool and the backend's handler
            warm = [t for t in plan[scenario.name] if t in sv.gateways] or plan[scenario.name]
            for target in warm:
                run_wrk(scenario, sv.urls[target], duration=args.warmup, **wrk_opts)
        total = args.repeats * sum(len(ts) for ts in plan.values())
        for repeat in range(1, args.repeats + 1):
            for scenario in scenarios:
                for target in _rotated(plan[scenario.name], repeat):
                    runs.append(_measure(sv, scenario, target, repeat, len(runs), args, wrk_opts))
                    _progress(runs[-1], total)
    summaries = summarise(runs)
    result.update(
        {
            "finished_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "runs": [r.to_json() for r in runs],
            "summary": [s.to_json() for s in summaries],
            "flagged": any(r.wrk.errors for r in runs),
        }
    )
    return result, runs


def _measure(
    sv: Services,
    scenario: Scenario,
    target: Target,
    repeat: int,
    seq: int,
    args: argparse.Namespace,
    wrk_opts: dict[str, Any],
) -> Run:
    """One wrk run against ``target``, with the CPU of its gateway and of the backend."""
    # the gateway the run goes through; in a direct run, the idle gateways
    watched = [sv.gateways[target]] if target in sv.gateways else list(sv.gateways.values())
    metrics = sv.cache_metrics if target is Target.GATEWAY_CACHED else None
    lookups = cache_lookups(metrics) if metrics else {}  # read outside the CPU window
    g0, b0 = sum(g.cpu_seconds() for g in watched), sv.backend.cpu_seconds()
    summary, wrk_cpu = run_wrk(scenario, sv.urls[target], duration=args.duration, **wrk_opts)
    g1, b1 = sum(g.cpu_seconds() for g in watched), sv.backend.cpu_seconds()
    hits = _hits_only(lookups, cache_lookups(metrics), summary) if metrics else None
    return Run(
        scenario=scenario.name,
        target=target,
        repeat=repeat,
        wrk=summary,
        gateway_cpu=g1 - g0,
        backend_cpu=b1 - b0,
        wrk_cpu=wrk_cpu,
        seq=seq,
        cache_hits=hits,
    )


def _progress(run: Run, total: int) -> None:
    gw = run.gateway_us_per_request
    print(
        f"[{run.seq + 1}/{total}] repeat {run.repeat} {run.scenario} {run.target}: "
        f"{run.wrk.rps:.0f} req/s, p50 {run.wrk.p50 * 1e3:.2f} ms, p99 {run.wrk.p99 * 1e3:.2f} ms"
        f", errors {run.wrk.errors}"
        + (f", gateway {gw:.0f} µs/req" if gw is not None else "")
        + (f", {run.cache_hits} cache hits" if run.cache_hits is not None else ""),
        file=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table; save JSON; optionally record to RESULTS.md.

    Returns:
        The exit status (see the module docstring).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    scenarios, targets = _check_args(parser, args)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        result, runs = benchmark(args, scenarios, targets)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: every process stopped", file=sys.stderr)
        return 130

    rows = table_rows(summarise(runs))
    print(render_text(rows))
    out = args.out or OUT_DIR / f"bench-{result['started_utc'].replace(':', '')[:17]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"results: {out}", file=sys.stderr)
    if args.record:
        record(markdown_section(result, rows))
        print(f"recorded in {RESULTS_MD}", file=sys.stderr)
    if result["flagged"]:
        print("FLAGGED: some runs had errors (see the errors column)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
