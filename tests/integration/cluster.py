"""Real processes on loopback: regional backends (``python -m backend``) and gateways
(``python -m gateway gateway -c FILE``), started once per module and stopped with SIGTERM."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_DB = ROOT / "geodb" / "dbip-country.mmdb"
TEST_DB_DIR = ROOT / "tests" / "data" / "geodb"

# region -> (zones, number of endpoints): the demo's topology
TOPOLOGY: dict[str, tuple[list[str], int]] = {
    "us-east-1": (["us", "global"], 2),
    "eu-west-1": (["eu", "global"], 2),
    "eu-central-1": (["eu", "global"], 1),
    "ap-southeast-1": (["global"], 1),
}
EU_REGIONS = {"eu-west-1", "eu-central-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_readers: dict[int, queue.Queue[bytes]] = {}


def _reader_for(proc: subprocess.Popen[bytes]) -> queue.Queue[bytes]:
    """A queue fed with the process's stdout lines by a daemon thread (b"" at EOF).

    A thread rather than select() on the pipe: select sees only the file descriptor, not the
    lines already pulled into Python's buffer by an earlier readline.
    """
    lines = _readers.get(proc.pid)
    if lines is None:
        lines = _readers[proc.pid] = queue.Queue()
        stdout = proc.stdout
        assert stdout is not None

        def pump() -> None:
            for line in iter(stdout.readline, b""):
                lines.put(line)
            lines.put(b"")
            stdout.close()  # the only reader closes it, at EOF

        threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_for_line(proc: subprocess.Popen[bytes], needle: bytes, timeout: float = 60) -> bytes:
    """Read the process's stdout until a line containing ``needle``; fail on exit/timeout."""
    lines = _reader_for(proc)
    deadline = time.monotonic() + timeout
    seen = b""
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if not line:
            raise RuntimeError(f"process exited ({proc.wait()}) before ready:\n{seen.decode()}")
        seen += line
        if needle in line:
            return line
    raise RuntimeError(f"not ready within {timeout} s:\n{seen.decode()}")


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None and proc.pid not in _readers:
        proc.stdout.close()
    return proc.returncode


@dataclass
class Cluster:
    """Running backends and the config they imply."""

    tmp: Path
    endpoints: dict[str, list[str]] = field(default_factory=dict)
    backends: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    gateways: list[subprocess.Popen[bytes]] = field(default_factory=list)
    backend_args: dict[str, list[str]] = field(default_factory=dict)
    admin_urls: dict[str, str] = field(default_factory=dict)  # gateway URL -> admin URL

    def add_backend(self, region: str, *model: str) -> str:
        """Start one more backend of ``region`` (zones from TOPOLOGY) without waiting for it.

        ``model`` are extra backend arguments such as ``--tokens-per-second 8``. Returns its URL.
        """
        url = f"http://127.0.0.1:{free_port()}"
        self.backend_args[url] = [
            sys.executable, "-m", "backend", "--region", region, "--zones",
            ",".join(TOPOLOGY[region][0]), "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
            "--health-ttl", "0", *model,
        ]  # fmt: skip
        self.endpoints.setdefault(region, []).append(url)
        self.backends[url] = subprocess.Popen(
            self.backend_args[url], cwd=ROOT, stdout=subprocess.PIPE
        )
        return url

    def start_backend(self, url: str) -> None:
        """(Re)start the backend process of ``url`` and wait until it listens."""
        old = self.backends.get(url)
        if old is not None:
            stop(old)
        proc = subprocess.Popen(self.backend_args[url], cwd=ROOT, stdout=subprocess.PIPE)
        self.backends[url] = proc
        wait_for_line(proc, b"listening on")

    def kill_backend(self, url: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the backend of ``url`` (SIGKILL: wait until it is gone)."""
        proc = self.backends[url]
        proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(timeout=15)

    def gateway_config(
        self,
        *,
        geodb: Path,
        trusted: list[str],
        name: str,
        upstream: dict[str, Any] | None = None,
        route: dict[str, Any] | None = None,
        admin_token: str | None = None,
    ) -> Path:
        raw: dict[str, Any] = {
            "gateway": {"region": "us-east-1", "listen": "127.0.0.1:0",
                        "trusted_proxies": trusted, "geodb": str(geodb),
                        "limits": {"max_body_bytes": "1MiB"},
                        # SIGTERM at teardown: no load balancer to tell, so a short grace
                        "drain": {"grace": "100ms", "timeout": "10s"}},
            "residency": {"policy": str(ROOT / "config" / "residency.yaml")},
            "regions": {r: {"zones": TOPOLOGY[r][0], "endpoints": eps}
                        for r, eps in self.endpoints.items()},
            "routes": [route or {"prefix": "/", "timeouts": {"first_byte": "30s", "idle": "30s"}}],
            "upstream": upstream or {},
        }  # fmt: skip
        if admin_token is not None:
            raw["admin"] = {"listen": "127.0.0.1:0", "token": admin_token}
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    def start_gateway(self, config: Path, args: Sequence[str] = ()) -> str:
        """Start a gateway process; returns its base URL (the admin URL: ``admin_url``).

        ``args`` go after ``gateway -c FILE`` (e.g. ``["--workers", "2"]``).
        """
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--log-level", "WARNING", "gateway", "-c",
             str(config), *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=None, env={**os.environ},
        )  # fmt: skip
        self.gateways.append(proc)
        line = wait_for_line(proc, b"listening on")
        if line.startswith(b"admin"):
            admin = "http://" + line.decode().strip().rsplit(" ", 1)[-1]
            line = wait_for_line(proc, b"listening on")
            self.admin_urls["http://" + line.decode().strip().rsplit(" ", 1)[-1]] = admin
        return "http://" + line.decode().strip().rsplit(" ", 1)[-1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp=tmp_path_factory.mktemp("cluster"))
    try:
        for region, (_, count) in TOPOLOGY.items():
            for _ in range(count):
                c.add_backend(region, "--ttft-ms", "20", "--tokens-per-second", "100")
        for proc in c.backends.values():
            wait_for_line(proc, b"listening on")
        yield c
    finally:
        for proc in [*c.gateways, *c.backends.values()]:
            stop(proc)
