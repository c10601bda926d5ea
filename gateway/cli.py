"""Command line: ``geogate gateway|backend|demo|check-config``.

Exit codes: 0 success, 1 invalid config or a start-up failure (a message names the cause),
2 bad command-line usage (argparse's convention).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway import __version__
from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError

__all__ = ["main", "run_gateway"]

log = logging.getLogger("geogate")

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "gateway.yaml"


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _load_or_report(path: Path) -> GatewayConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(f"config error: {issue}", file=sys.stderr)
        return None


async def _serve_until_signalled(
    config: GatewayConfig, drain_timeout: float | None, worker: _WorkerArgs | None = None
) -> int:
    from gateway.geo import GeoDatabaseError
    from gateway.server import GatewayServer

    server = GatewayServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[object]] = set()  # SIGHUP: reload the config file (and GeoIP DB)

    def reload() -> None:  # the outcome is logged and counted by server.reload()
        task: asyncio.Task[object] = loop.create_task(server.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        if worker is None:
            await server.start()
        else:
            await server.start(sock=socket.socket(fileno=worker.fd), admin_path=worker.admin)
    except GeoDatabaseError as exc:
        print(f"error: GeoIP database {exc}", file=sys.stderr)
        await server.stop(0)
        return 1
    except OSError as exc:
        print(f"error: cannot listen on {config.gateway.listen}: {exc.strerror}", file=sys.stderr)
        await server.stop(0)
        return 1
    if worker is None:  # a worker's supervisor prints these once every worker is ready
        if server.admin_bound:
            admin = ", ".join(f"{h}:{p}" for h, p in server.admin_bound)
            print(f"admin listening on {admin}", flush=True)
        bound = ", ".join(f"{h}:{p}" for h, p in server.bound)
        print(f"gateway {config.gateway.region} listening on {bound}", flush=True)
    _freeze_startup_heap()
    await stop.wait()
    drain = config.gateway.drain
    timeout = drain.timeout if drain_timeout is None else drain_timeout
    log.info("stopping: grace %.1f s, then draining for up to %.1f s", drain.grace, timeout)
    await server.stop(timeout, grace=drain.grace)
    return 0


def _freeze_startup_heap() -> None:
    """Move every object alive after start-up out of the cyclic GC's reach (``gc.freeze``).

    Imports, config, GeoIP reader and route tables are a few hundred thousand long-lived
    objects, and every full (generation 2) collection walked them all: about 20 ms on the
    loop, several times a second under load, which set the p99 latency at c64 (bench/
    RESULTS.md). Frozen, a full collection walks only what came later. The technique and its
    rationale: CPython's ``gc.freeze`` documentation and Instagram's "Dismissing Python
    Garbage Collection at Instagram" (2017). Frozen objects are still freed by reference
    counting; only cycles among them would never be collected.
    """
    gc.collect()
    gc.freeze()


@dataclass(frozen=True, slots=True)
class _WorkerArgs:
    """What the supervisor tells a worker: its slot, socket fd and admin Unix socket path."""

    slot: int
    fd: int
    admin: str


def run_gateway(
    config: GatewayConfig,
    *,
    drain_timeout: float | None = None,
    workers: int = 1,
    log_level: str = "INFO",
) -> int:
    """Serve ``config`` on uvloop until SIGINT or SIGTERM, then drain and return 0.

    Args:
        config: the loaded config.
        drain_timeout: seconds in-flight requests get after the listener closed; None:
            ``gateway.drain.timeout``. The grace before it is ``gateway.drain.grace``.
        workers: 1 serves in this process; N >= 2 runs a ``Supervisor`` with N worker
            processes sharing the listen address through SO_REUSEPORT (``config.source``
            must be set: each worker loads that file).
        log_level: the workers' ``--log-level``.

    Returns:
        0 after a clean stop, 1 when start-up failed (message on stderr).
    """
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        if workers <= 1:
            return runner.run(_serve_until_signalled(config, drain_timeout))
        from gateway.supervisor import Supervisor

        extra = [] if drain_timeout is None else ["--drain-timeout", str(drain_timeout)]
        sup = Supervisor(config, workers=workers, worker_argv=extra, log_level=log_level)
        return runner.run(sup.run())


def _run_worker(config: GatewayConfig, args: argparse.Namespace) -> int:
    from gateway.supervisor import set_parent_death_signal

    set_parent_death_signal()
    worker = _WorkerArgs(args.worker_slot, args.worker_fd, args.worker_admin)
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(_serve_until_signalled(config, args.drain_timeout, worker))


def _cmd_gateway(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return 1
    if args.worker_fd is not None:
        return _run_worker(config, args)
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    return run_gateway(
        config, drain_timeout=args.drain_timeout, workers=args.workers, log_level=args.log_level
    )


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return 1
    from gateway.geo import GeoDatabase, GeoDatabaseError

    try:
        db = GeoDatabase.open_sync(config.gateway.geodb)
    except GeoDatabaseError as exc:
        print(f"config error: {args.config}:gateway.geodb: {exc}", file=sys.stderr)
        return 1
    db.close()
    print(
        f"ok: {args.config}: {len(config.regions)} regions, {len(config.routes)} routes, "
        f"zones {sorted(config.residency.zones)}, GeoIP {db.database_type}"
    )
    return 0


def _cmd_hash_key(args: argparse.Namespace) -> int:
    from gateway.tenants import hash_key, new_key

    key = args.key
    if key is None:
        key = new_key()
        print(f"key:  {key}")
    print(f"hash: {hash_key(key)}" if args.key is None else hash_key(key))
    return 0


def _cmd_backend(argv: Sequence[str]) -> int:
    from backend.server import main as backend_main

    return backend_main(list(argv))


def _cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    config = _load_or_report(args.config)
    if config is None:
        return 1
    return run_demo(config, ttft_ms=args.ttft_ms, tokens_per_second=args.tokens_per_second)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geogate", description="Residency-aware edge gateway for LLM applications."
    )
    parser.add_argument("--version", action="version", version=f"geogate {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    gw = sub.add_parser("gateway", help="run the gateway")
    gw.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG, help="YAML config")
    gw.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="seconds to finish in-flight requests (default: gateway.drain.timeout)",
    )
    gw.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the port (SO_REUSEPORT); SIGUSR2 restarts them in turn",
    )
    # set by the supervisor for its workers, not by people
    gw.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)
    gw.add_argument("--worker-slot", type=int, default=0, help=argparse.SUPPRESS)
    gw.add_argument("--worker-admin", default=None, help=argparse.SUPPRESS)
    gw.set_defaults(func=_cmd_gateway)

    check = sub.add_parser("check-config", help="validate a config; print every error")
    check.add_argument("config", type=Path)
    check.set_defaults(func=_cmd_check_config)

    sub.add_parser("backend", help="run one regional LangChain backend (see backend --help)")

    hk = sub.add_parser("hash-key", help="print the stored form of an API key (or a new key)")
    hk.add_argument("key", nargs="?", help="the key; omitted: make a new random one")
    hk.set_defaults(func=_cmd_hash_key)

    demo = sub.add_parser("demo", help="backends for every region + the gateway, on loopback")
    demo.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG)
    demo.add_argument("--ttft-ms", type=float, default=150.0, help="model time to first token")
    demo.add_argument("--tokens-per-second", type=float, default=40.0, help="model speed")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``geogate`` command.

    Args:
        argv: arguments without the program name; default ``sys.argv[1:]``.

    Returns:
        The process exit code.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # `backend` has its own argument parser: hand it everything after the word
    if "backend" in argv and all(a.startswith("-") for a in argv[: argv.index("backend")]):
        return _cmd_backend(argv[argv.index("backend") + 1 :])
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.func(args))
