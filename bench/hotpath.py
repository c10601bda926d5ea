"""Where GeoGate's CPU goes: py-spy on the gateway under one of bench/perf.py's scenarios.

Usage::

    .venv/bin/python bench/hotpath.py                          # chat POST at c64, 15 s
    .venv/bin/python bench/hotpath.py --scenario think-1000 --duration 20 --top 40
    .venv/bin/python bench/hotpath.py --target geogate-redis   # the Redis rate limiter on

perf.py's stack is reused: the fast nginx upstream, GeoGate with the full pipeline (API key,
GeoIP, residency, rate limit, metrics) and the same pinning (GeoGate on the first CPU, wrk
and the upstream on the second). After a warm-up, one wrk run of ``--duration`` seconds is
sampled by py-spy (``record --format raw --nonblocking``: the gateway is not paused) at
``--rate`` Hz. Printed: the run's CPU µs per request (sampling adds a little; compare
profiles with profiles, and take speed figures from perf.py), the functions with the most
self time, and the share of each module (inclusive: a function and what it calls).

py-spy (the ``bench`` extra) is installed into this venv when missing; it needs ptrace
rights over the gateway (root, or ``kernel.yama.ptrace_scope`` 0). Output: a JSON file in
bench/out/. Exit status: 0 done, 1 the profile could not be taken, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/hotpath.py` puts bench/, not the project, on the path
    sys.path.insert(0, str(ROOT))

from bench import perf  # noqa: E402

__all__ = ["Profile", "aggregate", "main"]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


class Profile:
    """py-spy samples folded by function.

    Attributes:
        samples: stacks sampled (py-spy's raw format: ``frame;frame;... count``).
        self_share: function -> share of samples (0..1) with it on top of the stack.
        module_share: module -> share of samples with any of its functions on the stack.
    """

    def __init__(self, samples: int, self_share: dict[str, float], module_share: dict[str, float]):
        self.samples = samples
        self.self_share = self_share
        self.module_share = module_share

    def to_json(self, top: int) -> dict[str, Any]:
        """The ``top`` functions and modules, each as ``[name, share]``, largest first."""
        return {
            "samples": self.samples,
            "self": _top(self.self_share, top),
            "modules": _top(self.module_share, top),
        }


def _top(shares: dict[str, float], n: int) -> list[list[Any]]:
    ranked = sorted(shares.items(), key=lambda kv: -kv[1])[:n]
    return [[name, round(share, 4)] for name, share in ranked]


def _frame_name(frame: str) -> tuple[str, str]:
    """``"func (path/to/file.py:12)"`` -> (``"func (pkg/file.py)"``, module ``"pkg/file.py"``)."""
    m = _FRAME.match(frame)
    if m is None:
        return frame, frame
    path = m.group("file").split("/site-packages/")[-1]
    root = str(ROOT) + "/"
    if path.startswith(root):
        path = path[len(root) :]
    return f"{m.group('func')} ({path})", path


def aggregate(lines: Iterable[str]) -> Profile:
    """Fold py-spy raw output (one ``stack count`` per line, frames joined by ``;``).

    Raises:
        ValueError: a line does not end in a sample count.
    """
    self_time: collections.Counter[str] = collections.Counter()
    modules: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            raise ValueError(f"not a py-spy raw line: {line[:80]!r}")
        n = int(count)
        total += n
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        self_time[frames[-1][0]] += n
        for module in {module for _, module in frames}:
            modules[module] += n
    if total == 0:
        return Profile(0, {}, {})
    return Profile(
        total,
        {k: v / total for k, v in self_time.items()},
        {k: v / total for k, v in modules.items()},
    )


def ensure_pyspy() -> str | None:
    """The py-spy program, installing the ``bench`` extra's copy into this venv if missing."""
    venv_bin = Path(sys.executable).parent / "py-spy"
    found = str(venv_bin) if venv_bin.exists() else shutil.which("py-spy")
    if found:
        return found
    print("installing py-spy (the bench extra) for the profile", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "py-spy>=0.3.14"]
    if subprocess.run(cmd, check=False, timeout=600).returncode != 0:
        return None
    return str(venv_bin) if venv_bin.exists() else shutil.which("py-spy")


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="bench/hotpath.py", description="py-spy profile of GeoGate under a perf.py scenario"
    )
    wrk_scenarios = [name for name, s in perf.SCENARIOS.items() if not s.sse]
    p.add_argument("--scenario", choices=wrk_scenarios, default="chat")
    p.add_argument("--target", choices=["geogate", "geogate-redis"], default="geogate")
    p.add_argument("--duration", type=int, default=15, help="seconds sampled (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="seconds of load first (default 3)")
    p.add_argument("--rate", type=int, default=250, help="samples per second (default 250)")
    p.add_argument("--top", type=int, default=30, help="rows per table (default 30)")
    p.add_argument("--out", type=Path, help="JSON file (default bench/out/hotpath-<UTC>.json)")
    p.add_argument("--no-install", action="store_true", help="never apt-get/pip install")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    return p


def profile(args: argparse.Namespace) -> dict[str, Any]:
    """Start the stack, warm up, sample one wrk run; the result as JSON-ready data.

    Raises:
        perf.BenchError: a process did not start, a check failed, or py-spy failed.
    """
    pyspy = None if args.no_install and not shutil.which("py-spy") else ensure_pyspy()
    if pyspy is None:
        raise perf.BenchError("py-spy is not installed (pip install py-spy)")
    perf_argv = [
        "--targets",
        args.target,
        "--scenarios",
        args.scenario,
        "--repeats",
        "1",
        "--duration",
        str(args.duration),
        *(["--no-pin"] if args.no_pin else []),
    ]
    parser = perf.build_parser()
    perf_args = parser.parse_args(perf_argv)
    perf.resolve_args(parser, perf_args)
    perf.ensure_programs(install=not args.no_install)
    pins = perf.choose_pins(perf_args)
    scenario = perf.SCENARIOS[args.scenario]
    started = dt.datetime.now(dt.UTC)
    if pins["wrk"]:
        os.sched_setaffinity(0, pins["wrk"])
    tmpdir = tempfile.TemporaryDirectory(prefix="geogate-hotpath-")
    with tmpdir as tmp, contextlib.ExitStack() as st:
        workdir = Path(tmp)
        stack = perf.start_stack(st, workdir, pins, [args.target], perf_args)
        target = stack.targets[args.target]
        perf.check_target(scenario, target)
        if args.warmup:
            perf.wrk_once(scenario, target.url, duration=args.warmup, cpus=pins["wrk"],
                          workdir=workdir)  # fmt: skip
        raw = workdir / "py-spy.txt"
        sampler = subprocess.Popen(
            [pyspy, "record", "--pid", str(target.service.proc.pid), "--duration",
             str(args.duration), "--rate", str(args.rate), "--format", "raw", "--output",
             str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            run = perf.measure_wrk(scenario, target, 1, 0, perf_args, pins, workdir)
            _, err = sampler.communicate(timeout=args.duration + 60)
        finally:
            if sampler.poll() is None:
                sampler.kill()
                sampler.wait(timeout=10)
        if sampler.returncode != 0 or not raw.exists():
            raise perf.BenchError(f"py-spy failed ({sampler.returncode}): {err.strip()[-300:]}")
        folded = aggregate(raw.read_text().splitlines())
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_utc": started.isoformat(timespec="seconds"),
        "scenario": args.scenario,
        "target": args.target,
        "duration_s": args.duration,
        "rate_hz": args.rate,
        "run": run.to_json(),
        "cpu_us_per_request": run.cpu_us,
        "profile": folded.to_json(args.top),
    }


def render(result: dict[str, Any]) -> str:
    """The run's figures and the two tables as text."""
    prof = result["profile"]
    cpu = result["cpu_us_per_request"]
    lines = [
        f"{result['target']} under {result['scenario']}: {result['run']['metrics']['rps']:.0f} "
        f"req/s, CPU {cpu:.1f} µs/req (while sampled), {prof['samples']} samples",
        "",
        "self time (share of samples with the function on top)",
    ]
    lines += [f"  {share * 100:5.1f} %  {name}" for name, share in prof["self"]]
    lines += ["", "by module (share of samples with the module anywhere on the stack)"]
    lines += [f"  {share * 100:5.1f} %  {name}" for name, share in prof["modules"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Profile; print the tables; save the JSON. Returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        result = profile(args)
    except perf.BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(render(result))
    stamp = result["started_utc"].replace(":", "")[:17]
    out = args.out or perf.OUT_DIR / f"hotpath-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
