"""Rolling window stats with a manual clock: bucketing, expiry, percentiles, classification."""

from __future__ import annotations

import math
import random

import pytest

from gateway.clock import ManualClock
from gateway.windowstats import (
    LATENCY_BUCKETS,
    WINDOW_SECONDS,
    WindowStats,
    latency_bucket,
    latency_bucket_upper,
)


def test_latency_buckets_bound_each_sample_within_one_eighth() -> None:
    rng = random.Random(7)
    samples = [10 ** rng.uniform(-4, math.log10(60)) for _ in range(2000)]
    for seconds in [*samples, 0.0001, 0.001, 0.5, 1.0, 2.0, 63.9]:
        index = latency_bucket(seconds)
        upper = latency_bucket_upper(index)
        lower = latency_bucket_upper(index - 1) if index else 0.0
        assert lower <= seconds < upper, (seconds, index)
        assert upper <= seconds * 1.125  # a bucket is at most 12.5 % of its lower bound wide


def test_latency_buckets_clamp_at_both_ends() -> None:
    assert latency_bucket(0.0) == latency_bucket(-1.0) == latency_bucket(1e-9) == 0
    assert latency_bucket(3600.0) == latency_bucket(1e9) == LATENCY_BUCKETS - 1
    uppers = [latency_bucket_upper(i) for i in range(LATENCY_BUCKETS)]
    assert uppers == sorted(uppers)
    assert len(set(uppers)) == LATENCY_BUCKETS


def record(window: WindowStats, n: int = 1, **fields: object) -> None:
    base: dict[str, object] = {"zone": "eu", "region": "eu-west-1", "status": 200,
                               "latency": 0.01}  # fmt: skip
    for _ in range(n):
        window.record(**{**base, **fields})  # type: ignore[arg-type]


def test_requests_leave_the_window_after_sixty_seconds(manual_clock: ManualClock) -> None:
    window = WindowStats(clock=manual_clock)
    record(window, 3)
    manual_clock.advance(WINDOW_SECONDS - 0.5)
    record(window, 2)
    assert window.snapshot()["all"]["requests"] == 5  # type: ignore[index]
    manual_clock.advance(0.5)  # second 0 has now left (now - 60, now]
    assert window.snapshot()["all"]["requests"] == 2  # type: ignore[index]
    manual_clock.advance(WINDOW_SECONDS)
    snap = window.snapshot()
    assert snap["all"]["requests"] == 0  # type: ignore[index]
    assert snap["all"]["p99_ms"] is None  # type: ignore[index]
    assert snap["zones"]["eu"]["error_ratio"] is None  # type: ignore[index]


def test_a_reused_slot_forgets_its_old_second(manual_clock: ManualClock) -> None:
    window = WindowStats(clock=manual_clock)
    record(window, 4, status=503, latency=2.0)
    manual_clock.advance(WINDOW_SECONDS)  # the same ring slot, one lap later
    record(window, 1)
    summary = window.snapshot()["zones"]["eu"]  # type: ignore[index]
    assert (summary["requests"], summary["errors"]) == (1, 0)
    assert summary["p99_ms"] == pytest.approx(10.0, rel=0.125)


def test_rates_divide_by_the_time_seen_up_to_the_window(manual_clock: ManualClock) -> None:
    window = WindowStats(clock=manual_clock)
    record(window, 10)
    manual_clock.advance(5)
    assert window.snapshot()["all"]["requests_per_s"] == 2.0  # type: ignore[index]
    for _ in range(120):  # one request a second for two minutes
        manual_clock.advance(1)
        record(window)
    assert window.snapshot()["all"]["requests_per_s"] == 1.0  # type: ignore[index]


@pytest.mark.parametrize(("slow", "p99_ms"), [(1, 10.0), (2, 2000.0)])
def test_p99_is_the_bucket_of_the_99th_percent_sample(
    manual_clock: ManualClock, slow: int, p99_ms: float
) -> None:
    window = WindowStats(clock=manual_clock)
    record(window, 100 - slow, latency=0.010)
    record(window, slow, latency=2.0)
    manual_clock.advance(30)  # spread over two slots: summed across the window
    summary = window.snapshot()["regions"]["eu-west-1"]  # type: ignore[index]
    assert summary["p99_ms"] == pytest.approx(p99_ms, rel=0.125)
    assert summary["p99_ms"] >= p99_ms  # an upper bound, never below the sample
    assert summary["p50_ms"] == pytest.approx(10.0, rel=0.125)


def test_each_outcome_counts_where_it_belongs(manual_clock: ManualClock) -> None:
    window = WindowStats(clock=manual_clock)
    record(window, status=502)
    record(window, status=404)
    record(window, status=None)  # the client left: a request, not an error
    for result in ("hit", "coalesced", "stale", "miss", "revalidated", "bypass"):
        record(window, region=None, cache_result=result)
    record(window, region=None, status=429, ratelimit_result="limited")
    record(window, ratelimit_result="allowed")
    record(window, zone=None, region=None, status=400)  # refused before a zone was decided
    snap = window.snapshot()
    eu = snap["zones"]["eu"]  # type: ignore[index]
    assert eu["requests"] == 11
    assert eu["errors"] == 1
    assert eu["cache_lookups"] == 5  # bypass is no lookup
    assert eu["cache_hits"] == 3
    assert eu["cache_hit_ratio"] == 0.6
    assert eu["rate_limited"] == 1
    assert snap["regions"]["eu-west-1"]["requests"] == 4  # type: ignore[index]
    assert snap["all"]["requests"] == 12  # type: ignore[index]
    assert list(snap["zones"]) == ["eu"]  # type: ignore[call-overload]


def test_window_memory_does_not_grow_with_traffic(manual_clock: ManualClock) -> None:
    window = WindowStats(clock=manual_clock)
    rng = random.Random(1)
    for _ in range(20_000):
        manual_clock.advance(rng.random() / 50)
        record(window, latency=rng.random())
    cell = window._zones["eu"]
    assert len(cell._slots) == WINDOW_SECONDS
    assert {len(slot.latency) for slot in cell._slots} == {LATENCY_BUCKETS}
    assert window.snapshot()["zones"]["eu"]["requests"] <= 60 * 120  # type: ignore[index]
