"""``geogate demo``: every region's backends plus the gateway, on loopback, in one command.

Reads the gateway config, starts one backend process per endpoint (``python -m backend``,
each told its region and the zones that region serves), waits until each says it listens,
starts the gateway in this process, prints ready-to-paste curl lines, and on Ctrl-C or
SIGTERM stops the gateway (draining) and then the backends.

The admin listener (``127.0.0.1:9901`` unless the config says otherwise) gets a fresh random
token each run, printed as ``GEOGATE_ADMIN_TOKEN=<token>`` next to the demo tenant's key.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import secrets
import signal
import sys

from yarl import URL

from gateway.config import GatewayConfig, Listen

__all__ = [
    "DEMO_ADMIN_LISTEN",
    "BackendProcess",
    "run_demo",
    "start_backends",
    "stop_backends",
    "with_admin_token",
    "with_demo_tenant",
]

DEMO_ADMIN_LISTEN = Listen(host="127.0.0.1", port=9901)  # when the config names no admin.listen

READY_TIMEOUT = 60.0  # seconds a backend may take to start
STOP_TIMEOUT = 10.0  # seconds a backend may take to exit after SIGTERM
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class BackendProcess:
    """A running ``python -m backend`` child process."""

    def __init__(self, region: str, url: URL, proc: asyncio.subprocess.Process) -> None:
        self.region = region
        self.url = url
        self.proc = proc
        self.pump: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<BackendProcess {self.region} {self.url} pid={self.proc.pid}>"


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM it when the parent dies (prctl(2))."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the demo's own stop path still applies
        pass


async def _pump(prefix: str, stream: asyncio.StreamReader) -> None:
    while line := await stream.readline():
        sys.stderr.write(f"[{prefix}] {line.decode(errors='replace')}")


async def start_backends(
    config: GatewayConfig, *, ttft_ms: float, tokens_per_second: float
) -> list[BackendProcess]:
    """Start a backend for every loopback endpoint in ``config`` and wait until each listens.

    Raises:
        RuntimeError: a backend exited or did not report ready within READY_TIMEOUT seconds;
            the ones already started are stopped first.
    """
    started: list[BackendProcess] = []
    try:
        for region, rc in config.regions.items():
            for endpoint in rc.endpoints:
                url = URL(endpoint)
                if url.host not in ("127.0.0.1", "localhost", "::1"):
                    continue  # not ours to start
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "backend",
                    "--region", region, "--zones", ",".join(rc.zones),
                    "--host", url.host, "--port", str(url.port),
                    "--ttft-ms", str(ttft_ms), "--tokens-per-second", str(tokens_per_second),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                    # own session: Ctrl-C reaches only us, so the gateway drains before the
                    # backends stop; the parent-death signal stops them if we are killed
                    start_new_session=True, preexec_fn=_die_with_parent,
                )  # fmt: skip
                backend = BackendProcess(region, url, proc)
                started.append(backend)
        for backend in started:
            assert backend.proc.stdout is not None
            prefix = f"{backend.region} :{backend.url.port}"
            async with asyncio.timeout(READY_TIMEOUT):
                while True:
                    line = await backend.proc.stdout.readline()
                    if not line:
                        raise RuntimeError(f"backend {prefix} exited before it was ready")
                    sys.stderr.write(f"[{prefix}] {line.decode(errors='replace')}")
                    if b"listening on" in line:
                        break
            backend.pump = asyncio.create_task(_pump(prefix, backend.proc.stdout))
    except (RuntimeError, TimeoutError) as exc:
        await stop_backends(started)
        raise RuntimeError(f"backends did not start: {exc or 'timed out'}") from exc
    return started


async def stop_backends(backends: list[BackendProcess]) -> None:
    """SIGTERM every backend, wait up to STOP_TIMEOUT seconds, then SIGKILL the rest."""
    for backend in backends:
        if backend.proc.returncode is None:
            backend.proc.send_signal(signal.SIGTERM)
    for backend in backends:
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await backend.proc.wait()
        except TimeoutError:
            backend.proc.kill()
            await backend.proc.wait()
        if backend.pump is not None:
            backend.pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await backend.pump


def _curl_lines(base: str, admin: str | None) -> str:
    json_h = "-H 'Content-Type: application/json' -H \"Authorization: Bearer $GEOGATE_DEMO_KEY\""
    admin_h = '-H "Authorization: Bearer $GEOGATE_ADMIN_TOKEN"'
    rag = """-d '{"input": {"question": "Where is my data stored?"}}'"""
    chat = (
        """-d '{"model": "geogate-chat", "stream": true, """
        """"messages": [{"role": "user", "content": "Tell me about residency"}]}'"""
    )
    return "\n".join(
        [
            "Try it (X-Forwarded-For picks the client's country; loopback is a trusted proxy):",
            "  # a user in Great Britain: answered by an eu-* region (see X-Served-Region)",
            f"  curl -si {base}/rag/invoke {json_h} -H 'X-Forwarded-For: 2.125.160.216' {rag}",
            "  # a user in the United States: answered by us-east-1",
            f"  curl -si {base}/rag/invoke {json_h} -H 'X-Forwarded-For: 8.8.8.8' {rag}",
            "  # a user in Japan (zone global): the gateway's own region first",
            f"  curl -si {base}/health {json_h} -H 'X-Forwarded-For: 133.242.0.3'",
            "  # a streamed chat completion, token by token",
            f"  curl -sN {base}/v1/chat/completions {json_h} {chat}",
            "  # without a key: 401; past 10 requests/s (burst 20): 429 with RateLimit fields",
            f"  curl -si {base}/health",
            "  # the OpenAI client: OpenAI(base_url='" + base + "/v1', "
            "api_key=os.environ['GEOGATE_DEMO_KEY'])",
        ]
        + (
            [
                "  # the admin API (own listener; every route but /metrics and the page needs",
                "  # the admin token): every region and endpoint, the last minute's traffic;",
                "  # drain a region and undrain it; the effective config, secrets redacted",
                f"  curl -s {admin}/status {admin_h}",
                f"  curl -s -X POST {admin}/regions/eu-west-1/drain {admin_h}",
                f"  curl -s -X POST {admin}/regions/eu-west-1/undrain {admin_h}",
                f"  curl -s {admin}/config {admin_h}",
                f"  curl -s {admin}/metrics",
            ]
            if admin
            else []
        )
    )


def with_demo_tenant(config: GatewayConfig, key: str) -> GatewayConfig:
    """``config`` plus a tenant ``demo`` holding ``key`` (stored hashed), limited by the
    first route's default policy."""
    from gateway.config import TenantConfig
    from gateway.tenants import hash_key

    demo = TenantConfig(id="demo", keys=(hash_key(key),))
    others = tuple(t for t in config.tenants if t.id != "demo")
    return config.model_copy(update={"tenants": (*others, demo)})


def with_admin_token(config: GatewayConfig, token: str) -> GatewayConfig:
    """``config`` with ``token`` as the admin token, listening on ``admin.listen`` or, when
    the config has no admin listener, on ``DEMO_ADMIN_LISTEN`` (127.0.0.1:9901)."""
    admin = config.admin.model_copy(
        update={"listen": config.admin.listen or DEMO_ADMIN_LISTEN, "token": token}
    )
    return config.model_copy(update={"admin": admin})


async def _demo(config: GatewayConfig, ttft_ms: float, tokens_per_second: float) -> int:
    from gateway.server import GatewayServer
    from gateway.tenants import new_key

    key = new_key()
    admin_token = secrets.token_urlsafe(24)
    config = with_admin_token(with_demo_tenant(config, key), admin_token)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        backends = await start_backends(
            config, ttft_ms=ttft_ms, tokens_per_second=tokens_per_second
        )
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    server = GatewayServer(config)
    try:
        await server.start()
    except Exception as exc:
        print(f"error: the gateway did not start: {exc}", file=sys.stderr)
        await server.stop(0)
        await stop_backends(backends)
        return 1
    host, port = server.bound[0]
    base = f"http://{host}:{port}"
    print(f"\nGeoGate demo ready: gateway {base} (region {config.gateway.region}), "
          f"{len(backends)} backends in {len(config.regions)} regions.")  # fmt: skip
    admin = None
    if server.admin_bound:
        admin_host, admin_port = server.admin_bound[0]
        admin = f"http://{admin_host}:{admin_port}"
    print("The demo tenant's API key and the admin token (paste both lines into your shell):\n")
    print(f"GEOGATE_DEMO_KEY={key}")
    print(f"GEOGATE_ADMIN_TOKEN={admin_token}\n", flush=True)
    print(_curl_lines(base, admin))
    if admin:
        # the token rides in the fragment, which the browser never sends to any server; the
        # page moves it to sessionStorage and removes it from the address bar
        print(f"\nStatus page (opens with the token once): {admin}/#token={admin_token}")
    print("Press Ctrl-C to stop.", flush=True)
    await stop.wait()
    print("stopping: draining the gateway, then the backends", file=sys.stderr)
    await server.stop(5.0)
    await stop_backends(backends)
    return 0


def run_demo(config: GatewayConfig, *, ttft_ms: float, tokens_per_second: float) -> int:
    """Run the demo until Ctrl-C; returns the exit code (0 after a clean stop)."""
    from gateway.cli import _new_loop

    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(_demo(config, ttft_ms, tokens_per_second))
