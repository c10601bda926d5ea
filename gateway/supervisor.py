"""``geogate gateway --workers N``: N worker processes behind SO_REUSEPORT, one supervisor.

The supervisor binds one listening socket per worker *slot* (``listener.bind_reuseport``) and
keeps every one open for its whole life. Each worker is ``python -m gateway gateway`` started
with its slot's socket (``pass_fds``) and serves it with aiohttp (``web.SockSite``); its admin
app listens on a Unix socket in a private runtime directory, and the supervisor's own admin
listener fans out to them (``gateway.fanout``).

Slot states (per slot, one *current* worker, at most one *retiring* one)::

    STARTING --/ready 200--> READY --exits unexpectedly--> (backoff) --> STARTING
    READY --rolling restart: successor READY on the same socket--> RETIRING (SIGTERM, drains)

Rolling restart (SIGUSR2, or ``POST /workers/restart``), one slot at a time: start the new
worker on the slot's socket, wait until its ``/ready`` answers 200, then SIGTERM the old one,
which drains (``GatewayServer.stop``) and exits; the next slot follows once it is gone. The
slot's socket never closes, so no connection waiting in its accept queue is reset (the
reset Linux does when the last descriptor of a listening socket closes, unless
``net.ipv4.tcp_migrate_req`` is set). A new worker reads the config file afresh, so a rolling
restart also applies a changed config or new code.

Signals: SIGTERM/SIGINT drain every worker (readiness fails, ``gateway.drain.grace``, then the
slot sockets close and workers finish in-flight requests up to ``gateway.drain.timeout``);
SIGHUP is forwarded to the workers (reload); SIGUSR2 starts a rolling restart.
A worker that exits unexpectedly is restarted after 0.5 s, doubling per quick failure up to
30 s. Workers get SIGTERM from the kernel should the supervisor die (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from gateway.fanout import build_supervisor_admin_app
from gateway.listener import bind_reuseport

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

__all__ = ["Supervisor", "Worker", "set_parent_death_signal"]

log = logging.getLogger("geogate.supervisor")

READY_TIMEOUT = 60.0  # seconds a new worker may take to answer /ready 200
READY_POLL = 0.05  # seconds between /ready polls of a starting worker
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0  # seconds before restarting a crashed worker
STABLE_AFTER = 10.0  # a worker that lived this long resets the backoff


class WorkerStartError(Exception):
    """A worker exited, or did not answer ``/ready``, within READY_TIMEOUT seconds."""


@dataclass(eq=False)
class Worker:
    """One worker process of a slot.

    Attributes:
        slot: the slot index, 0..N-1 (the ``worker`` label of merged gauges).
        proc: the running process.
        admin: a ClientSession bound to the worker's admin Unix socket.
        started: loop time (seconds) it was started.
        ready: its ``/ready`` answered 200 and it has not exited.
        retiring: it was sent SIGTERM by a rolling restart or a stop.
    """

    slot: int
    proc: asyncio.subprocess.Process
    admin: aiohttp.ClientSession
    started: float
    ready: bool = False
    retiring: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self.proc.pid

    def __repr__(self) -> str:
        state = "RETIRING" if self.retiring else "READY" if self.ready else "STARTING"
        return f"<Worker slot={self.slot} pid={self.pid} {state}>"


class Supervisor:
    """Run and replace the worker processes of one gateway (see the module docstring).

    Usage::

        sup = Supervisor(config, workers=4, argv=["--log-level", "INFO"])
        return await sup.run()          # until SIGTERM / SIGINT

    Args:
        config: the loaded config (``config.source`` is the file each worker loads).
        workers: the number of slots, >= 2 (1 runs the single-process path in ``cli``).
        worker_argv: extra ``geogate gateway`` arguments for every worker (e.g.
            ``["--drain-timeout", "5"]``).
        log_level: passed to the workers as ``--log-level``.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        workers: int,
        worker_argv: list[str] | None = None,
        log_level: str = "INFO",
    ) -> None:
        if config.source is None:
            raise ValueError("the supervisor needs a config loaded from a file")
        self.config = config
        self.count = workers
        self._worker_argv = worker_argv or []
        self._log_level = log_level
        self._sockets: list[socket.socket] = []
        self.current: list[Worker | None] = [None] * workers
        self.restarts = [0] * workers  # unexpected exits per slot
        self._quick_failures = [0] * workers
        self._all: set[Worker] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._restart_lock = asyncio.Lock()
        self._stopping = False
        self._runtime = Path(tempfile.mkdtemp(prefix="geogate-"))  # mode 0700
        self._generation = 0
        self._admin_runner: web.AppRunner | None = None
        self.bound: list[tuple[str, int]] = []
        self.admin_bound: list[tuple[str, int]] = []

    def __repr__(self) -> str:
        return f"<Supervisor workers={self.current} stopping={self._stopping}>"

    # --- views for the admin fan-out -----------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        """True while not stopping and at least one worker is ready (``/ready``)."""
        return not self._stopping and bool(self.ready_workers())

    @property
    def is_restarting(self) -> bool:
        """True while a rolling restart runs (a second one is refused with 409)."""
        return self._restart_lock.locked()

    def ready_workers(self) -> list[Worker]:
        """The current worker of each slot that is ready, in slot order."""
        return [w for w in self.current if w is not None and w.ready]

    def workers_view(self) -> list[dict[str, object]]:
        """``[{slot, pid, ready, restarts}]`` for ``/status``; pid None while a slot is empty."""
        return [
            {
                "slot": slot,
                "pid": w.pid if w is not None else None,
                "ready": bool(w and w.ready),
                "restarts": self.restarts[slot],
            }
            for slot, w in enumerate(self.current)
        ]

    # --- life cycle --------------------------------------------------------------------------

    async def run(self) -> int:
        """Bind, start every worker, serve until SIGTERM/SIGINT, drain; return the exit code.

        Returns:
            0 after a clean stop; 1 when binding or a worker's start failed (message on stderr).
        """
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        loop.add_signal_handler(signal.SIGUSR2, self._on_sigusr2)
        listen = self.config.gateway.listen
        try:
            try:
                self._sockets = bind_reuseport(listen.host, listen.port, self.count)
            except OSError as exc:
                print(f"error: cannot listen on {listen}: {exc.strerror}", file=sys.stderr)
                return 1
            self.bound = [self._sockets[0].getsockname()[:2]]
            try:
                first = [await self._start_worker(slot) for slot in range(self.count)]
                await asyncio.gather(*(self._wait_ready(w) for w in first))
            except WorkerStartError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            await self._start_admin()
            if self.admin_bound:
                admin = ", ".join(f"{h}:{p}" for h, p in self.admin_bound)
                print(f"admin listening on {admin}", flush=True)
            bound = ", ".join(f"{h}:{p}" for h, p in self.bound)
            pids = " ".join(str(w.pid) for w in first)
            print(f"workers {self.count}: pids {pids}", flush=True)
            print(f"gateway {self.config.gateway.region} listening on {bound}", flush=True)
            await stop.wait()
            await self._drain()
            return 0
        finally:
            await self._shutdown()

    async def _start_worker(self, slot: int) -> Worker:
        """Start a worker on ``slot``'s socket; it becomes ``current`` once ready."""
        self._generation += 1
        admin_path = str(self._runtime / f"worker-{slot}-{self._generation}.sock")
        sock = self._sockets[slot]
        argv = [
            sys.executable, "-m", "gateway", "--log-level", self._log_level, "gateway",
            "-c", str(self.config.source), *self._worker_argv,
            "--worker-fd", str(sock.fileno()), "--worker-slot", str(slot),
            "--worker-admin", admin_path,
        ]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *argv, pass_fds=(sock.fileno(),), stdin=asyncio.subprocess.DEVNULL
        )
        admin = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=admin_path),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        worker = Worker(slot, proc, admin, asyncio.get_running_loop().time())
        self._all.add(worker)
        self._spawn_task(self._watch(worker))
        log.info("worker %d started: pid %d", slot, proc.pid)
        return worker

    async def _wait_ready(self, worker: Worker) -> None:
        """Poll the worker's ``/ready`` until 200, then make it its slot's current worker.

        Raises:
            WorkerStartError: it exited, or READY_TIMEOUT seconds passed (it is then killed).
        """
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                while not worker.exited.is_set():
                    with contextlib.suppress(aiohttp.ClientError, OSError):
                        async with worker.admin.get("http://worker/ready") as resp:
                            if resp.status == 200:
                                worker.ready = True
                                break
                    await asyncio.sleep(READY_POLL)
        except TimeoutError:
            worker.proc.kill()
            raise WorkerStartError(
                f"worker {worker.slot} (pid {worker.pid}) not ready in {READY_TIMEOUT:.0f} s"
            ) from None
        if not worker.ready:
            raise WorkerStartError(
                f"worker {worker.slot} (pid {worker.pid}) exited with "
                f"{worker.proc.returncode} while starting"
            )
        self.current[worker.slot] = worker

    async def _watch(self, worker: Worker) -> None:
        """Reap ``worker``; restart its slot with backoff when it exited unexpectedly."""
        code = await worker.proc.wait()
        worker.ready = False
        worker.exited.set()
        self._all.discard(worker)
        await worker.admin.close()
        if worker.retiring or self._stopping or self.current[worker.slot] is not worker:
            log.info("worker %d (pid %d) exited with %s", worker.slot, worker.pid, code)
            return
        slot = worker.slot
        self.restarts[slot] += 1
        lived = asyncio.get_running_loop().time() - worker.started
        self._quick_failures[slot] = 0 if lived >= STABLE_AFTER else self._quick_failures[slot] + 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, self._quick_failures[slot] - 1))
        log.error(
            "worker %d (pid %d) exited unexpectedly with %s; restarting in %.1f s",
            slot, worker.pid, code, delay,
        )  # fmt: skip
        await asyncio.sleep(delay)
        while not self._stopping and self.current[slot] is worker:
            try:
                await self._wait_ready(await self._start_worker(slot))
            except WorkerStartError as exc:
                delay = min(BACKOFF_MAX, delay * 2)
                log.error("%s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)

    def _on_sigusr2(self) -> None:
        if self.is_restarting:
            log.warning("SIGUSR2: a rolling restart is already running")
        elif not self._stopping:
            self._spawn_task(self.rolling_restart())

    async def rolling_restart(self) -> list[dict[str, object]]:
        """Replace every slot's worker, one slot at a time (waits for any running restart).

        Returns:
            Per slot: ``{slot, old_pid, new_pid, seconds}`` (``seconds``: from starting the
            new worker until the old one exited), or ``{slot, error}`` when the new worker
            did not start; the old one then keeps serving and the restart stops there.
        """
        done: list[dict[str, object]] = []
        async with self._restart_lock:
            log.info("rolling restart of %d workers", self.count)
            loop = asyncio.get_running_loop()
            for slot in range(self.count):
                if self._stopping:
                    break
                began = loop.time()
                old = self.current[slot]
                try:
                    new = await self._start_worker(slot)
                    await self._wait_ready(new)
                except WorkerStartError as exc:
                    log.error("rolling restart stopped: %s", exc)
                    done.append({"slot": slot, "error": str(exc)})
                    break
                if old is not None and not old.exited.is_set():
                    await self._retire(old)
                seconds = round(loop.time() - began, 3)
                done.append(
                    {
                        "slot": slot,
                        "old_pid": old and old.pid,
                        "new_pid": new.pid,
                        "seconds": seconds,
                    }
                )
                log.info("slot %d: worker %s replaced in %.2f s", slot, new.pid, seconds)
        return done

    async def _retire(self, worker: Worker) -> None:
        """SIGTERM ``worker`` and wait until it has drained and exited (then SIGKILL)."""
        worker.retiring = True
        worker.ready = False
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signal.SIGTERM)
        drain = self.config.gateway.drain
        try:
            async with asyncio.timeout(drain.grace + drain.timeout + 5.0):
                await worker.exited.wait()
        except TimeoutError:
            log.error("worker %d (pid %d) ignored SIGTERM: killed", worker.slot, worker.pid)
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
            await worker.exited.wait()

    def _forward(self, sig: signal.Signals) -> None:
        log.info("forwarding %s to %d workers", sig.name, len(self._all))
        for worker in list(self._all):
            if not worker.retiring:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)

    async def _drain(self) -> None:
        """Stop: every worker drains; the slot sockets close when the grace period ends."""
        self._stopping = True
        drain = self.config.gateway.drain
        log.info("stopping: %d workers drain (grace %.1f s)", len(self._all), drain.grace)
        for worker in list(self._all):
            worker.retiring = True
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(drain.grace)
        self._close_sockets()  # with the workers' copies closed too: new connections refused
        await asyncio.gather(*(self._retire(w) for w in list(self._all)))

    async def _start_admin(self) -> None:
        cfg = self.config.admin
        if cfg.listen is None:
            return
        app = build_supervisor_admin_app(self, cfg.token)
        self._admin_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._admin_runner.setup()
        site = web.TCPSite(self._admin_runner, cfg.listen.host, cfg.listen.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or ()
        self.admin_bound = [s.getsockname()[:2] for s in sockets]

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shutdown(self) -> None:
        """Kill what is left (only after a failed start), close sockets, admin, runtime dir."""
        self._stopping = True
        for worker in list(self._all):
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
            await worker.exited.wait()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._close_sockets()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        shutil.rmtree(self._runtime, ignore_errors=True)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits (a worker calls it).

    No-op where prctl is not available. If the parent is already gone (re-parented to
    init before the call), ``sig`` is sent at once.
    """
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux / glibc / musl
        return
    if os.getppid() != parent or parent == 1:
        os.kill(os.getpid(), sig)
