"""Retries that cannot storm: a retry budget, jittered backoff, and upstream Retry-After.

Rule: this module decides; it never touches a socket, awaits or sleeps (the caller sleeps the
delay it returns, within its deadline).

* ``RetryBudget``: retries in flight stay below ``max(min_concurrent, ratio x active
  requests)`` (Envoy ``RetryBudget``: ``budget_percent`` and ``min_retry_concurrency``; gRPC's
  and Finagle's retry budgets share the idea). When every upstream fails, retries add at most
  ``ratio`` to the load instead of multiplying it by the attempt count.
* ``backoff_delay``: "full jitter" (Marc Brooker, "Exponential Backoff And Jitter", AWS
  Architecture Blog, 2015), so retries of requests that failed together spread out.
* ``parse_retry_after``: RFC 9110 §10.2.3, both forms.
"""

from __future__ import annotations

import random
from datetime import UTC
from email.utils import parsedate_to_datetime
from fractions import Fraction

__all__ = ["RetryBudget", "backoff_delay", "parse_retry_after"]


class RetryBudget:
    """Caps retries in flight at a share of the requests in flight (one per process).

    ``active`` counts client requests (``request_started()`` / ``request_finished()``, once per
    request, not per attempt); a retry holds a budget slot from ``try_acquire_retry()`` to
    ``release_retry()``. The limit is ``max(min_concurrent, floor(ratio x active))``, computed
    in integers (``ratio`` as a fraction), so it is exact: 20 % of 15 requests is 3 retries.

    Args:
        ratio: retries in flight per active request, e.g. 0.2 for 20 % (>= 0).
        min_concurrent: retries always allowed in flight, however few requests (>= 0); keeps
            a quiet gateway able to retry at all.

    Raises:
        ValueError: a negative argument.
    """

    __slots__ = ("_active", "_den", "_min", "_num", "_retries", "exhausted_total")

    def __init__(self, *, ratio: float = 0.2, min_concurrent: int = 3) -> None:
        if not ratio >= 0:
            raise ValueError(f"ratio must be >= 0, not {ratio}")
        if min_concurrent < 0:
            raise ValueError(f"min_concurrent must be >= 0, not {min_concurrent}")
        # 0.2 -> 1/5 (the float 0.2 is 0.2000000000000000111...)
        fraction = Fraction(ratio).limit_denominator(1_000_000)
        self._num, self._den = fraction.numerator, fraction.denominator
        self._min = min_concurrent
        self._active = 0
        self._retries = 0
        self.exhausted_total = 0
        """Retries refused since start (a counter, for metrics)."""

    @property
    def active(self) -> int:
        """Client requests in flight."""
        return self._active

    @property
    def retries_in_flight(self) -> int:
        """Retries holding a budget slot."""
        return self._retries

    @property
    def limit(self) -> int:
        """Retries allowed in flight now: ``max(min_concurrent, floor(ratio x active))``."""
        return max(self._min, self._num * self._active // self._den)

    def request_started(self) -> None:
        """Count one more client request in flight."""
        self._active += 1

    def request_finished(self) -> None:
        """Count one client request less.

        Raises:
            RuntimeError: more finishes than starts (a caller bug).
        """
        if self._active == 0:
            raise RuntimeError("request_finished() without request_started()")
        self._active -= 1

    def try_acquire_retry(self) -> bool:
        """Take a retry slot if the budget has one. O(1).

        Returns:
            True, and the caller owes one ``release_retry()``; False when ``limit`` retries
            are already in flight (``exhausted_total`` grows by one).
        """
        retries = self._retries
        # retries < floor(num/den x active)  <=>  (retries + 1) x den <= num x active
        if retries < self._min or (retries + 1) * self._den <= self._num * self._active:
            self._retries = retries + 1
            return True
        self.exhausted_total += 1
        return False

    def release_retry(self) -> None:
        """Give a retry slot back.

        Raises:
            RuntimeError: more releases than acquired slots (a caller bug).
        """
        if self._retries == 0:
            raise RuntimeError("release_retry() without a successful try_acquire_retry()")
        self._retries -= 1

    def snapshot(self) -> dict[str, object]:
        """JSON-ready state: ``{"active": 40, "retries_in_flight": 2, "limit": 8,
        "exhausted_total": 0}``."""
        return {
            "active": self._active,
            "retries_in_flight": self._retries,
            "limit": self.limit,
            "exhausted_total": self.exhausted_total,
        }

    def __repr__(self) -> str:
        return (
            f"<RetryBudget retries={self._retries}/{self.limit} active={self._active} "
            f"exhausted_total={self.exhausted_total}>"
        )


def backoff_delay(
    retry: int, *, base: float = 0.025, cap: float = 0.25, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number ``retry``: exponential backoff with full jitter.

    ``uniform(0, min(cap, base x 2 ** (retry - 1)))``: with the defaults, up to 25 ms before
    the first retry, 50 ms before the second, ..., never more than 250 ms.

    Args:
        retry: 1 for the first retry, 2 for the second, ...
        base: upper bound of the first delay, seconds.
        cap: upper bound of any delay, seconds.
        rng: the random source (tests pass a seeded one); default the module's.

    Returns:
        The delay in seconds, within ``[0, min(cap, base x 2 ** (retry - 1))]``.

    Raises:
        ValueError: ``retry`` < 1, or a negative ``base`` or ``cap``.
    """
    if retry < 1:
        raise ValueError(f"retries count from 1, not {retry}")
    if not (base >= 0 and cap >= 0):
        raise ValueError(f"base and cap must be >= 0 seconds, not {base} and {cap}")
    # 2 ** 63 x any useful base is far above any cap; stops the float overflowing.
    ceiling = cap if retry > 63 else min(cap, base * (1 << (retry - 1)))
    return (rng or random).uniform(0.0, ceiling)


def parse_retry_after(value: str | None, *, now_epoch: float) -> float | None:
    """Seconds an upstream asks us to wait, from its ``Retry-After`` field (RFC 9110 §10.2.3).

    ``Retry-After = HTTP-date / delay-seconds``; delay-seconds is ``1*DIGIT``, HTTP-date any of
    the three forms RFC 9110 §5.6.7 makes recipients accept (IMF-fixdate, RFC 850, asctime),
    always in UTC.

    Args:
        value: the field value, or None when the field is absent.
        now_epoch: wall-clock now, Unix seconds (``time.time()``): an HTTP-date is wall time,
            the one place this module reads it.

    Returns:
        Seconds, >= 0 (a date in the past gives 0.0); None when absent or invalid (empty,
        ``"-5"``, ``"1.5"``, not a date), so the caller falls back to its own backoff.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        try:
            return float(int(value))
        except (ValueError, OverflowError):  # beyond int's digit limit, or float's range
            return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # asctime and "-0000" forms parse naive; HTTP-dates are UTC
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_epoch)
