"""Child processes of the benchmark: start, wait until ready, measure CPU, stop.

Every child is pinned to its CPUs (when asked) and gets SIGTERM from the kernel should the
harness die without cleaning up (``PR_SET_PDEATHSIG``); ``Service.stop`` sends SIGTERM and,
after STOP_TIMEOUT seconds, SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["READY_TIMEOUT", "STOP_TIMEOUT", "BenchError", "Service", "child_setup", "cpu_seconds"]

ROOT = Path(__file__).resolve().parent.parent  # children run from the project root

READY_TIMEOUT = 60.0  # seconds a backend or the gateway may take to start
STOP_TIMEOUT = 15.0  # seconds a child may take to exit after SIGTERM, then SIGKILL
CLK_TCK = os.sysconf("SC_CLK_TCK")  # clock ticks per second in /proc/<pid>/stat


class BenchError(Exception):
    """The benchmark cannot go on: a child did not start, wrk failed, a check failed."""


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not glibc/musl
    _LIBC = None


def child_setup(cpus: frozenset[int] | None) -> Callable[[], None]:
    """Return a preexec_fn: pin the child to ``cpus`` and have it SIGTERMed if we die.

    Runs in the forked child before exec; this harness starts no threads, so preexec_fn is
    safe here. Affinity set before exec covers every thread the child will start.
    """

    def setup() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return setup


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used, all its threads included.

    Raises:
        BenchError: the process is gone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError as exc:
        raise BenchError(f"process {pid} exited during the benchmark") from exc
    # fields after "(comm)": state is field 3, utime 14 and stime 15 (proc(5))
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Service:
    """A backend or gateway child process; stdout and stderr go to ``log_path``."""

    def __init__(
        self, name: str, argv: Sequence[str], *, log_path: Path, cpus: frozenset[int] | None
    ) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                preexec_fn=child_setup(cpus),
            )

    def __repr__(self) -> str:
        return f"<Service {self.name} pid={self.proc.pid} returncode={self.proc.returncode}>"

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(f"  [{self.name}] {ln}" for ln in text[-lines:])

    def wait_ready(self, pattern: re.Pattern[str], timeout: float = READY_TIMEOUT) -> re.Match[str]:
        """Poll the log until ``pattern`` matches a line; return the match.

        Raises:
            BenchError: the process exited, or ``timeout`` seconds passed.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := pattern.search(self.log_path.read_text(errors="replace")):
                return match
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.proc.returncode} before it was ready:\n"
                    + self.log_tail()
                )
            time.sleep(0.05)
        raise BenchError(f"{self.name} not ready within {timeout:.0f} s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> int:
        """SIGTERM, wait up to STOP_TIMEOUT seconds, then SIGKILL; return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(
                    f"{self.name} ignored SIGTERM for {STOP_TIMEOUT:.0f} s: killed", file=sys.stderr
                )
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
