"""Passive outlier detection for one region's endpoints: Envoy's consecutive-5xx flavour.

Rule: this module decides from request outcomes the caller reports; it never touches a socket,
awaits or sleeps. Callers ask ``try_acquire(key)`` before sending to an endpoint and call
``release(key, success=...)`` exactly once per ``True``; both are O(1) and build nothing (no
containers, closures or exceptions).

States of one endpoint (Envoy, "Outlier detection", arch overview and ``OutlierDetection``
proto: consecutive_5xx, base_ejection_time, max_ejection_time, max_ejection_percent):

* ACTIVE: ``try_acquire()`` is True. A failure (5xx, connect error, timeout) adds one to its
  consecutive-failure count, a success resets it. At ``consecutive_failures`` it is ejected ->
  EJECTED, if the share cap allows; if not, it stays ACTIVE with its count, and the next
  failure after the cap has freed up ejects it.
* EJECTED: ``try_acquire()`` is False for ``min(base_ejection_time x times_ejected,
  max_ejection_time)`` seconds -> TRIAL (lazily: ``state()`` reads TRIAL once the time is up).
* TRIAL: ``try_acquire()`` is True while fewer than ``trial_requests`` requests are in flight
  as trials. A trial success -> ACTIVE; a trial failure -> EJECTED again, for longer
  (``times_ejected`` + 1).

Share cap: at most ``max(1, floor(max_ejection_share x n))`` of the region's ``n`` endpoints are
not ACTIVE (EJECTED or TRIAL) at once, so one endpoint can always be ejected, even the only
endpoint of a region. That region is then unavailable and requests fail over to another region
of the same residency zone, which is what we want: a bad endpoint must not keep taking traffic
because it is alone. Envoy compares the share already ejected with ``max_ejection_percent``
before each ejection and, since 1.7, ejects a host whenever none is ejected "regardless of the
value" (gRPC followed, grpc-java #9489); so it can end above the percentage (2 of 3 hosts at
50 %). Ours is a hard cap that still always allows one: with 3 endpoints at 0.5, one.

Decay: Envoy multiplies base_ejection_time by the times a host was ejected, and lowers that
multiplier again while the host stays healthy. Here ``times_ejected`` drops by one for each full
``base_ejection_time`` the endpoint spends ACTIVE (counted from its return, or from the start),
never below zero; so a host that fails once a day is ejected for 30 s each time, one that fails
again right after its return for 60 s, 90 s, ...

Outcomes that straddle a transition (``release()`` takes no ticket): EJECTED ignores every
outcome (those requests started before the ejection). TRIAL with no trial in flight ignores it
too; with trials in flight, the outcome is taken for a trial's (it frees a slot and counts).
That is exact unless requests from before the ejection are still running; then one of them may
stand in for a trial and let one extra trial through (see gateway.breaker for the reasoning).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.clock import Clock

__all__ = ["OutlierDetector", "OutlierState"]


class OutlierState(enum.Enum):
    """An endpoint's outlier state; ``.value`` is the JSON and metrics label."""

    ACTIVE = "active"
    EJECTED = "ejected"
    TRIAL = "trial"


_ACTIVE, _EJECTED, _TRIAL = OutlierState.ACTIVE, OutlierState.EJECTED, OutlierState.TRIAL


class _Host:
    """Mutable per-endpoint record."""

    __slots__ = (
        "consecutive",
        "decay_mark",
        "ejected_until",
        "in_flight",
        "state",
        "times_ejected",
        "trials",
    )

    def __init__(self, now: float) -> None:
        self.state = _ACTIVE  # stored state; EJECTED may already be due (reads TRIAL)
        self.consecutive = 0  # consecutive failures while ACTIVE
        self.times_ejected = 0  # the ejection-time multiplier, after decay
        self.decay_mark = now  # ACTIVE since (advanced by whole decay steps)
        self.ejected_until = 0.0  # clock time an EJECTED host may take a trial
        self.in_flight = 0  # acquired, not released
        self.trials = 0  # trial slots taken in the current TRIAL


class OutlierDetector:
    """One region's endpoints (keys are endpoint origins) and their ejections.

    Args:
        keys: the region's endpoint origins, e.g. ``"http://127.0.0.1:9201"``; unique.
        consecutive_failures: failures in a row that eject an endpoint (>= 1).
        base_ejection_time: seconds of the first ejection; the n-th lasts n times as long (> 0).
        max_ejection_time: upper bound of one ejection, seconds (>= base_ejection_time).
        max_ejection_share: share of the region's endpoints that may be out at once, 0 to 1;
            at least one endpoint may always be ejected.
        trial_requests: requests in flight at once to an endpoint in TRIAL (>= 1).
        clock: monotonic seconds.

    Raises:
        ValueError: no keys, a duplicate key, or a limit out of range.
    """

    __slots__ = (
        "_base",
        "_cap",
        "_clock",
        "_hosts",
        "_max_time",
        "_threshold",
        "_trial_requests",
    )

    def __init__(
        self,
        keys: Sequence[str],
        *,
        consecutive_failures: int = 5,
        base_ejection_time: float = 30.0,
        max_ejection_time: float = 300.0,
        max_ejection_share: float = 0.5,
        trial_requests: int = 1,
        clock: Clock,
    ) -> None:
        if not keys:
            raise ValueError("an outlier detector needs at least one endpoint")
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate endpoint keys in {list(keys)}")
        if consecutive_failures < 1:
            raise ValueError(f"consecutive_failures must be >= 1, not {consecutive_failures}")
        if not base_ejection_time > 0:
            raise ValueError(f"base_ejection_time must be > 0 seconds, not {base_ejection_time}")
        if not max_ejection_time >= base_ejection_time:
            raise ValueError(
                f"max_ejection_time ({max_ejection_time}) must be >= base_ejection_time "
                f"({base_ejection_time})"
            )
        if not 0.0 <= max_ejection_share <= 1.0:
            raise ValueError(f"max_ejection_share must be within [0, 1], not {max_ejection_share}")
        if trial_requests < 1:
            raise ValueError(f"trial_requests must be >= 1, not {trial_requests}")
        self._clock = clock
        self._threshold = consecutive_failures
        self._base = float(base_ejection_time)
        self._max_time = float(max_ejection_time)
        self._trial_requests = trial_requests
        # round() first: 0.29 * 100 is 28.999999999999996 in binary floating point
        self._cap = max(1, math.floor(round(max_ejection_share * len(keys), 9)))
        now = clock.now()
        self._hosts = {key: _Host(now) for key in keys}

    @property
    def max_ejected(self) -> int:
        """How many endpoints may be out (EJECTED or TRIAL) at once."""
        return self._cap

    def state(self, key: str) -> OutlierState:
        """The endpoint's state; an EJECTED endpoint whose time is up reads TRIAL.

        Raises:
            KeyError: ``key`` is not an endpoint of this region.
        """
        host = self._hosts[key]
        if host.state is _EJECTED and self._clock.now() >= host.ejected_until:
            return _TRIAL
        return host.state

    def try_acquire(self, key: str) -> bool:
        """May a request go to this endpoint now? O(1); builds no objects.

        Returns:
            True, and the caller owes exactly one ``release()``: ACTIVE; or TRIAL with a trial
            slot free (the slot is taken). False: EJECTED, or TRIAL with its slots taken.

        Raises:
            KeyError: ``key`` is not an endpoint of this region.
        """
        host = self._hosts[key]
        state = host.state
        if state is _ACTIVE:
            host.in_flight += 1
            return True
        if state is _EJECTED:
            if self._clock.now() < host.ejected_until:
                return False
            host.state = _TRIAL
            host.trials = 0
        if host.trials >= self._trial_requests:
            return False
        host.trials += 1
        host.in_flight += 1
        return True

    def release(self, key: str, *, success: bool | None) -> bool:
        """End one acquired request and learn from its outcome. O(1).

        Args:
            key: the endpoint's origin.
            success: True for a success; False for a failure (5xx, connect error, timeout);
                None when not judged (the client left, a 4xx): only frees the slot.

        Returns:
            True when this outcome ejected the endpoint (for the ejections counter).

        Raises:
            KeyError: ``key`` is not an endpoint of this region.
            RuntimeError: more releases than successful acquires (a caller bug).
        """
        host = self._hosts[key]
        if host.in_flight == 0:
            raise RuntimeError(f"{key}: release() without a successful try_acquire()")
        host.in_flight -= 1
        state = host.state
        if state is _ACTIVE:
            if success is None:
                return False
            if success:
                host.consecutive = 0
                return False
            host.consecutive += 1
            if host.consecutive < self._threshold or self.ejected_count() >= self._cap:
                return False
            self._eject(host, self._clock.now())
            return True
        if state is _EJECTED or host.trials == 0:
            return False  # started before the ejection (a due EJECTED has no trial either)
        host.trials -= 1
        if success is None:
            return False
        if success:
            host.state = _ACTIVE
            host.consecutive = 0
            host.trials = 0
            host.decay_mark = self._clock.now()
            return False
        self._eject(host, self._clock.now())  # already out (TRIAL): the count is unchanged
        return True

    def returns_in(self, key: str) -> float | None:
        """Seconds until an EJECTED endpoint may take a trial; None unless it reads EJECTED.

        Raises:
            KeyError: ``key`` is not an endpoint of this region.
        """
        host = self._hosts[key]
        if host.state is not _EJECTED:
            return None
        left = host.ejected_until - self._clock.now()
        return left if left > 0 else None

    def ejected_count(self) -> int:
        """Endpoints out of normal service now: EJECTED or TRIAL (what the share cap counts)."""
        # Counted, not tracked: records may be shared with a previous detector (adopt()), so a
        # request released there can move one; O(endpoints), read only at an ejection.
        return sum(h.state is not _ACTIVE for h in self._hosts.values())

    def snapshot(self) -> dict[str, dict[str, object]]:
        """Every endpoint's outlier state as JSON-ready values, for the admin API and tests.

        Returns:
            ``{origin: {"state": "ejected", "consecutive_failures": 0, "times_ejected": 2,
            "returns_in": 41.5, "trials_in_flight": 0, "in_flight": 1}}``; seconds.
        """
        now = self._clock.now()
        out: dict[str, dict[str, object]] = {}
        for key, host in self._hosts.items():
            if host.state is _ACTIVE:
                self._decay(host, now)
            state = self.state(key)
            out[key] = {
                "state": state.value,
                "consecutive_failures": host.consecutive,
                "times_ejected": host.times_ejected,
                "returns_in": self.returns_in(key),
                "trials_in_flight": host.trials if host.state is _TRIAL else 0,
                "in_flight": host.in_flight,
            }
        return out

    def times_ejected(self, key: str) -> int:
        """The endpoint's ejection multiplier now, after decay.

        Raises:
            KeyError: ``key`` is not an endpoint of this region.
        """
        host = self._hosts[key]
        if host.state is _ACTIVE:
            self._decay(host, self._clock.now())
        return host.times_ejected

    def adopt(self, previous: OutlierDetector) -> list[str]:
        """Take over the records of the endpoints this detector shares with ``previous``.

        For a config reload: the new detector of a region (new endpoint set or new limits)
        continues each kept endpoint's state, consecutive failures, ejection multiplier and
        in-flight count instead of starting it ACTIVE. The records are shared, not copied,
        so requests that started on ``previous`` and release there still count (a trial
        slot taken there is freed there). The share cap counts the adopted states: with
        fewer endpoints it may be exceeded until endpoints come back, never by a new
        ejection.

        Args:
            previous: the region's detector before the reload (same clock).

        Returns:
            The adopted keys.
        """
        adopted = [key for key in self._hosts if key in previous._hosts]
        for key in adopted:
            self._hosts[key] = previous._hosts[key]
        return adopted

    def _eject(self, host: _Host, now: float) -> None:
        if host.state is _ACTIVE:
            self._decay(host, now)
        host.times_ejected += 1
        host.ejected_until = now + min(self._base * host.times_ejected, self._max_time)
        host.state = _EJECTED
        host.consecutive = 0
        host.trials = 0

    def _decay(self, host: _Host, now: float) -> None:
        # Lazy: whole base_ejection_time steps spent ACTIVE since the mark, each worth one.
        steps = int((now - host.decay_mark) // self._base)
        if steps > 0:
            host.times_ejected = max(0, host.times_ejected - steps)
            host.decay_mark += steps * self._base

    def __repr__(self) -> str:
        out = self.ejected_count()
        return f"<OutlierDetector endpoints={len(self._hosts)} out={out}/{self._cap}>"
