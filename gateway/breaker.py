"""Circuit breaker per upstream endpoint, on pybreaker's state machine, timed by our clock.

Rule: this module decides; it never touches a socket, awaits or sleeps. Callers ask
``try_acquire()`` before they pick an endpoint and call ``release()`` exactly once per ``True``;
both run synchronously on the loop between awaits, so no read-modify-write spans an await.

States (Nygard, *Release It!*; pybreaker's state classes):

* CLOSED: ``try_acquire()`` is True. A failed request adds one to the consecutive-failure count,
  a successful one resets it; ``fail_max`` consecutive failures -> OPEN.
* OPEN: ``try_acquire()`` is False at once, no upstream call, until ``reset_timeout`` seconds
  have passed since the trip -> HALF_OPEN (lazily: ``state`` reads HALF_OPEN from then on, the
  transition itself happens at the next ``try_acquire()``).
* HALF_OPEN: ``try_acquire()`` is True while fewer than ``half_open_max_concurrent`` trial
  requests are in flight. ``success_threshold`` trial successes -> CLOSED; one trial failure
  -> OPEN with a fresh ``reset_timeout``.

How pybreaker is driven. ``CircuitBreaker.call()`` wraps a synchronous call and
``CircuitBreaker.calling()`` a generator; neither can stay open across an ``await``, and the
generator route judges a request that is dropped unfinished (``GeneratorExit``) as a failure.
So we drive the same pieces ``call()`` uses, one outcome at a time: the failure counter of
the storage, then the current state's ``on_success()`` / ``on_failure()``. pybreaker decides
CLOSED -> OPEN (``CircuitClosedState.on_failure``: counter >= fail_max), HALF_OPEN -> CLOSED
(``CircuitHalfOpenState.on_success``: success counter >= success_threshold) and HALF_OPEN ->
OPEN (``on_failure``), and every transition goes through its ``open()`` / ``half_open()`` /
``close()``, so its listeners and ``current_state`` always agree with us. OPEN -> HALF_OPEN is
pybreaker's rule ``now < opened_at + reset_timeout`` evaluated on our clock followed by its
``half_open()``: ``CircuitOpenState.before_call()`` would run the guarded function at once
through the half-open state and judge it, which an async request cannot offer.

Time. pybreaker times OPEN with ``datetime.now(UTC)``; ``ClockStorage`` (its public storage
extension point) records the trip on our monotonic clock and hands pybreaker an ``opened_at``
for which its own comparison gives the same answer, so ManualClock tests and a wall-clock jump
cannot move a breaker.

Outcomes that straddle a transition. ``release()`` takes no ticket, so a request's verdict is
judged in the state the breaker is in when it ends:

* OPEN: ignored. A request that started before the trip (CLOSED) and succeeds afterwards
  neither closes the breaker nor, failing, stretches its timeout.
* HALF_OPEN with no trial in flight: the request started before the trip; ignored.
* HALF_OPEN with trials in flight: taken for a trial's: it frees one trial slot and its verdict
  counts. That is exact unless requests from before the trip are still running (long streams);
  then one of them may be taken for a trial: its verdict is a fresh answer from the endpoint,
  and the trial it stood in for can admit one more concurrent trial than
  ``half_open_max_concurrent`` (at most one extra per such request). We prefer that to holding
  a slot for a trial that has ended, which would stall recovery for as long as an old stream runs.
* CLOSED: everything counts, as in pybreaker.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pybreaker

if TYPE_CHECKING:
    from gateway.clock import Clock

__all__ = ["Breaker", "BreakerState", "ClockStorage", "StateChange"]


class BreakerState(enum.Enum):
    """A breaker's state; ``.value`` is the JSON and metrics label."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_CLOSED, _OPEN, _HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
_STATES = {
    _CLOSED: BreakerState.CLOSED,
    _OPEN: BreakerState.OPEN,
    _HALF_OPEN: BreakerState.HALF_OPEN,
}

StateChange = Callable[["Breaker", BreakerState, BreakerState], None]
"""``on_state_change(breaker, old, new)``: for logs and metrics; must not raise."""


class ClockStorage(pybreaker.CircuitBreakerStorage):
    """pybreaker state storage in memory, whose OPEN timer runs on a ``Clock``.

    ``opened_at`` (set by pybreaker's ``open()``) records ``clock.now()`` and ignores the
    datetime it is given. Read back, it is ``datetime.now(UTC)`` minus the clock time elapsed
    since the trip, so pybreaker's own test ``datetime.now(UTC) < opened_at + reset_timeout``
    holds exactly while ``clock.now() - opened_clock < reset_timeout`` (up to the few
    microseconds between the two ``datetime.now()`` calls, which can only end OPEN that much
    early).

    Args:
        clock: monotonic seconds.
    """

    __slots__ = ("_clock", "_failures", "_state", "_successes", "opened_clock")

    def __init__(self, clock: Clock) -> None:
        super().__init__("clock")
        self._clock = clock
        self._state = _CLOSED
        self._failures = 0
        self._successes = 0
        self.opened_clock: float | None = None
        """Clock reading (seconds) of the last trip; None before the first."""

    @property
    def state(self) -> str:
        """pybreaker's state name: ``"closed"``, ``"open"`` or ``"half-open"``."""
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        self._state = state

    def increment_counter(self) -> None:
        """Add one consecutive failure."""
        self._failures += 1

    def reset_counter(self) -> None:
        """Forget the consecutive failures."""
        self._failures = 0

    def increment_success_counter(self) -> None:
        """Add one half-open success."""
        self._successes += 1

    def reset_success_counter(self) -> None:
        """Forget the half-open successes."""
        self._successes = 0

    @property
    def counter(self) -> int:
        """Consecutive failures."""
        return self._failures

    @property
    def success_counter(self) -> int:
        """Half-open successes."""
        return self._successes

    @property
    def opened_at(self) -> datetime | None:
        """The trip as a UTC datetime consistent with our clock (see the class docstring)."""
        if self.opened_clock is None:
            return None
        elapsed = self._clock.now() - self.opened_clock
        return datetime.now(UTC) - timedelta(seconds=elapsed)

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self.opened_clock = self._clock.now()


class _UpstreamFailed(Exception):
    """The failure handed to pybreaker's ``on_failure()``, which re-raises it once it trips."""


class _Transitions(pybreaker.CircuitBreakerListener):
    """Tells the Breaker of every pybreaker transition, whoever caused it."""

    __slots__ = ("_breaker",)

    def __init__(self, breaker: Breaker) -> None:
        self._breaker = breaker

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        if old_state is not None:
            self._breaker._transitioned(_STATES[old_state.name], _STATES[new_state.name])


class Breaker:
    """Circuit breaker for one upstream endpoint (see the module docstring for the states).

    Usage::

        if breaker.try_acquire():          # False: OPEN, or HALF_OPEN with its trials taken
            ok: bool | None = None
            try:
                ok = await attempt()       # True 2xx/3xx; False 5xx, connect error, timeout
            finally:
                breaker.release(success=ok)   # None: cancelled, or the client's fault (4xx)

    One event loop owns a Breaker; it is not meant to be shared between threads.

    Args:
        name: for logs and ``__repr__``, e.g. ``"eu-west-1 127.0.0.1:9201"``.
        fail_max: consecutive failures that open the breaker (>= 1).
        reset_timeout: seconds OPEN lasts before trials are let through (>= 0).
        half_open_max_concurrent: trial requests in flight at once in HALF_OPEN (>= 1).
        success_threshold: trial successes that close the breaker (>= 1).
        clock: monotonic seconds.
        on_state_change: called as ``(breaker, old, new)`` after each transition, once the
            breaker is consistent (its ``state`` and ``repr`` already show ``new``).

    Raises:
        ValueError: a limit is out of range.
    """

    __slots__ = (
        "_cb",
        "_clock",
        "_failure",
        "_in_flight",
        "_max_trials",
        "_on_state_change",
        "_pending",
        "_reset_timeout",
        "_storage",
        "_trials",
        "name",
    )

    def __init__(
        self,
        name: str,
        *,
        fail_max: int = 5,
        reset_timeout: float = 30.0,
        half_open_max_concurrent: int = 1,
        success_threshold: int = 1,
        clock: Clock,
        on_state_change: StateChange | None = None,
    ) -> None:
        if fail_max < 1:
            raise ValueError(f"fail_max must be >= 1, not {fail_max}")
        if not reset_timeout >= 0:
            raise ValueError(f"reset_timeout must be >= 0 seconds, not {reset_timeout}")
        if half_open_max_concurrent < 1:
            raise ValueError(
                f"half_open_max_concurrent must be >= 1, not {half_open_max_concurrent}"
            )
        if success_threshold < 1:
            raise ValueError(f"success_threshold must be >= 1, not {success_threshold}")
        self.name = name
        self._clock = clock
        self._reset_timeout = float(reset_timeout)
        self._max_trials = half_open_max_concurrent
        self._on_state_change = on_state_change
        self._storage = ClockStorage(clock)
        self._in_flight = 0  # acquired and not yet released, any state
        self._trials = 0  # trial slots taken in the current HALF_OPEN
        self._pending: tuple[BreakerState, BreakerState] | None = None  # (first old, last new)
        self._failure = _UpstreamFailed()  # reused: a failure raises no new exception
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            success_threshold=success_threshold,
            listeners=[_Transitions(self)],
            state_storage=self._storage,
            name=name,
            throw_new_error_on_trip=False,  # on_failure() re-raises our _UpstreamFailed
        )

    @property
    def circuit(self) -> pybreaker.CircuitBreaker:
        """The pybreaker breaker underneath, for inspection; drive it only through this class."""
        return self._cb

    @property
    def state(self) -> BreakerState:
        """The current state; reading it changes nothing.

        An OPEN breaker whose ``reset_timeout`` has passed reads HALF_OPEN; pybreaker moves
        (and ``on_state_change`` fires) at the next ``try_acquire()``.
        """
        name = self._storage._state
        if name == _OPEN and self.reopens_in() is None:
            return BreakerState.HALF_OPEN
        return _STATES[name]

    def try_acquire(self) -> bool:
        """May a request go to this endpoint now? O(1); builds no objects.

        Returns:
            True, and the caller owes exactly one ``release()``: CLOSED; or HALF_OPEN with a
            trial slot free (the slot is taken). False at once, no upstream call: OPEN before
            ``reset_timeout`` has passed, or HALF_OPEN with every trial slot taken.
        """
        storage = self._storage
        name = storage._state
        if name == _CLOSED:
            self._in_flight += 1
            return True
        if name == _OPEN:
            opened = storage.opened_clock
            if opened is not None and self._clock.now() - opened < self._reset_timeout:
                return False
            self._cb.half_open()
            self._flush()
        if self._trials >= self._max_trials:
            return False
        self._trials += 1
        self._in_flight += 1
        return True

    def release(self, *, success: bool | None) -> None:
        """End one acquired request and feed its outcome to pybreaker. O(1).

        Args:
            success: True for a success; False for a failure (5xx, connect error, timeout),
                which counts towards ``fail_max`` in CLOSED and reopens from HALF_OPEN; None
                when the request was not judged (the client left, a 4xx): the slot is freed
                and nothing is counted. The state at release decides how the verdict counts
                (module docstring, "Outcomes that straddle a transition").

        Raises:
            RuntimeError: more releases than successful acquires (a caller bug).
        """
        if self._in_flight == 0:
            raise RuntimeError(f"{self.name}: release() without a successful try_acquire()")
        self._in_flight -= 1
        name = self._storage._state
        if name == _OPEN:
            return
        if name == _HALF_OPEN:
            if self._trials == 0:
                return  # started before the trip
            self._trials -= 1
        if success is None:
            return
        if success:  # as pybreaker's _handle_success() / _handle_error(): counter, then the state
            self._storage.reset_counter()
            self._cb.state.on_success()
        else:
            self._storage.increment_counter()
            try:
                self._cb.state.on_failure(self._failure)
            except _UpstreamFailed:
                pass  # pybreaker re-raises the failure after it has opened the circuit
            finally:
                self._failure.__traceback__ = self._failure.__context__ = None
        if self._pending is not None:
            self._flush()

    def reopens_in(self) -> float | None:
        """Seconds until an OPEN breaker lets trials through; None unless ``state`` is OPEN."""
        opened = self._storage.opened_clock
        if self._storage._state != _OPEN or opened is None:
            return None
        left = self._reset_timeout - (self._clock.now() - opened)
        return left if left > 0 else None

    def reconfigure(
        self, *, fail_max: int, reset_timeout: float, half_open_max_concurrent: int
    ) -> None:
        """Apply new limits (a config reload) keeping the state, failure count and slots.

        An OPEN breaker's remaining time is measured against the new ``reset_timeout``; a
        failure count already at or above a lower ``fail_max`` opens it at the next failure.

        Args:
            fail_max: consecutive failures that open the breaker (>= 1).
            reset_timeout: seconds OPEN lasts before trials are let through (>= 0).
            half_open_max_concurrent: trial requests in flight at once in HALF_OPEN (>= 1).

        Raises:
            ValueError: a limit is out of range (nothing is changed then).
        """
        if fail_max < 1 or not reset_timeout >= 0 or half_open_max_concurrent < 1:
            raise ValueError(
                f"bad breaker limits: fail_max={fail_max}, reset_timeout={reset_timeout}, "
                f"half_open_max_concurrent={half_open_max_concurrent}"
            )
        self._cb.fail_max = fail_max
        self._cb.reset_timeout = reset_timeout
        self._reset_timeout = float(reset_timeout)
        self._max_trials = half_open_max_concurrent

    def snapshot(self) -> dict[str, object]:
        """The breaker as JSON-ready values, for the admin API and tests.

        Returns:
            ``{"state": "open", "failures": 5, "reopens_in": 12.3, "trials_in_flight": 0,
            "in_flight": 2}``; ``reopens_in`` in seconds, None unless OPEN.
        """
        return {
            "state": self.state.value,
            "failures": self._storage._failures,
            "reopens_in": self.reopens_in(),
            "trials_in_flight": self._trials if self._storage._state == _HALF_OPEN else 0,
            "in_flight": self._in_flight,
        }

    def _transitioned(self, old: BreakerState, new: BreakerState) -> None:
        # Called by pybreaker inside open() / half_open() / close(), before it has updated
        # the storage; so the user callback waits for _flush(), when state reads `new`.
        self._trials = 0  # requests in flight now belong to the state that has ended
        self._pending = (old, new) if self._pending is None else (self._pending[0], new)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if (
            pending is not None
            and self._on_state_change is not None
            and pending[0] is not pending[1]
        ):
            self._on_state_change(self, pending[0], pending[1])

    def __repr__(self) -> str:
        state = self.state
        extra = f" failures={self._storage._failures}"
        if state is BreakerState.OPEN:
            extra += f" reopens_in={self.reopens_in() or 0.0:.1f}s"
        elif state is BreakerState.HALF_OPEN:
            trials = self._trials if self._storage._state == _HALF_OPEN else 0
            extra = f" trials={trials}/{self._max_trials}"
        return f"<Breaker {self.name} {state.name}{extra}>"
