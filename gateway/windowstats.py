"""Rolling one-minute request statistics per zone and per region, for the admin status page.

Prometheus counters answer "how many since start"; an operator looking at the status page
wants "what is happening now". This module keeps the last ``WINDOW_SECONDS`` in one-second
buckets, in a ring: each bucket holds integer counters (requests, 5xx errors, cache lookups and
hits, rate-limit rejections) and a fixed log-bucketed latency histogram, so memory is bounded
by (cells x 60 x ``LATENCY_BUCKETS``) integers whatever the traffic, and ``record()`` is a few
integer adds plus one ``math.frexp``. Percentiles are computed only when ``snapshot()`` is
asked for (every two seconds by the status page), by summing the live buckets.

Rule: this module decides nothing and does no I/O; it never imports aiohttp or asyncio.

A cell is one of: ``"all"`` (every answered request), a zone (requests whose zone was
decided), a region (requests that reached an endpoint of it). A cache hit has a zone but no
region, so cache ratios are most meaningful per zone; a forwarded request counts in both.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.clock import Clock
    from gateway.exchange import Exchange

__all__ = [
    "CACHE_HITS",
    "LATENCY_BUCKETS",
    "WINDOW_SECONDS",
    "Cell",
    "WindowStats",
    "latency_bucket",
    "latency_bucket_upper",
]

WINDOW_SECONDS = 60  # the window the status page shows
# The latency histogram: _SUB buckets per power of two, from about 61 us up to 64 s. A bucket
# spans 1/(2*_SUB) of a frexp mantissa in [0.5, 1), so its upper bound is at most 12.5 %
# above its lower: 160 buckets keep a percentile that close for any traffic.
_SUB = 8
_E_MIN = -13
_E_MAX = 6
LATENCY_BUCKETS = (_E_MAX - _E_MIN + 1) * _SUB
# cache results served without asking a model or origin (as ratelimit's token refund counts)
CACHE_HITS = frozenset({"hit", "coalesced", "stale"})
_NOT_LOOKUPS = frozenset({"bypass"})


def latency_bucket(seconds: float) -> int:
    """Index of the histogram bucket that holds ``seconds``.

    Args:
        seconds: a duration; values below about 61 us land in bucket 0, above 64 s in the last.

    Returns:
        An index in ``range(LATENCY_BUCKETS)``.
    """
    if seconds <= 0.0:
        return 0
    mantissa, exponent = math.frexp(seconds)  # seconds = mantissa * 2**exponent, m in [0.5, 1)
    if exponent < _E_MIN:
        return 0
    if exponent > _E_MAX:
        return LATENCY_BUCKETS - 1
    return (exponent - _E_MIN) * _SUB + int((mantissa - 0.5) * 2 * _SUB)


def latency_bucket_upper(index: int) -> float:
    """The upper bound of bucket ``index``, seconds (what a percentile in it reports)."""
    exponent, sub = divmod(index, _SUB)
    return (0.5 + (sub + 1) / (2 * _SUB)) * 2.0 ** (exponent + _E_MIN)


class _Slot:
    """One second of one cell."""

    __slots__ = ("cache_hits", "cache_lookups", "errors", "latency", "rate_limited", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.cache_hits = 0
        self.cache_lookups = 0
        self.rate_limited = 0
        self.latency = [0] * LATENCY_BUCKETS


class Cell:
    """The last ``WINDOW_SECONDS`` of one zone, region or ``"all"``: a ring of one-second slots.

    A slot is reused (zeroed) when its second comes round again, so a quiet cell costs no work.
    """

    __slots__ = ("_seconds", "_slots")

    def __init__(self) -> None:
        self._slots = [_Slot() for _ in range(WINDOW_SECONDS)]
        self._seconds = [-1] * WINDOW_SECONDS  # which second each slot currently holds

    def _slot(self, second: int) -> _Slot:
        i = second % WINDOW_SECONDS
        slot = self._slots[i]
        if self._seconds[i] != second:
            self._seconds[i] = second
            slot.requests = slot.errors = slot.cache_hits = slot.cache_lookups = 0
            slot.rate_limited = 0
            slot.latency = [0] * LATENCY_BUCKETS
        return slot

    def add(
        self,
        second: int,
        *,
        error: bool,
        bucket: int,
        cache_lookup: bool,
        cache_hit: bool,
        rate_limited: bool,
    ) -> None:
        """Count one request answered during ``second`` (whole seconds of the clock)."""
        slot = self._slot(second)
        slot.requests += 1
        slot.errors += error
        slot.cache_lookups += cache_lookup
        slot.cache_hits += cache_hit
        slot.rate_limited += rate_limited
        slot.latency[bucket] += 1

    def summary(self, now: float, span: float) -> dict[str, object]:
        """Totals and rates over the seconds in ``(now - WINDOW_SECONDS, now]``.

        Args:
            now: clock seconds.
            span: the seconds the rates divide by (the window, shorter just after start).

        Returns:
            ``{"requests", "errors", "cache_lookups", "cache_hits", "rate_limited"}`` (counts),
            ``"requests_per_s"``, ``"error_ratio"`` and ``"cache_hit_ratio"`` (0..1, None
            with no request or lookup), ``"p50_ms"`` and ``"p99_ms"`` (None with no request;
            the upper bound of the histogram bucket, so at most 12.5 % high).
        """
        current = math.floor(now)
        requests = errors = hits = lookups = limited = 0
        histogram = [0] * LATENCY_BUCKETS
        for i, second in enumerate(self._seconds):
            if not current - WINDOW_SECONDS < second <= current:
                continue
            slot = self._slots[i]
            requests += slot.requests
            errors += slot.errors
            hits += slot.cache_hits
            lookups += slot.cache_lookups
            limited += slot.rate_limited
            histogram = [a + b for a, b in zip(histogram, slot.latency, strict=True)]
        return {
            "requests": requests,
            "requests_per_s": round(requests / span, 3),
            "errors": errors,
            "error_ratio": round(errors / requests, 4) if requests else None,
            "cache_lookups": lookups,
            "cache_hits": hits,
            "cache_hit_ratio": round(hits / lookups, 4) if lookups else None,
            "rate_limited": limited,
            "p50_ms": _percentile_ms(histogram, requests, 0.50),
            "p99_ms": _percentile_ms(histogram, requests, 0.99),
        }


def _percentile_ms(histogram: list[int], total: int, q: float) -> float | None:
    if not total:
        return None
    rank = math.ceil(q * total)  # the smallest sample with at least q of them at or below it
    seen = 0
    for index, count in enumerate(histogram):
        seen += count
        if seen >= rank:
            return round(latency_bucket_upper(index) * 1000, 3)
    raise AssertionError("histogram holds fewer samples than its total")  # pragma: no cover


class WindowStats:
    """Rolling one-minute statistics of answered requests per zone and per region.

    Usage::

        window = WindowStats(clock=LoopClock())
        window.record(zone="eu", region="eu-west-1", status=200, latency=0.012)
        window.snapshot()["zones"]["eu"]["requests_per_s"]

    Args:
        clock: monotonic seconds; whole seconds of it are the buckets. Rates divide by the
            time since the first reading (record or snapshot), at most the window.
    """

    def __init__(self, *, clock: Clock) -> None:
        self._clock = clock
        self._started: float | None = None  # first reading; not in __init__: a LoopClock
        # can only be read on a running loop, and servers are often built before one runs
        self._all = Cell()
        self._zones: dict[str, Cell] = {}
        self._regions: dict[str, Cell] = {}

    def record(
        self,
        *,
        zone: str | None,
        region: str | None,
        status: int | None,
        latency: float,
        cache_result: str | None = None,
        ratelimit_result: str | None = None,
        now: float | None = None,
    ) -> None:
        """Count one answered request; O(1), no allocation unless a second rolls over.

        Args:
            zone: the residency zone decided for it; None before one was (404, 400, ...).
            region: the region of the endpoint that answered; None when none did.
            status: the status sent to the client; 5xx counts as an error; None when the
                client left before an answer (counted, not as an error).
            latency: seconds from the request's arrival to the end of its answer.
            cache_result: the cache stage's verdict (``"hit"``, ``"miss"``, ...); None: no
                cache on the route. ``"bypass"`` is not a lookup.
            ratelimit_result: the rate-limit stage's verdict; ``"limited"`` (429) counts.
            now: when the answer ended, clock seconds; None: read the clock.
        """
        if now is None:
            now = self._clock.now()
        if self._started is None:
            self._started = now
        second = math.floor(now)
        error = status is not None and status >= 500
        bucket = latency_bucket(latency)
        lookup = cache_result is not None and cache_result not in _NOT_LOOKUPS
        hit = cache_result in CACHE_HITS
        limited = ratelimit_result == "limited"
        for cell in (
            self._all,
            None if zone is None else self._cell(self._zones, zone),
            None if region is None else self._cell(self._regions, region),
        ):
            if cell is not None:
                cell.add(
                    second, error=error, bucket=bucket, cache_lookup=lookup, cache_hit=hit,
                    rate_limited=limited,
                )  # fmt: skip

    @staticmethod
    def _cell(cells: dict[str, Cell], name: str) -> Cell:
        cell = cells.get(name)
        if cell is None:
            cell = cells[name] = Cell()
        return cell

    def record_exchange(self, ex: Exchange, end: float | None = None) -> None:
        """``record()`` the fields of a finished exchange.

        Args:
            ex: the exchange; ``ex.start`` and ``end`` bound its latency.
            end: when its answer ended, clock seconds; None: now.
        """
        if end is None:
            end = self._clock.now()
        self.record(
            zone=ex.zone,
            region=ex.endpoint.region if ex.endpoint is not None else None,
            status=ex.status,
            latency=end - ex.start,
            cache_result=ex.cache_result,
            ratelimit_result=ex.ratelimit_result,
            now=end,
        )

    def snapshot(self) -> dict[str, object]:
        """The window as JSON-ready values, for ``/status`` and the status page.

        Zones and regions appear once they have had a request (cells are never dropped:
        zones and regions come from the config, so their number is bounded).

        Returns:
            ``{"window_s": 60, "span_s": seconds the rates divide by, "all": summary,
            "zones": {zone: summary}, "regions": {region: summary}}``, each summary as
            ``Cell.summary`` describes.
        """
        now = self._clock.now()
        if self._started is None:
            self._started = now
        span = max(1.0, min(float(WINDOW_SECONDS), now - self._started))
        return {
            "window_s": WINDOW_SECONDS,
            "span_s": round(span, 3),
            "all": self._all.summary(now, span),
            "zones": {z: c.summary(now, span) for z, c in sorted(self._zones.items())},
            "regions": {r: c.summary(now, span) for r, c in sorted(self._regions.items())},
        }

    def __repr__(self) -> str:
        return f"<WindowStats zones={sorted(self._zones)} regions={sorted(self._regions)}>"
