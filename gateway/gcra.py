"""GCRA: the rate-limit arithmetic, as a pure function of (state, now, cost).

Rule: this module decides; it never reads a clock, awaits, or touches Redis. The stores in
``gateway.ratelimit_store`` keep the state (one float per key) and supply ``now``; the Redis
store runs these same operations, in the same order, in one Lua script
(``ratelimit_store.GCRA_SCRIPT``), and ``tests/gateway/test_ratelimit_store.py`` checks the
two agree bit for bit on a random sequence of steps.

The Generic Cell Rate Algorithm (ATM Forum TM 4.0, "virtual scheduling" form; the form
redis-cell and Brandur Leach's ``throttled`` use). For a ``Limit`` of ``rate`` per second and
``burst``:

* emission interval ``T = 1 / rate`` seconds; tolerance ``tau = T x burst`` seconds;
* state: ``TAT``, the theoretical arrival time (seconds, same clock as ``now``);
* a request of cost ``c >= 0`` at ``now``: ``tat = max(TAT, now)``, ``new_tat = tat + c x T``,
  ``allow_at = new_tat - tau``. Allowed iff ``now >= allow_at`` (then ``TAT = new_tat``);
  otherwise denied, ``TAT`` unchanged, ``retry_after = allow_at - now``.

Guarantee: the cost admitted over any window of ``D`` seconds is at most ``burst + rate x D``
(net of refunds, plus ``rate x EPSILON``). Proof sketch: after any step at time ``s``,
``TAT <= s + tau + EPSILON``; every step moves ``TAT`` up by at least its net admitted cost x T,
and ``TAT >= t0`` at a window's start; so ``net x T <= D + tau + EPSILON``.

Choices beyond the textbook:

* Exactly ``burst`` cost-1 requests pass at once on a fresh key (redis-cell admits
  ``max_burst + 1``; here ``tau = T x burst``, so ``burst`` is the bucket size).
* A negative cost is a refund (LLM tokens reserved at admission and not used): always
  allowed, ``TAT`` moves down by ``|c| x T`` but never below ``now``, so a refund can fill the
  bucket up to ``burst`` and no further; unused capacity is never banked.
* ``force=True`` records a positive cost whether or not it fits: reconciling tokens that were
  already spent (reserved 500, used 800: charge 300 more) must not be refused and forgotten.
  The bucket goes into debt (``TAT > now + tau``) and requests wait until it is paid off.
* A cost above ``burst`` is never admitted (the bucket cannot hold it); its ``retry_after`` is
  the time until the bucket is full, after which it is still refused. Callers that can see
  such costs (a token reservation larger than a per-minute budget) check ``cost > burst``
  themselves.
* Comparisons allow ``EPSILON`` = 1 microsecond, the resolution of Redis ``TIME``: TATs are
  sums of floats, so ``burst`` requests at one instant could otherwise land a rounding error
  past ``allow_at`` and lose the last one.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

__all__ = ["EPSILON", "Decision", "Limit", "Source", "gcra_update", "per_minute"]

EPSILON = 1e-6
"""Seconds of slack in every comparison: Redis ``TIME`` has microsecond resolution."""


class Source(enum.Enum):
    """Who answered a rate-limit call; ``.value`` is the metrics label.

    * REDIS: the shared store (one atomic script in Redis): exact across every gateway.
    * LOCAL: the in-process ``MemoryStore``, the configured store when no Redis is set.
    * FALLBACK: Redis was in trouble; the in-process store answered at the policy's share.
    * OPEN: Redis was in trouble and the policy fails open: allowed, nothing counted.
    * CLOSED: Redis was in trouble and the policy fails closed: refused, nothing counted.
    """

    REDIS = "redis"
    LOCAL = "local"
    FALLBACK = "fallback"
    OPEN = "open"
    CLOSED = "closed"

    @property
    def is_degraded(self) -> bool:
        """True for FALLBACK, OPEN and CLOSED: the shared store did not answer."""
        return self in _DEGRADED


_DEGRADED = frozenset({Source.FALLBACK, Source.OPEN, Source.CLOSED})


@dataclass(frozen=True, slots=True)
class Limit:
    """A GCRA limit: ``rate`` per second sustained, ``burst`` at once.

    Usage::

        Limit(rate=10, burst=20)   # 10 requests/s, up to 20 back to back
        per_minute(60_000)         # 60k LLM tokens a minute (rate 1000/s, burst 60k)

    Args:
        rate: cost units per second, > 0 and finite.
        burst: cost admitted at once on a full bucket, >= 1 and finite.
        name: label for headers and logs (``"rps"``, ``"tokens_per_minute"``); not used in
            the arithmetic.

    Raises:
        ValueError: ``rate`` or ``burst`` out of range.
    """

    rate: float
    burst: float
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not (0 < self.rate < math.inf):
            raise ValueError(f"rate must be > 0 per second and finite, not {self.rate}")
        if not (1 <= self.burst < math.inf):
            raise ValueError(f"burst must be >= 1 and finite, not {self.burst}")

    @property
    def emission_interval(self) -> float:
        """``T = 1 / rate``: seconds one unit of cost occupies."""
        return 1.0 / self.rate

    def scaled(self, share: float) -> Limit:
        """This limit at ``share`` of its rate and burst, burst at least 1.

        Args:
            share: in (0, 1], e.g. 0.5 when Redis is unreachable and each of two
                gateways limits on its own.

        Returns:
            ``Limit(rate x share, max(1, burst x share))`` with the same name.

        Raises:
            ValueError: ``share`` outside (0, 1].
        """
        if not (0 < share <= 1):
            raise ValueError(f"share must be in (0, 1], not {share}")
        return Limit(self.rate * share, max(1.0, self.burst * share), self.name)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one charge.

    Args:
        allowed: the cost was admitted (and counted); always True for a refund.
        remaining: cost-1 requests that would pass right now, after this one (0 when none).
        retry_after: seconds until this same request would pass; 0.0 when allowed.
        reset_after: seconds until the bucket is full again (``TAT - now``), >= 0.
        limit: the limit applied; scaled down when ``source`` is FALLBACK.
        source: who answered (``Source``); the stage counts and applies policies by it.
    """

    allowed: bool
    remaining: int
    retry_after: float
    reset_after: float
    limit: Limit
    source: Source = Source.LOCAL

    @property
    def is_degraded(self) -> bool:
        """True when the shared store did not answer (FALLBACK, OPEN or CLOSED)."""
        return self.source.is_degraded


def gcra_update(
    tat: float | None, now: float, cost: float, limit: Limit, *, force: bool = False
) -> tuple[Decision, float]:
    """Decide one request of ``cost`` at ``now`` against a key whose state is ``tat``.

    The Lua script in ``ratelimit_store`` repeats these operations in this order; keep them
    in step (the contract test compares the two exactly).

    Args:
        tat: the key's stored theoretical arrival time (seconds), or None for a new key
            (same as any ``tat <= now``).
        now: the current time, seconds on the clock ``tat`` was written with.
        cost: units to charge (1 for a request, N for N LLM tokens); negative refunds.
        limit: rate and burst.
        force: record the cost even if it does not fit (``allowed`` is then always True):
            for reconciling LLM tokens already spent. ``TAT`` may then pass ``now + tau``,
            a debt that later requests wait off; the window bound grows by the forced excess.

    Returns:
        ``(decision, tat_to_store)``. On a denial ``tat_to_store`` is ``max(tat, now)``,
        which means the same as the stored value (the key is unchanged in effect). A
        ``tat_to_store <= now`` means "full bucket": a store may delete the key instead.

    Raises:
        ValueError: ``cost`` is NaN or infinite.
    """
    cost = float(cost)
    if not math.isfinite(cost):
        raise ValueError(f"cost must be finite, not {cost}")
    interval = 1.0 / limit.rate
    tolerance = interval * limit.burst
    if tat is None or tat < now:
        tat = now
    new_tat = tat + cost * interval
    retry_after = 0.0
    if cost < 0:
        allowed = True
        if new_tat < now:
            new_tat = now
        stored = new_tat
    elif force:
        allowed = True
        stored = new_tat
    else:
        allow_at = new_tat - tolerance
        allowed = not (allow_at - now > EPSILON)
        if allowed:
            stored = new_tat
        else:
            stored = tat
            retry_after = allow_at - now
    reset_after = stored - now
    remaining = math.floor((tolerance - reset_after + EPSILON) / interval)
    remaining = max(0, min(remaining, math.floor(limit.burst)))
    return Decision(allowed, remaining, retry_after, reset_after, limit), stored


def per_minute(count: float, *, name: str = "") -> Limit:
    """A limit of ``count`` per minute: ``count`` at once on a fresh minute, ``count`` a minute
    sustained (rate ``count / 60`` per second, burst ``count``).

    Args:
        count: cost units per minute, >= 1.
        name: label for headers and logs.

    Raises:
        ValueError: ``count`` below 1 or not finite.
    """
    return Limit(rate=count / 60.0, burst=count, name=name)
