"""Active health checks: probe every upstream endpoint on an interval, mark it UP or DOWN.

Rule: this module owns the probe loop of each endpoint and the verdict of its active probes
(consecutive successes and failures against the rise/fall thresholds). It never chooses an
endpoint: ``Upstreams`` learns each verdict through ``on_change`` and each probe round trip
through ``on_rtt``, and the request path may read ``HealthChecker.is_healthy`` (O(1), no await).

Why these shapes, with evidence:

* Defaults follow HAProxy's ``inter 2s``, ``rise 2``, ``fall 3`` (HAProxy configuration manual,
  ``default-server``), and endpoints start UP as HAProxy's servers do, so restarting a gateway
  is not an outage; passive outlier detection covers the time before the first probes land.
* Every wait is jittered, the first one too, as Envoy's active health checking does
  (``interval_jitter``, ``interval_jitter_percent``, ``initial_jitter``): gateways or worker
  processes started together then spread their probes over the interval instead of arriving
  in lock-step. The default ``rng`` is ``random.SystemRandom``: it holds no seeded state, so
  worker processes forked from one parent cannot share a jitter sequence.
* The next wait starts when a probe has finished (HAProxy and Envoy both rearm the interval
  timer on completion), so a slow probe never overlaps the next one on the same endpoint.
* With W worker processes each endpoint sees W probes per ``interval`` (there is no
  cross-process coordination, on purpose: each worker decides from what it sees itself).
  Operators raise ``interval`` with the worker count to keep the probe rate on a backend
  constant; the backend's deep ``/health`` caches its report (``backend/health.py``), so a
  burst costs it one model call per ``ttl`` anyway.
* Probes go through the session the caller passes, which should be a dedicated small one
  (its own ``TCPConnector``, ``limit`` about the number of endpoints, keep-alive on), never
  the proxy's: a hanging backend then cannot make probes take connections that client
  requests need, nor requests starve probes. This module never closes that session.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

__all__ = [
    "PROBE_USER_AGENT",
    "HealthChecker",
    "ProbeResult",
    "ProbeSettings",
    "ProbeState",
    "next_probe_delay",
]

log = logging.getLogger("geogate.health")

PROBE_USER_AGENT = "geogate-health/1"
_SCHEMES = frozenset({"http", "https"})
_PROBE_HEADERS = {"User-Agent": PROBE_USER_AGENT, "X-GeoGate-Probe": "1"}


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeSettings:
    """How to probe an endpoint and when to change its verdict.

    Usage::

        settings = ProbeSettings(interval=5.0, timeout=1.0, path="/health")
        checker = HealthChecker(probe_session, ["http://10.0.0.7:9201"], settings,
                                on_change=upstreams.set_health)

    Attributes:
        path: path (and query) probed with GET on each origin; the backend's deep
            ``/health`` answers 200 when healthy, 503 when failing or draining.
        interval: mean wait between the end of one probe and the start of the next (s);
            HAProxy ``inter``. With W worker processes, raise it W-fold to keep the rate.
        timeout: bound on one whole probe, connect to last body byte (s); HAProxy
            ``timeout check``.
        healthy_threshold: consecutive successes that bring a DOWN endpoint UP; HAProxy ``rise``.
        unhealthy_threshold: consecutive failures that take an UP endpoint DOWN; HAProxy
            ``fall``.
        expected_statuses: statuses that count as success (any 2xx by default); redirects
            are not followed.
        jitter: each wait is ``interval * uniform(1 - jitter, 1 + jitter)``, in [0, 1); the
            first wait is ``uniform(0, interval)`` whatever ``jitter`` is, so probers started
            together spread out at once.
        initially_healthy: the verdict before any probe. True (HAProxy-like) keeps a gateway
            restart from being an outage; False needs ``healthy_threshold`` successes first.

    Raises:
        ValueError: a value out of range (non-positive interval or timeout, a threshold
            below 1, jitter outside [0, 1), a path not starting with ``/``, no statuses).
    """

    path: str = "/health"
    interval: float = 2.0  # seconds
    timeout: float = 1.0  # seconds
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    expected_statuses: frozenset[int] = field(default_factory=lambda: frozenset(range(200, 300)))
    jitter: float = 0.2
    initially_healthy: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not self.path.startswith("/"):
            problems.append(f"path must start with '/', got {self.path!r}")
        if not self.interval > 0:
            problems.append(f"interval must be > 0 s, got {self.interval}")
        if not self.timeout > 0:
            problems.append(f"timeout must be > 0 s, got {self.timeout}")
        if self.healthy_threshold < 1:
            problems.append(f"healthy_threshold must be >= 1, got {self.healthy_threshold}")
        if self.unhealthy_threshold < 1:
            problems.append(f"unhealthy_threshold must be >= 1, got {self.unhealthy_threshold}")
        if not 0 <= self.jitter < 1:
            problems.append(f"jitter must be in [0, 1), got {self.jitter}")
        if not self.expected_statuses:
            problems.append("expected_statuses must not be empty")
        if problems:
            raise ValueError("; ".join(problems))


class ProbeState(enum.Enum):
    """The active-probe verdict on one endpoint.

    HEALTHY: ``is_healthy()`` is True; ``unhealthy_threshold`` consecutive failed probes
        -> UNHEALTHY.
    UNHEALTHY: ``is_healthy()`` is False; ``healthy_threshold`` consecutive successful
        probes -> HEALTHY.
    """

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one probe found.

    Attributes:
        ok: the status was expected and the whole body arrived within the timeout.
        status: the response status, None when no response head arrived.
        rtt: send to last body byte on the loop clock (s), None when no response arrived.
        error: None on success, else a short reason: ``"connect refused"``,
            ``"timeout after 1.0 s"``, ``"status 503"``, ``"connection closed"``, ...
    """

    ok: bool
    status: int | None = None
    rtt: float | None = None
    error: str | None = None


def next_probe_delay(interval: float, jitter: float, rng: random.Random, *, first: bool) -> float:
    """Return how long to wait before the next probe of one endpoint.

    Args:
        interval: mean wait (s).
        jitter: relative spread in [0, 1).
        rng: the source of randomness (seeded in tests).
        first: True before an endpoint's first probe.

    Returns:
        Seconds: in [0, interval) when ``first``, so N probers started together are spread
        uniformly over one interval; otherwise in [interval * (1 - jitter),
        interval * (1 + jitter)), as Envoy's ``interval_jitter_percent`` does, so they stay
        spread instead of drifting back into step.
    """
    if first:
        return interval * rng.random()
    return interval * (1.0 + jitter * (2.0 * rng.random() - 1.0))


class _EndpointHealth:
    """The probe record of one endpoint; changed only by synchronous code (no await inside)."""

    __slots__ = (
        "consecutive_failures",
        "consecutive_successes",
        "failures_total",
        "internal_error",
        "last_error",
        "last_probe_at",
        "last_rtt",
        "last_status",
        "probes_total",
        "state",
        "url",
    )

    def __init__(self, url: URL, state: ProbeState) -> None:
        self.url = url
        self.state = state
        self.consecutive_successes = 0
        self.consecutive_failures = 0
        self.last_status: int | None = None
        self.last_error: str | None = None
        self.last_rtt: float | None = None
        self.last_probe_at: float | None = None  # loop time at the end of the last probe
        self.probes_total = 0
        self.failures_total = 0
        self.internal_error = False  # the probe loop is failing on an unexpected exception

    def record(self, result: ProbeResult, now: float, settings: ProbeSettings) -> bool:
        """Count one probe; return True when it moved the verdict."""
        self.probes_total += 1
        self.last_probe_at = now
        self.last_status = result.status
        self.last_error = result.error
        if result.ok:
            self.last_rtt = result.rtt
            self.consecutive_successes += 1
            self.consecutive_failures = 0
            if (
                self.state is ProbeState.UNHEALTHY
                and self.consecutive_successes >= settings.healthy_threshold
            ):
                self.state = ProbeState.HEALTHY
                return True
        else:
            self.failures_total += 1
            self.consecutive_failures += 1
            self.consecutive_successes = 0
            if (
                self.state is ProbeState.HEALTHY
                and self.consecutive_failures >= settings.unhealthy_threshold
            ):
                self.state = ProbeState.UNHEALTHY
                return True
        return False


class HealthChecker:
    """Probes a set of endpoints, one sequential loop per endpoint; ``update()`` changes the set.

    Args:
        session: the ClientSession probes use; a dedicated small one (own connector,
            ``limit`` about ``len(endpoints)``, ``force_close=False`` so probes reuse
            connections), not the proxy's. Never closed here.
        endpoints: origins such as ``"http://127.0.0.1:9201"`` (a trailing slash is
            dropped; duplicates are probed once).
        settings: path, interval, timeout, thresholds, statuses, jitter.
        on_change: called as ``on_change(origin, healthy)`` only when a verdict flips;
            synchronous, on the loop (e.g. ``Upstreams.set_health``).
        on_rtt: called as ``on_rtt(origin, seconds)`` after each successful probe.
        rng: jitter source; default ``random.SystemRandom()`` (no state shared across forks).
        headers: extra request fields (e.g. ``Host``); ``User-Agent: geogate-health/1`` and
            ``X-GeoGate-Probe: 1`` are always sent, so a backend can tell probes apart.

    Raises:
        ValueError: an endpoint is not an absolute ``http``/``https`` origin.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoints: Sequence[str],
        settings: ProbeSettings,
        *,
        on_change: Callable[[str, bool], None] | None = None,
        on_rtt: Callable[[str, float], None] | None = None,
        rng: random.Random | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._session = session
        self._settings = settings
        self._on_change = on_change
        self._on_rtt = on_rtt
        self._rng = rng if rng is not None else random.SystemRandom()
        self._headers = {**(headers or {}), **_PROBE_HEADERS}
        self._endpoints: dict[str, _EndpointHealth] = {}
        self._group: asyncio.TaskGroup | None = None  # set while run() is running
        self._loops: dict[str, asyncio.Task[None]] = {}  # origin -> its probe loop
        for origin in _origins(endpoints):
            if origin not in self._endpoints:  # a duplicate is probed once
                self._endpoints[origin] = self._new_record(origin)

    def _new_record(self, origin: str) -> _EndpointHealth:
        settings = self._settings
        initial = ProbeState.HEALTHY if settings.initially_healthy else ProbeState.UNHEALTHY
        return _EndpointHealth(URL(origin + settings.path), initial)

    def update(
        self,
        endpoints: Sequence[str],
        settings: ProbeSettings | None = None,
        *,
        restart: Iterable[str] = (),
    ) -> tuple[list[str], list[str]]:
        """Probe a new set of endpoints (a config reload) without disturbing the others.

        Endpoints in both sets keep their verdict, counters and running probe loop (its next
        wait is not reset). New ones get a fresh record (``initially_healthy``) and, while
        ``run()`` is running, a probe loop of their own whose first wait is jittered as at
        start; removed ones have their loop cancelled and their record dropped, so no
        ``on_change`` or ``on_rtt`` is called for them afterwards. Synchronous: call it in the
        same step as the swap of the endpoint set it mirrors.

        Args:
            endpoints: the new origins (same form as the constructor's).
            settings: new probe settings, or None to keep them. Running loops use the new
                interval, jitter, timeout and thresholds from their next probe on; a new
                ``path`` applies to every endpoint's next probe.
            restart: origins of both sets to treat as new all the same (their record and
                loop start over), e.g. an endpoint that moved to another region.

        Returns:
            ``(added, removed)`` origins, in order.

        Raises:
            ValueError: an endpoint is not an absolute ``http``/``https`` origin (nothing is
                changed then).
        """
        wanted = list(dict.fromkeys(_origins(endpoints)))
        restart = set(restart)
        if settings is not None:
            if settings.path != self._settings.path:
                for origin, record in self._endpoints.items():
                    record.url = URL(origin + settings.path)
            self._settings = settings
        removed = [o for o in self._endpoints if o not in wanted or o in restart]
        for origin in removed:
            del self._endpoints[origin]
            loop = self._loops.pop(origin, None)
            if loop is not None:
                loop.cancel()
        added = [o for o in wanted if o not in self._endpoints]
        for origin in added:
            self._endpoints[origin] = self._new_record(origin)
            if self._group is not None:
                self._start_loop(self._group, origin)
        # keep the caller's order (the admin API lists endpoints in config order)
        self._endpoints = {o: self._endpoints[o] for o in wanted}
        return added, [o for o in removed if o not in wanted]

    @property
    def settings(self) -> ProbeSettings:
        """The probe settings."""
        return self._settings

    @property
    def origins(self) -> tuple[str, ...]:
        """The probed origins, normalised (no trailing slash), in the order given."""
        return tuple(self._endpoints)

    def __repr__(self) -> str:
        healthy = sum(e.state is ProbeState.HEALTHY for e in self._endpoints.values())
        return (
            f"<HealthChecker endpoints={len(self._endpoints)} healthy={healthy} "
            f"interval={self._settings.interval}s path={self._settings.path}>"
        )

    def is_healthy(self, origin: str) -> bool:
        """Return the active-probe verdict on ``origin`` (O(1), no I/O).

        Raises:
            KeyError: ``origin`` is not probed by this checker.
        """
        return self._endpoints[origin].state is ProbeState.HEALTHY

    def state(self, origin: str) -> ProbeState:
        """Return the verdict on ``origin`` as a ProbeState.

        Raises:
            KeyError: ``origin`` is not probed by this checker.
        """
        return self._endpoints[origin].state

    def snapshot(self) -> dict[str, dict[str, object]]:
        """Per-origin probe state for the admin API and tests (JSON-ready).

        Call it on the loop: ages are measured on the loop clock.

        Returns:
            ``{origin: {"healthy", "consecutive_successes", "consecutive_failures",
            "last_status", "last_error", "last_rtt_ms", "last_probe_age_s", "probes_total",
            "failures_total"}}``; times are None until the first probe.
        """
        now = asyncio.get_running_loop().time()
        return {
            origin: {
                "healthy": e.state is ProbeState.HEALTHY,
                "consecutive_successes": e.consecutive_successes,
                "consecutive_failures": e.consecutive_failures,
                "last_status": e.last_status,
                "last_error": e.last_error,
                "last_rtt_ms": None if e.last_rtt is None else round(e.last_rtt * 1000, 3),
                "last_probe_age_s": (
                    None if e.last_probe_at is None else round(now - e.last_probe_at, 3)
                ),
                "probes_total": e.probes_total,
                "failures_total": e.failures_total,
            }
            for origin, e in self._endpoints.items()
        }

    async def run(self) -> None:
        """Probe every endpoint until cancelled.

        One task per endpoint in an ``asyncio.TaskGroup``; each waits ``next_probe_delay``,
        probes, and repeats, so probes of one endpoint never overlap. An unexpected exception
        in one endpoint's loop is logged (once per streak) and that loop goes on; the others
        never notice. ``update()`` adds and cancels loops while this runs.

        Raises:
            asyncio.CancelledError: always, in the end: cancel the task running this to stop.
                Every probe task has finished when it propagates; the session stays open.
        """
        try:
            async with asyncio.TaskGroup() as tasks:
                self._group = tasks
                for origin in self._endpoints:
                    self._start_loop(tasks, origin)
                await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self._group = None
            self._loops.clear()

    def _start_loop(self, tasks: asyncio.TaskGroup, origin: str) -> None:
        # a loop cancelled by update() ends as "cancelled", which a TaskGroup ignores
        self._loops[origin] = tasks.create_task(
            self._probe_loop(origin), name=f"health-probe {origin}"
        )

    async def probe_once(self, origin: str) -> ProbeResult:
        """Probe ``origin`` once now and count the result against the thresholds.

        Success means a status in ``expected_statuses`` and the whole body read within
        ``settings.timeout``. Transitions call ``on_change``; a success calls ``on_rtt``.

        Args:
            origin: one of ``origins``.

        Returns:
            The ProbeResult. Network failures, timeouts and unexpected statuses are results,
            not exceptions.

        Raises:
            KeyError: ``origin`` is not probed by this checker.
        """
        health = self._endpoints[origin]
        result = await self._fetch(health.url)
        if self._endpoints.get(origin) is not health:
            return result  # update() removed or restarted it meanwhile: not ours to report
        loop_time = asyncio.get_running_loop().time()
        # No await from here on: the record and the callbacks see one consistent state.
        changed = health.record(result, loop_time, self._settings)
        if changed:
            healthy = health.state is ProbeState.HEALTHY
            if healthy:
                log.warning(
                    "upstream %s is UP after %d successful probes", origin, self._threshold(True)
                )
            else:
                log.warning(
                    "upstream %s is DOWN after %d failed probes (last: %s)",
                    origin,
                    self._threshold(False),
                    result.error,
                )
            if self._on_change is not None:
                self._on_change(origin, healthy)
        if result.ok and result.rtt is not None and self._on_rtt is not None:
            self._on_rtt(origin, result.rtt)
        return result

    def _threshold(self, healthy: bool) -> int:
        s = self._settings
        return s.healthy_threshold if healthy else s.unhealthy_threshold

    async def _fetch(self, url: URL) -> ProbeResult:
        settings = self._settings
        started = time.perf_counter()
        status: int | None = None
        try:
            async with asyncio.timeout(settings.timeout):
                async with self._session.get(
                    url, headers=self._headers, allow_redirects=False
                ) as resp:
                    status = resp.status
                    try:
                        # Drain and discard: constant memory whatever the body's size, and a
                        # fully read response returns its connection to the pool.
                        async for _ in resp.content.iter_any():
                            pass
                    except BaseException:
                        resp.close()  # half-read: never back into the pool
                        raise
        except aiohttp.ClientError as exc:  # first: aiohttp's own timeouts are TimeoutErrors
            return ProbeResult(ok=False, status=status, error=_reason(exc))
        except TimeoutError:  # our scope ran out
            return ProbeResult(ok=False, status=status, error=f"timeout after {settings.timeout} s")
        except OSError as exc:
            return ProbeResult(ok=False, status=status, error=_reason(exc))
        rtt = time.perf_counter() - started
        if status not in settings.expected_statuses:
            return ProbeResult(ok=False, status=status, rtt=rtt, error=f"status {status}")
        return ProbeResult(ok=True, status=status, rtt=rtt)

    async def _probe_loop(self, origin: str) -> None:
        rng = self._rng
        health = self._endpoints[origin]
        delay = next_probe_delay(self._settings.interval, self._settings.jitter, rng, first=True)
        while True:
            await asyncio.sleep(delay)
            try:
                await self.probe_once(origin)
            except Exception as exc:
                # Our bug (or a callback's), not evidence about the endpoint: the verdict
                # stays as it was rather than every endpoint going DOWN at once on one bug.
                health.last_error = f"internal error: {type(exc).__name__}"
                if not health.internal_error:  # log once per streak, not once per probe
                    health.internal_error = True
                    log.warning("health probe of %s failed unexpectedly", origin, exc_info=True)
            else:
                if health.internal_error:
                    health.internal_error = False
                    log.warning("health probe of %s works again", origin)
            settings = self._settings  # update() may have changed them
            delay = next_probe_delay(settings.interval, settings.jitter, rng, first=False)


def _origins(endpoints: Iterable[str]) -> Iterator[str]:
    """Normalised origins (no trailing slash).

    Raises:
        ValueError: an endpoint is not an absolute ``http``/``https`` origin.
    """
    for endpoint in endpoints:
        origin = endpoint.rstrip("/")
        base = URL(origin)
        if not base.absolute or base.scheme not in _SCHEMES or base.path not in ("", "/"):
            raise ValueError(f"not an http(s) origin: {endpoint!r}")
        yield origin


def _reason(exc: BaseException) -> str:
    """A short, stable reason for a failed probe (no addresses, no tracebacks)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connect timeout"
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return "read timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "connect refused"
        return f"connect failed: {exc.os_error.strerror or type(exc.os_error).__name__}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection closed"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "body cut short"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "invalid HTTP response"
    if isinstance(exc, ConnectionResetError) or getattr(exc, "errno", None) == errno.ECONNRESET:
        return "connection reset"
    if isinstance(exc, OSError) and exc.strerror:
        return f"connection error: {exc.strerror}"
    return f"connection error: {type(exc).__name__}"
