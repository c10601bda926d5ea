"""Benchmark the gateway against its own backend, interleaved, in one run: ``make bench``.

``python bench/run.py`` starts one backend (``python -m backend``, no artificial model delay)
and one gateway in front of it (``python -m gateway gateway``), both on 127.0.0.1 with
ephemeral ports, checks that each scenario answers 200 through the gateway with
``X-Served-Region``, warms up, and then, for each repeat and scenario, runs wrk against the
backend directly and through the gateway, one right after the other. Repeat 1 runs direct
first, repeat 2 gateway first, and so on: alternating the order keeps a steady drift of the
machine from always favouring the same target.

Scenarios: ``health`` is ``GET /health``; ``chat`` is ``POST /v1/chat/completions`` with the
fixed non-streaming body in ``bench/wrk/chat_body.json``. wrk's Lua ``done()``
(``bench/wrk/summary.lua``) prints a JSON summary that is parsed instead of wrk's text.

CPU per request: user + system time of the gateway (and of the backend) from
``/proc/<pid>/stat``, read right before and right after each wrk run, divided by the
responses with status < 400 in that run.

Pinning (default when this process may use 2 CPUs or more): the gateway alone on the first
allowed CPU; the backend, wrk and this harness on the second. Both targets then see the same
backend on the same core, and the gateway's CPU neither steals from nor waits for the
backend's; on a 2-core machine this made figures visibly steadier than letting the scheduler
move three busy processes over two cores. ``--no-pin`` turns it off.

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


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    """One kind of request, sent the same way to both targets."""

    name: str
    method: str
    path: str
    script: Path  # the wrk Lua script that sends it
    body: bytes | None = None
    content_type: str | None = None


SCENARIOS: dict[str, Scenario] = {
    "health": Scenario(name="health", method="GET", path="/health", script=WRK_DIR / "get.lua"),
    "chat": Scenario(
        name="chat",
        method="POST",
        path="/v1/chat/completions",
        script=WRK_DIR / "post_chat.lua",
        body=(WRK_DIR / "chat_body.json").read_bytes().strip(),
        content_type="application/json",
    ),
}


def gateway_config(backend_url: str) -> dict[str, Any]:
    """The gateway's config: region us-east-1 with the one backend, one catch-all route."""
    return {
        "gateway": {
            "region": REGION,
            "listen": "127.0.0.1:0",
            "geodb": str(ROOT / "geodb" / "dbip-country.mmdb"),
        },
        "residency": {"policy": str(ROOT / "config" / "residency.yaml")},
        "regions": {REGION: {"zones": ["us", "global"], "endpoints": [backend_url]}},
        "routes": [{"prefix": "/"}],
    }


def start_services(
    stack: contextlib.ExitStack, workdir: Path, pins: dict[str, frozenset[int] | None]
) -> tuple[Service, Service, dict[Target, str]]:
    """Start the backend, then the gateway in front of it; each is stopped when ``stack`` closes.

    Returns:
        (backend, gateway, base URL of each target).
    """
    backend = Service(
        "backend",
        [sys.executable, "-m", "backend", "--region", REGION, "--zones", "us,global",
         "--host", "127.0.0.1", "--port", "0", "--ttft-ms", "0", "--tokens-per-second", "0"],
        log_path=workdir / "backend.log",
        cpus=pins["backend"],
    )  # fmt: skip
    stack.callback(backend.stop)
    backend_url = backend.wait_ready(re.compile(r"listening on (http://\S+)")).group(1)

    config = workdir / "gateway.yaml"
    config.write_text(json.dumps(gateway_config(backend_url), indent=2))  # JSON is YAML
    gateway = Service(
        "gateway",
        [sys.executable, "-m", "gateway", "--log-level", "WARNING", "gateway", "-c", str(config)],
        log_path=workdir / "gateway.log",
        cpus=pins["gateway"],
    )
    stack.callback(gateway.stop)  # the ExitStack stops the gateway first, then the backend
    bound = gateway.wait_ready(re.compile(r"gateway \S+ listening on ([\d.]+:\d+)")).group(1)
    return backend, gateway, {Target.DIRECT: backend_url, Target.GATEWAY: f"http://{bound}"}


# --- checks and wrk -------------------------------------------------------------------------


def check_responses(scenarios: Sequence[Scenario], urls: dict[Target, str]) -> None:
    """Send each scenario once to each target; require a real answer.

    Raises:
        BenchError: a status other than 200, no ``X-Served-Region: us-east-1``, a gateway
            answer without the gateway's ``Via``, or a chat answer without a message.
    """
    for scenario in scenarios:
        for target, base in urls.items():
            where = f"{scenario.name} {target} {scenario.method} {base}{scenario.path}"
            split = urlsplit(base)  # http://127.0.0.1:PORT
            conn = http.client.HTTPConnection(split.netloc, timeout=CHECK_TIMEOUT)
            try:
                headers = {"Content-Type": scenario.content_type} if scenario.content_type else {}
                conn.request(scenario.method, scenario.path, body=scenario.body, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except OSError as exc:
                raise BenchError(f"{where}: {exc}") from exc
            finally:
                conn.close()
            if resp.status != 200:
                raise BenchError(f"{where}: status {resp.status}: {body[:300]!r}")
            if resp.getheader("X-Served-Region") != REGION:
                raise BenchError(f"{where}: X-Served-Region {resp.getheader('X-Served-Region')!r}")
            if target is Target.GATEWAY and "geogate" not in (resp.getheader("Via") or ""):
                raise BenchError(f"{where}: no 'Via: 1.1 geogate': not answered by the gateway")
            if scenario.name == "chat":
                try:
                    json.loads(body)["choices"][0]["message"]["content"]
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    raise BenchError(f"{where}: not a chat completion: {body[:300]!r}") from exc


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
run: the backend measured directly and through the gateway, interleaved, on one machine.

- **ratio req/s, ratio p50, ratio p99**: gateway figure / direct figure of the same repeat;
  a req/s ratio below 1 and a p50 ratio above 1 are the gateway's cost. On a *median* row:
  the median of the per-repeat ratios.
- **gw CPU µs/req**: gateway user + system CPU time per request (from `/proc/<pid>/stat`);
  **gw CPU %**: gateway CPU seconds per wall second (100 = one core fully busy: the gateway
  is the bottleneck). **backend CPU µs/req**: the same for the backend, in both kinds of runs.
- **errors**: socket errors + responses with status >= 400 (`!` flags a run that had any).
- Absolute req/s drift 20-30 % between minutes on a shared machine: compare ratios and CPU
  per request across sections, not req/s.
"""


def markdown_section(result: dict[str, Any], rows: list[list[str]]) -> str:
    m, s = result["machine"], result["settings"]
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
        f"thread(s); {s['repeats']} repeats; warm-up {s['warmup_s']} s per scenario",
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
        description="wrk: the backend directly and through the gateway, interleaved, repeated.",
    )
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="direct+gateway pairs (default 3)")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="seconds of load per scenario through the gateway before measuring (default 2)",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--out", type=Path, help="JSON results file (default bench/out/bench-<UTC time>.json)"
    )
    p.add_argument("--record", action="store_true", help="append a section to bench/RESULTS.md")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    for name in ("gateway", "backend", "wrk"):
        p.add_argument(f"--{name}-cpus", type=_cpu_list, metavar="LIST", help=f"CPUs for {name}")
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Scenario]:
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
    if shutil.which("wrk") is None:
        parser.error("wrk is not on PATH (scripts/install-system-deps.sh installs it)")
    return [SCENARIOS[n] for n in dict.fromkeys(names)]


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: wrk killed, children stopped


def benchmark(
    args: argparse.Namespace, scenarios: list[Scenario]
) -> tuple[dict[str, Any], list[Run]]:
    """Start the processes, check, warm up, measure.

    Returns:
        (the results, JSON-ready; the runs in the order they ran).

    Raises:
        BenchError: see ``start_services``, ``check_responses`` and ``run_wrk``.
    """
    pins = choose_pins(args)
    started = dt.datetime.now(dt.UTC)
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
            "pinning": _describe_pins(pins),
        },
    }
    if pins["wrk"]:
        os.sched_setaffinity(0, pins["wrk"])  # keep this harness off the gateway's CPU
    wrk_opts: dict[str, Any] = {
        "connections": args.connections,
        "threads": args.threads,
        "cpus": pins["wrk"],
    }
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="geogate-bench-") as tmp, contextlib.ExitStack() as st:
        backend, gateway, urls = start_services(st, Path(tmp), pins)
        log = (
            f"backend {urls[Target.DIRECT]}, gateway {urls[Target.GATEWAY]}; {_describe_pins(pins)}"
        )
        print(log, file=sys.stderr)
        check_responses(scenarios, urls)
        for scenario in scenarios if args.warmup else ():
            # through the gateway: warms the gateway's path and pool and the backend's handler
            run_wrk(scenario, urls[Target.GATEWAY], duration=args.warmup, **wrk_opts)
        total = args.repeats * len(scenarios) * 2
        for repeat in range(1, args.repeats + 1):
            order = list(Target) if repeat % 2 else list(reversed(Target))
            for scenario in scenarios:
                for target in order:
                    g0, b0 = gateway.cpu_seconds(), backend.cpu_seconds()
                    summary, wrk_cpu = run_wrk(
                        scenario, urls[target], duration=args.duration, **wrk_opts
                    )
                    g1, b1 = gateway.cpu_seconds(), backend.cpu_seconds()
                    run = Run(
                        scenario=scenario.name,
                        target=target,
                        repeat=repeat,
                        wrk=summary,
                        gateway_cpu=g1 - g0,
                        backend_cpu=b1 - b0,
                        wrk_cpu=wrk_cpu,
                        seq=len(runs),
                    )
                    runs.append(run)
                    _progress(run, total)
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


def _progress(run: Run, total: int) -> None:
    gw = run.gateway_us_per_request
    print(
        f"[{run.seq + 1}/{total}] repeat {run.repeat} {run.scenario} {run.target}: "
        f"{run.wrk.rps:.0f} req/s, p50 {run.wrk.p50 * 1e3:.2f} ms, p99 {run.wrk.p99 * 1e3:.2f} ms"
        f", errors {run.wrk.errors}" + (f", gateway {gw:.0f} µs/req" if gw is not None else ""),
        file=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table; save JSON; optionally record to RESULTS.md.

    Returns:
        The exit status (see the module docstring).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    scenarios = _check_args(parser, args)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        result, runs = benchmark(args, scenarios)
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
