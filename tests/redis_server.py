"""A real ``redis-server`` on a free loopback port, for tests that need Redis trouble on cue.

Each ``RedisServer`` is its own subprocess (``--save '' --appendonly no``: nothing touches
disk), never a system service. ``kill()`` (SIGKILL), ``pause()`` / ``resume()`` (SIGSTOP /
SIGCONT: a Redis that hangs with its socket open) and ``restart()`` (same port) simulate
trouble. Started from the main thread on Linux, the process also gets ``PR_SET_PDEATHSIG``,
so it dies with pytest even when pytest is killed before any finaliser runs.

Usage (the lead imports the fixture into a conftest)::

    from tests.redis_server import redis_server

    @pytest.mark.redis
    async def test_x(redis_server: RedisServer) -> None:
        client = redis.asyncio.Redis(port=redis_server.port)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import IO

import pytest

__all__ = ["RedisServer", "redis_server"]

_PR_SET_PDEATHSIG = 1
# Looked up now, in the parent: the child between fork and exec must not dlopen (a lock
# another thread held at fork time would never be released there).
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    assert _prctl is not None
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` subprocess bound to 127.0.0.1.

    Args:
        executable: path or name of ``redis-server``.
        port: the port, or None for a free one (picked again if taken at first start).
    """

    def __init__(self, executable: str = "redis-server", *, port: int | None = None) -> None:
        found = shutil.which(executable)
        if found is None:
            raise FileNotFoundError(f"{executable} not found")
        self.executable = found
        self.port = port or _free_port()
        self._fixed_port = port is not None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The running process's id, or None."""
        return self._proc.pid if self._proc is not None else None

    def start(self, *, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING.

        Raises:
            RuntimeError: already running, or it did not answer within ``timeout`` seconds.
        """
        if self._proc is not None:
            raise RuntimeError(f"{self!r} is already running")
        for attempt in range(3):
            self._spawn()
            try:
                self._wait_ready(timeout)
                return
            except RuntimeError:
                self.kill()
                if self._fixed_port or attempt == 2:
                    raise
                self.port = _free_port()  # lost the race for the port to another process

    def kill(self) -> None:
        """SIGKILL the server (also a stopped one) and reap it; a no-op if not running."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the socket stays open, nothing answers (a hung Redis)."""
        assert self._proc is not None, "not running"
        os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause()``."""
        assert self._proc is not None, "not running"
        os.kill(self._proc.pid, signal.SIGCONT)

    def restart(self, *, timeout: float = 10.0) -> None:
        """Kill (if running) and start again on the same port, with an empty dataset."""
        self.kill()
        fixed, self._fixed_port = self._fixed_port, True
        try:
            self.start(timeout=timeout)
        finally:
            self._fixed_port = fixed

    def close(self) -> None:
        """Kill the server and drop its log."""
        self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None

    def ping(self) -> bool:
        """Does the server answer ``PING`` with ``+PONG`` within 0.5 s?"""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _spawn(self) -> None:
        if self._log is None:
            self._log = tempfile.TemporaryFile()  # noqa: SIM115  (closed by close())
        args = [self.executable, "--save", "", "--appendonly", "no", "--port", str(self.port)]
        args += ["--bind", "127.0.0.1", "--daemonize", "no", "--loglevel", "warning"]
        in_main_thread = threading.current_thread() is threading.main_thread()
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=tempfile.gettempdir(),
            # PDEATHSIG fires when the forking *thread* exits: only ask for it from the main
            # thread, so a server restarted via asyncio.to_thread() outlives the worker.
            preexec_fn=_die_with_parent if _prctl is not None and in_main_thread else None,
        )

    def _wait_ready(self, timeout: float) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({proc.returncode}):\n{self._output()}")
            if self.ping():
                return
            time.sleep(0.005)
        raise RuntimeError(f"redis-server did not answer PING in {timeout} s:\n{self._output()}")

    def _output(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()[-4000:].decode(errors="replace")

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid={self._proc.pid}" if self._proc is not None else "stopped"
        return f"<RedisServer 127.0.0.1:{self.port} {state}>"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh ``redis-server`` per test, killed afterwards even if the test fails.

    Skips the test when ``redis-server`` is not installed. Mark such tests
    ``@pytest.mark.redis``.
    """
    try:
        server = RedisServer()
    except FileNotFoundError:
        pytest.skip("redis-server is not installed")
    with server:
        yield server
