"""Command line and runner of one regional backend process.

``python -m backend --region eu-west-1 --zones eu,global --port 9201`` serves the region on
uvloop, prints ``backend eu-west-1 listening on http://127.0.0.1:9201`` to stdout once it
accepts connections (``--port 0`` picks a free port and prints it), and on SIGTERM or SIGINT
drains: ``/ready`` turns 503, the listener closes, in-flight requests get up to
``--drain-timeout`` seconds, then the process exits with status 0.

Exit statuses: 0 after a signal, 1 when the address cannot be bound, 2 for bad arguments
or a backend that cannot start (missing region documents, missing optional dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop
from aiohttp import web

from backend.app import begin_drain, build_app
from backend.settings import (
    DATA_ROOT,
    DEFAULT_ZONES,
    MIB,
    PROVIDERS,
    SECONDS,
    BackendSettings,
    StartupError,
)

__all__ = ["build_parser", "main", "serve", "settings_from_args"]

log = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT = 5 * SECONDS


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``python -m backend`` (and ``geogate backend``)."""
    parser = argparse.ArgumentParser(
        prog="python -m backend",
        description="Serve one region's LangChain chains (LangServe and OpenAI wire formats).",
    )
    parser.add_argument("--region", required=True, help="region name, e.g. eu-west-1")
    parser.add_argument(
        "--zones",
        help="comma-separated residency zones this region serves, e.g. eu,global "
        "(default: the demo map, else 'global')",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="listen port, 0 for any free one")
    parser.add_argument(
        "--ttft-ms", type=float, default=0.0, help="offline model time to first token (ms)"
    )
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=0.0,
        help="offline model streaming rate; 0 = no delay (default)",
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=1 * MIB, help="largest request body (bytes)"
    )
    parser.add_argument("--provider", choices=PROVIDERS, default="offline")
    parser.add_argument("--openai-base-url", help="OpenAI-compatible API base URL")
    parser.add_argument("--openai-model", help="model name for --provider openai")
    parser.add_argument(
        "--data-dir",
        default=str(DATA_ROOT),
        help="folder holding <region>/*.md documents (default: the packaged ones)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT,
        help="seconds in-flight requests may take after SIGTERM (default %(default)s)",
    )
    parser.add_argument(
        "--health-ttl",
        type=float,
        default=1.0,
        help="seconds one deep /health probe result is reused; 0 = probe every request",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> BackendSettings:
    """Turn parsed arguments into BackendSettings.

    Raises:
        ValueError: a value is out of range (BackendSettings says which).
    """
    if args.zones:
        zones = tuple(z.strip().lower() for z in args.zones.split(",") if z.strip())
    else:
        zones = DEFAULT_ZONES.get(args.region, ("global",))
    return BackendSettings(
        region=args.region,
        zones=zones,
        ttft_ms=args.ttft_ms,
        tokens_per_second=args.tokens_per_second,
        max_body_bytes=args.max_body_bytes,
        provider=args.provider,
        openai_base_url=args.openai_base_url,
        openai_model=args.openai_model,
        data_dir=Path(args.data_dir),
        health_ttl=args.health_ttl,
    )


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(
    app: web.Application, *, host: str, port: int, drain_timeout: float, region: str
) -> int:
    """Serve ``app`` until SIGTERM or SIGINT, then drain.

    Args:
        app: the backend app.
        host: listen address.
        port: listen port; 0 picks a free one (the ready line shows which).
        drain_timeout: seconds in-flight requests may take once the listener is closed.
        region: region name for the ready line.

    Returns:
        0 after a clean drain.

    Raises:
        StartupError: the app's startup failed (e.g. no region folder).
        OSError: the address cannot be bound.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        handler_cancellation=True,
        shutdown_timeout=drain_timeout,
        access_log=None,
    )
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        print(f"backend {region} listening on {_url(host, bound)}", flush=True)
        await stop.wait()
        log.info("signal received: draining for up to %.1f s", drain_timeout)
        begin_drain(app)
    finally:
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the backend CLI.

    Args:
        argv: arguments without the program name; None reads ``sys.argv[1:]``.

    Returns:
        The exit status (0 clean stop, 1 bind failure, 2 bad arguments or startup error).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = settings_from_args(args)
        if not settings.region_dir.is_dir():
            raise StartupError(
                f"no documents for region {settings.region!r}: {settings.region_dir} is not "
                f"a directory (expected {settings.region_dir}/*.md)"
            )
        app = build_app(settings)
    except (StartupError, ValueError) as exc:
        print(f"backend: {exc}", file=sys.stderr, flush=True)
        return 2
    server = serve(
        app,
        host=args.host,
        port=args.port,
        drain_timeout=args.drain_timeout,
        region=settings.region,
    )
    try:
        return uvloop.run(server)
    except StartupError as exc:
        print(f"backend: {exc}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:
        print(f"backend: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
