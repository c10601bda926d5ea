"""Clocks: where the gateway's decisions read the time.

Rule: durations are float seconds on a monotonic clock, never wall time (B2). The decision
modules (breaker, outlier, budget) take a ``Clock`` and import it only for type checking, so
they stay free of asyncio; ``LoopClock`` is the production clock, ``ManualClock`` the test one
(Envoy ``TimeSource``, trio ``MockClock``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["Clock", "LoopClock", "ManualClock", "MonotonicClock"]


class Clock(Protocol):
    """A source of monotonic time."""

    def now(self) -> float:
        """Return the current time in seconds; only differences between readings mean anything."""
        ...


class LoopClock:
    """The running event loop's clock, so loop-time test tools (``looptime``) move it too.

    ``now()`` must be called from a coroutine or callback of a running loop.
    """

    __slots__ = ()

    def now(self) -> float:
        """Return ``asyncio.get_running_loop().time()`` (seconds).

        Raises:
            RuntimeError: no event loop is running in this thread.
        """
        return asyncio.get_running_loop().time()

    def __repr__(self) -> str:
        return "<LoopClock>"


class MonotonicClock:
    """``time.monotonic()``: for code that runs outside the loop (CLI tools, threads)."""

    __slots__ = ()

    def now(self) -> float:
        """Return ``time.monotonic()`` (seconds)."""
        return time.monotonic()

    def __repr__(self) -> str:
        return "<MonotonicClock>"


class ManualClock:
    """A clock that moves only when told to: tests advance it instead of sleeping.

    Args:
        start: the initial reading, seconds.
    """

    __slots__ = ("_now",)

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        """Return the current reading (seconds)."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward.

        Args:
            seconds: how far; zero is allowed.

        Raises:
            ValueError: ``seconds`` is negative or NaN (a monotonic clock never goes back).
        """
        if not seconds >= 0:  # also refuses NaN
            raise ValueError(f"a monotonic clock cannot go back ({seconds} s)")
        self._now += seconds

    def __repr__(self) -> str:
        return f"<ManualClock now={self._now:g}s>"
