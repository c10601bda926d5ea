"""A dependency (a Redis) behind a time budget per call and a ``Breaker``.

``CallGuard`` is the one implementation of this mechanism; ``ratelimit_store.ResilientStore``
(the control Redis) and ``cachestore.ZoneCaches`` (each zone's cache Redis) use it and decide
only what to answer when the guard says the dependency did not answer.

Usage::

    guard = CallGuard("control-redis", breaker, call_timeout=0.02, hang_timeout=0.5,
                      on_degraded=report)
    decision = await guard.call(lambda: redis_store.charge(key, 1, limit), None)
    if decision is None:  # refused by the breaker, an error, or no answer in time
        decision = answer_without_redis()

Per call (``call(make, default)``):

* The breaker decides first. While it refuses (OPEN, or HALF_OPEN with its trials taken)
  ``make`` is not even called (no coroutine is built), the caller gets ``default`` at once,
  and a dead Redis costs nothing per request. After the breaker's ``reset_timeout`` one trial
  call goes through and, if it succeeds, the dependency is used again.
* An answer within ``call_timeout`` is returned and the breaker hears a success; an exception
  (any ``Exception``) is a failure and the caller gets ``default``. Nothing raises because of
  the dependency.
* A call that runs late is **not cancelled**. The caller gets ``default`` once
  ``call_timeout`` has passed, and the call goes on in the background holding its breaker
  slot; the breaker hears its outcome when it ends: a late success is a success, an error a
  failure, and a call still running ``hang_timeout`` seconds after it ran late is cancelled
  and counted as a failure. Two lessons from bench/ratelimit_bench.py (overhead) are behind
  this. redis-py closes a connection whose command is cancelled mid-reply, and the reconnects
  that followed overran the budget in turn, so cancelling at the budget made a cascade out of
  one slow reply. And on a busy event loop a Redis reply can wait past 20 ms in our own queue,
  which says nothing about Redis. Either way, judging a call by the budget opened the breaker
  for seconds while Redis was fine. A late call may still take effect (a charge counted, an
  entry written); callers must tolerate that.
* ``CancelledError`` (the client left) always propagates. The call itself is left to finish
  (same reason) and is judged as nothing: the breaker slot is freed with no outcome.
* ``close()`` marks the guard closing and cancels the late calls; a late call that ends while
  closing is not judged (a shutdown says nothing about the dependency).

Degraded mode is the breaker not CLOSED. The guard checks the breaker after every call it
made and every late call it judged; only those drive the breaker, so each CLOSED <-> not
CLOSED transition is seen exactly once and reported through ``on_degraded(True | False)``,
where the caller logs it its own way (one line per transition, none per request) and feeds
its gauges. Single failures while CLOSED are only counted (``errors_total``, ``last_error``).

One event loop owns a guard, as it owns the breaker.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.breaker import Breaker, BreakerState

__all__ = ["CallGuard", "guarded_redis"]

T = TypeVar("T")
D = TypeVar("D")


class _LateCall(Exception):
    """A call missed its budget and goes on in the background (``CallGuard._bounded``)."""


class CallGuard:
    """A dependency behind a time budget per call and a breaker (see the module docstring).

    Args:
        name: for ``__repr__``, e.g. ``"control-redis"`` or ``"cache-l2 eu"``.
        breaker: guards the dependency; its ``fail_max`` and ``reset_timeout`` set how fast
            the guard gives up on it and how often it tries it again. Only this guard should
            drive it.
        call_timeout: seconds a caller waits for an answer (connect included), e.g. 0.02.
        hang_timeout: seconds after ``call_timeout`` at which a late call is cancelled and
            counted as a breaker failure.
        on_degraded: called with True when the breaker leaves CLOSED and False when it is
            CLOSED again, once per transition, after the call that revealed it; must not raise.

    Raises:
        ValueError: a timeout is not > 0 seconds and finite.
    """

    __slots__ = (
        "_breaker",
        "_call_timeout",
        "_closing",
        "_degraded",
        "_hang_timeout",
        "_late",
        "_on_degraded",
        "calls_total",
        "errors_total",
        "last_error",
        "name",
        "refused_total",
    )

    def __init__(
        self,
        name: str,
        breaker: Breaker,
        *,
        call_timeout: float,
        hang_timeout: float,
        on_degraded: Callable[[bool], None] | None = None,
    ) -> None:
        for what, value in (("call_timeout", call_timeout), ("hang_timeout", hang_timeout)):
            if not 0 < value < math.inf:
                raise ValueError(f"{what} must be > 0 seconds, not {value}")
        self.name = name
        self._breaker = breaker
        self._call_timeout = call_timeout
        self._hang_timeout = hang_timeout
        self._on_degraded = on_degraded
        self._late: set[asyncio.Future[Any]] = set()  # calls past the budget, still running
        self._closing = False
        self._degraded = breaker.state is not BreakerState.CLOSED
        self.calls_total = 0
        """Calls the breaker let through to the dependency (a counter)."""
        self.errors_total = 0
        """Of those, calls that failed or ran late (a counter; a late call counts once)."""
        self.refused_total = 0
        """Calls the breaker kept from the dependency (a counter)."""
        self.last_error = ""
        """Why the last failed or late call failed, e.g. ``"no answer within 20 ms"``."""

    @property
    def breaker(self) -> Breaker:
        """The breaker around the dependency."""
        return self._breaker

    @property
    def call_timeout(self) -> float:
        """Seconds a caller waits for an answer."""
        return self._call_timeout

    @property
    def hang_timeout(self) -> float:
        """Seconds a late call may run on before it is cancelled and counted a failure."""
        return self._hang_timeout

    @property
    def degraded(self) -> bool:
        """True while the breaker is not CLOSED (as of the last call judged)."""
        return self._degraded

    @property
    def late_calls(self) -> int:
        """Calls still running in the background (late, or abandoned by their caller)."""
        return len(self._late)

    async def call(self, make: Callable[[], Coroutine[Any, Any, T]], default: D) -> T | D:
        """``make()``'s result within ``call_timeout``, else ``default``.

        Args:
            make: builds the call, e.g. ``lambda: redis.get(key)``; not called at all when
                the breaker refuses.
            default: the answer when the dependency does not give one: refused by the
                breaker, an exception, or no answer within ``call_timeout``. Pick one that
                ``make()`` cannot return if the caller must tell the cases apart.

        Returns:
            The dependency's answer, or ``default``; never raises because of the dependency.

        Raises:
            asyncio.CancelledError: the caller was cancelled; the call finishes in the
                background and is judged as nothing.
        """
        breaker = self._breaker
        if not breaker.try_acquire():
            self.refused_total += 1
            return default
        self.calls_total += 1
        success: bool | None = None
        judged_later = False
        try:
            result = await self._bounded(make())
            success = True
            return result
        except _LateCall:
            judged_later = True  # _late_done() releases the breaker slot when the call ends
        except Exception as exc:
            success = False
            self.errors_total += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            if not judged_later:
                breaker.release(success=success)
            self._observe()
        return default

    async def _bounded(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` for at most ``call_timeout`` seconds without cancelling it.

        Raises:
            _LateCall: no answer in time; the call goes on and holds its breaker slot.
        """
        task = asyncio.ensure_future(coro)
        try:
            return await asyncio.wait_for(asyncio.shield(task), self._call_timeout)
        except TimeoutError:
            self.errors_total += 1
            self.last_error = f"no answer within {self._call_timeout * 1000:g} ms"
            self._late.add(task)
            timer = asyncio.get_running_loop().call_later(self._hang_timeout, task.cancel)
            task.add_done_callback(lambda t: self._late_done(t, timer))
            raise _LateCall from None
        except asyncio.CancelledError:
            if not task.done():  # the client left: let the call finish, judge nothing
                self._late.add(task)
                task.add_done_callback(lambda t: self._late_done(t, None))
            raise

    def _late_done(self, task: asyncio.Future[Any], timer: asyncio.TimerHandle | None) -> None:
        self._late.discard(task)
        if timer is None:  # abandoned by its caller, whose call() released the slot
            if not task.cancelled():
                task.exception()  # retrieved: nobody else will
            return
        timer.cancel()
        if self._closing:
            if not task.cancelled():
                task.exception()
            self._breaker.release(success=None)
            return
        if task.cancelled():  # still running at hang_timeout
            self.last_error = f"no answer within {self._hang_timeout:g} s"
            self._breaker.release(success=False)
        elif (exc := task.exception()) is not None:
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._breaker.release(success=False)
        else:
            self._breaker.release(success=True)
        self._observe()

    def _observe(self) -> None:
        degraded = self._breaker.state is not BreakerState.CLOSED
        if degraded is self._degraded:
            return
        self._degraded = degraded
        if self._on_degraded is not None:
            self._on_degraded(degraded)

    async def settle(self) -> None:
        """Wait until every late call has ended and been judged (tests, an orderly shutdown;
        a hung call ends at ``hang_timeout``)."""
        while self._late:
            await asyncio.gather(*list(self._late), return_exceptions=True)

    async def close(self) -> None:
        """Stop judging: cancel the late calls and wait (at most ``hang_timeout`` seconds)
        for them to end; their breaker slots are freed with no outcome."""
        self._closing = True
        late = list(self._late)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=self._hang_timeout)

    def snapshot(self) -> dict[str, object]:
        """JSON-ready state: ``{"degraded": False, "breaker": Breaker.snapshot(),
        "calls_total": 0, "errors_total": 0, "refused_total": 0, "last_error": ""}``."""
        return {
            "degraded": self._degraded,
            "breaker": self._breaker.snapshot(),
            "calls_total": self.calls_total,
            "errors_total": self.errors_total,
            "refused_total": self.refused_total,
            "last_error": self.last_error,
        }

    def __repr__(self) -> str:
        state = "degraded" if self._degraded else "ok"
        return (
            f"<CallGuard {self.name} {state} breaker={self._breaker!r} "
            f"calls_total={self.calls_total} errors_total={self.errors_total} "
            f"refused_total={self.refused_total} late={len(self._late)}>"
        )


def guarded_redis(url: str, *, socket_timeout: float) -> Redis:
    """A redis-py client for ``url`` (``redis://host:port/db``) meant to sit behind a
    ``CallGuard``: it never retries on its own (the guard's budget and breaker decide what a
    failure means), and its connect and read timeouts are a backstop only.

    Args:
        url: redis-py URL syntax.
        socket_timeout: redis-py's connect and read timeouts, seconds.
    """
    return Redis.from_url(
        url,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
    )
