"""Rolling restarts under load: every request must succeed while the workers are replaced.

``python bench/rolling_restart.py`` starts one backend (us-east-1, no model delay) and a
gateway with ``--workers 2`` (SO_REUSEPORT, supervisor; ``gateway.drain`` grace 1 s, timeout
10 s) on loopback, then runs wrk (``bench/wrk/post_chat.lua``: non-streaming chat POSTs, which
no client may retry) for ``--duration`` seconds over keep-alive connections. From 2 s in it
asks the supervisor for rolling restarts (``POST /workers/restart`` on the admin listener, the
same as SIGUSR2), one after another with a 2 s pause, until 3 s before the end; at least
``--min-restarts`` must fit.

Measured: wrk's requests, req/s and latency percentiles, its failures (socket errors +
responses >= 400; the target is 0), and per restart the supervisor's own timing of each
slot (new worker started -> ready -> old worker drained and exited) and the wall time of the
whole restart. ``/status`` is checked after each restart: every pid new, every worker ready.

Exit status: 0 target met, 1 a request failed, a restart failed or too few fit, or the run
could not start; 2 bad arguments. ``--record`` appends a section to bench/RESULTS.md; the
JSON goes to bench/out/ either way. Bounded: start-up 60 s, each restart 60 s, wrk its
duration + 30 s; children are stopped on every exit path (``bench/processes.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import re
import secrets
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/rolling_restart.py` puts bench/ on the path
    sys.path.insert(0, str(ROOT))

from bench.processes import BenchError, Service  # noqa: E402
from bench.report import WrkSummary  # noqa: E402
from bench.run import (  # noqa: E402
    ADMIN_READY,
    GATEWAY_READY,
    OUT_DIR,
    RESULTS_MD,
    SCENARIOS,
    _command_line,
    gateway_config,
    machine_info,
    record,
    run_wrk,
)

__all__ = ["main"]

RESTART_TIMEOUT = 60.0  # seconds one rolling restart may take
PAUSE = 2.0  # seconds between restarts, and before the first
TAIL = 3.0  # seconds of load after the last restart began


def _admin(url: str, token: str, method: str = "GET") -> dict[str, Any]:
    req = urllib.request.Request(
        url, method=method, headers={"Authorization": f"Bearer {token}"}, data=b""
    )
    if method == "GET":
        req.data = None
    with urllib.request.urlopen(req, timeout=RESTART_TIMEOUT) as resp:
        return dict(json.loads(resp.read()))


def _restarts(admin: str, token: str, until: float, stop: threading.Event) -> list[dict[str, Any]]:
    """Rolling restarts one after another until ``until`` (monotonic seconds) is near."""
    done: list[dict[str, Any]] = []
    time.sleep(PAUSE)
    while not stop.is_set() and time.monotonic() + TAIL < until:
        before = [w["pid"] for w in _admin(f"{admin}/status", token)["workers"]]
        began = time.monotonic()
        answer = _admin(f"{admin}/workers/restart", token, "POST")
        wall = time.monotonic() - began
        after = _admin(f"{admin}/status", token)["workers"]
        if any(w["pid"] in before or not w["ready"] for w in after):
            raise BenchError(f"restart left old or unready workers: {before} -> {after}")
        done.append({"wall_s": round(wall, 3), "slots": answer["replaced"]})
        print(
            f"restart {len(done)}: {wall:.2f} s; slots "
            + ", ".join(f"{s['slot']}: {s['seconds']:.2f} s" for s in answer["replaced"]),
            file=sys.stderr,
        )
        stop.wait(PAUSE)
    return done


def run(args: argparse.Namespace) -> tuple[dict[str, Any], WrkSummary]:
    """Start the services, load them, restart the workers.

    Returns:
        (the result, JSON-ready; wrk's summary).

    Raises:
        BenchError: a child did not start, wrk failed, or a restart failed.
    """
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    machine = machine_info()
    token = secrets.token_urlsafe(16)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rolling-")))
        backend = Service(
            "backend",
            [sys.executable, "-m", "backend", "--region", "us-east-1", "--zones", "us,global",
             "--port", "0", "--ttft-ms", "0", "--tokens-per-second", "0"],
            log_path=workdir / "backend.log", cpus=None,
        )  # fmt: skip
        stack.callback(backend.stop)
        backend_url = backend.wait_ready(re.compile(r"listening on (http://\S+)")).group(1)
        cfg = gateway_config(backend_url)
        cfg["gateway"]["drain"] = {"grace": f"{args.grace}s", "timeout": "10s"}
        cfg["admin"] = {"listen": "127.0.0.1:0", "token": token}
        config = workdir / "gateway.yaml"
        config.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
        gateway = Service(
            "gateway",
            [sys.executable, "-m", "gateway", "--log-level", "WARNING", "gateway", "-c",
             str(config), "--workers", str(args.workers)],
            log_path=workdir / "gateway.log", cpus=None,
        )  # fmt: skip
        stack.callback(gateway.stop)
        url = f"http://{gateway.wait_ready(GATEWAY_READY).group(1)}"
        admin = f"http://{gateway.wait_ready(ADMIN_READY).group(1)}"

        stop = threading.Event()
        restarts: list[dict[str, Any]] = []
        failure: list[BaseException] = []
        until = time.monotonic() + args.duration

        def restarter() -> None:
            try:
                restarts.extend(_restarts(admin, token, until, stop))
            except (BenchError, OSError, ValueError, KeyError) as exc:
                failure.append(exc)

        thread = threading.Thread(target=restarter, daemon=True)
        thread.start()
        try:
            summary, _ = run_wrk(
                SCENARIOS["chat"], url, duration=args.duration,
                connections=args.connections, threads=1, cpus=None,
            )  # fmt: skip
        finally:
            stop.set()
            thread.join(RESTART_TIMEOUT)
        if failure:
            raise BenchError(f"a rolling restart failed: {failure[0]}\n{gateway.log_tail()}")
        exit_code = gateway.stop()
    result = {
        "started_utc": started,
        "machine": machine,
        "command": _command_line(),
        "settings": {
            "duration_s": args.duration,
            "connections": args.connections,
            "workers": args.workers,
            "grace_s": args.grace,
        },
        "wrk": summary.to_json(),
        "failed": summary.errors,
        "restarts": restarts,
        "gateway_exit_code": exit_code,
    }
    return result, summary


def markdown_section(result: dict[str, Any], summary: WrkSummary) -> str:
    """The RESULTS.md section of one run."""
    m, s = result["machine"], result["settings"]
    rows = [
        "| restart | wall s | " + " | ".join(f"slot {i} s" for i in range(s["workers"])) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in range(s["workers"])) + " |",
    ]
    for i, r in enumerate(result["restarts"], 1):
        slots = " | ".join(f"{slot['seconds']:.2f}" for slot in r["slots"])
        rows.append(f"| {i} | {r['wall_s']:.2f} | {slots} |")
    return "\n".join(
        [
            f"## Rolling restart, {result['started_utc'][:16].replace('T', ' ')} UTC, "
            f"commit {m['git_commit']}",
            "",
            f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['kernel']}; Python "
            f"{m['python']}, aiohttp {m['aiohttp']}, uvloop {m['uvloop']}, {m['wrk']}; not pinned",
            f"- Command: `{result['command']}`",
            f"- Load: wrk, 1 thread, {s['connections']} keep-alive connections, {s['duration_s']} s"
            f" of non-streaming chat POSTs through `--workers {s['workers']}` (drain grace"
            f" {s['grace_s']} s); rolling restarts {PAUSE:.0f} s apart, from {PAUSE:.0f} s in",
            f"- Requests: {summary.requests} ({summary.rps:.0f}/s), p50 {summary.p50 * 1e3:.2f} ms,"
            f" p99 {summary.p99 * 1e3:.2f} ms, max {summary.max * 1e3:.0f} ms",
            f"- **Failed requests: {result['failed']}** (socket errors {summary.errors_connect}"
            f" connect, {summary.errors_read} read, {summary.errors_write} write,"
            f" {summary.errors_timeout} timeout; {summary.errors_status} responses >= 400);"
            f" supervisor exit code after SIGTERM: {result['gateway_exit_code']}",
            f"- {len(result['restarts'])} rolling restarts; per slot: new worker started ->"
            " ready -> old worker drained (grace, then in-flight requests) and exited:",
            "",
            *rows,
            "",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``bench/rolling_restart.py``."""
    p = argparse.ArgumentParser(prog="bench/rolling_restart.py", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=int, default=20, help="seconds of load (default 20)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    p.add_argument("--workers", type=int, default=2, help="gateway workers (default 2)")
    p.add_argument("--grace", type=float, default=1.0, help="gateway.drain.grace seconds")
    p.add_argument("--min-restarts", type=int, default=2, help="restarts that must fit")
    p.add_argument("--record", action="store_true", help="append a section to bench/RESULTS.md")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run; print the figures; save JSON; optionally record. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.duration < 2 * PAUSE + TAIL or args.workers < 2:
        parser.error(f"--duration must be >= {2 * PAUSE + TAIL:.0f} and --workers >= 2")
    try:
        result, summary = run(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: every process stopped", file=sys.stderr)
        return 130
    section = markdown_section(result, summary)
    print(section)
    out = OUT_DIR / f"rolling-{result['started_utc'].replace(':', '')[:17]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"results: {out}", file=sys.stderr)
    if args.record:
        record(section)
        print(f"recorded in {RESULTS_MD}", file=sys.stderr)
    if (
        result["failed"]
        or result["gateway_exit_code"]
        or len(result["restarts"]) < args.min_restarts
    ):
        print("TARGET MISSED: failed requests or too few restarts", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
