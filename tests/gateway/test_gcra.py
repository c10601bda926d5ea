"""GCRA arithmetic with plain numbers: burst, spacing, retry_after, refunds, the window bound."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from collections.abc import Sequence

import pytest

from gateway.gcra import EPSILON, Decision, Limit, Source, gcra_update, per_minute

# Times near 0, mid-range, and near Unix now (where a float resolves only ~240 ns).
NOWS = [0.0, 12_345.678, 1_700_000_000.123]


def run(limit: Limit, steps: Sequence[tuple[float, float]]) -> list[Decision]:
    """Charge each (now, cost) in turn on one key; return the decisions."""
    tat: float | None = None
    decisions = []
    for now, cost in steps:
        decision, tat = gcra_update(tat, now, cost, limit)
        decisions.append(decision)
    return decisions


@pytest.mark.parametrize("now", NOWS)
def test_fresh_key_admits_exactly_burst_at_once(now: float) -> None:
    limit = Limit(rate=10, burst=5)
    decisions = run(limit, [(now, 1)] * 6)
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    assert decisions[4].reset_after == pytest.approx(0.5, abs=1e-6)
    assert decisions[5].retry_after == pytest.approx(0.1, abs=1e-6)


@pytest.mark.parametrize("now", NOWS)
def test_after_the_burst_one_request_per_emission_interval(now: float) -> None:
    limit = Limit(rate=4, burst=2)  # T = 0.25 s
    tat: float | None = None
    for _ in range(2):
        decision, tat = gcra_update(tat, now, 1, limit)
        assert decision.allowed
    for k in range(1, 9):
        at = now + k * 0.25
        decision, tat = gcra_update(tat, at, 1, limit)
        assert decision.allowed
        assert decision.remaining == 0
        decision, tat = gcra_update(tat, at, 1, limit)
        assert not decision.allowed
        assert decision.retry_after == pytest.approx(0.25, abs=1e-6)


def test_retry_after_is_exact() -> None:
    limit = Limit(rate=2, burst=3)  # T = 0.5 s
    tat: float | None = None
    for _ in range(3):
        _, tat = gcra_update(tat, 100.0, 1, limit)
    denied, tat = gcra_update(tat, 100.2, 1, limit)
    assert not denied.allowed
    assert denied.retry_after == pytest.approx(0.3, abs=1e-9)
    assert denied.reset_after == pytest.approx(1.3, abs=1e-9)
    early, _ = gcra_update(tat, 100.2 + denied.retry_after - 1e-3, 1, limit)
    assert not early.allowed
    on_time, _ = gcra_update(tat, 100.2 + denied.retry_after, 1, limit)
    assert on_time.allowed
    assert on_time.retry_after == 0.0


def test_a_denial_leaves_the_state_unchanged() -> None:
    limit = Limit(rate=1, burst=2)
    first, tat = gcra_update(None, 50.0, 2, limit)
    assert first.allowed
    assert tat == 52.0
    denied, after = gcra_update(tat, 50.5, 2, limit)
    assert not denied.allowed
    assert after == tat
    assert denied.retry_after == pytest.approx(1.5)
    # a cheaper request still fits where the expensive one did not
    assert denied.remaining == 0
    cheap, _ = gcra_update(after, 50.5, 0.5, limit)
    assert cheap.allowed


def test_a_cost_above_burst_is_never_admitted() -> None:
    limit = Limit(rate=1, burst=5)
    decision, tat = gcra_update(None, 0.0, 6, limit)
    assert not decision.allowed
    assert tat == 0.0
    assert decision.retry_after == pytest.approx(1.0)
    later, _ = gcra_update(tat, 1000.0, 6, limit)
    assert not later.allowed


def test_refund_gives_capacity_back() -> None:
    limit = Limit(rate=1, burst=10)
    reserved, tat = gcra_update(None, 0.0, 8, limit)
    assert reserved.allowed
    assert reserved.remaining == 2
    refund, tat = gcra_update(tat, 0.0, -5, limit)  # used 3 of the 8 reserved
    assert refund.allowed
    assert refund.remaining == 7
    assert refund.reset_after == pytest.approx(3.0)
    more, _ = gcra_update(tat, 0.0, 7, limit)
    assert more.allowed
    assert more.remaining == 0


@pytest.mark.parametrize("now", NOWS)
def test_refund_never_lowers_tat_below_now(now: float) -> None:
    limit = Limit(rate=1, burst=3)
    refund, tat = gcra_update(None, now, -100, limit)
    assert refund.allowed
    assert tat == now
    assert refund.reset_after == 0.0
    assert refund.remaining == 3
    # nothing was banked: still exactly `burst` at once
    assert [d.allowed for d in run(limit, [(now, 1)] * 4)] == [True] * 3 + [False]
    _, tat = gcra_update(None, now, 2, limit)
    _, tat = gcra_update(tat, now + 5, -1, limit)  # TAT (now+2) is in the past at now+5
    assert tat == now + 5


def test_forced_charge_records_a_debt_that_later_requests_wait_off() -> None:
    limit = per_minute(600)  # 10 tokens/s, burst 600
    reserved, tat = gcra_update(None, 0.0, 500, limit)
    assert reserved.allowed
    assert reserved.remaining == 100
    unforced, same = gcra_update(tat, 0.0, 300, limit)
    assert not unforced.allowed
    assert same == tat
    forced, tat = gcra_update(tat, 0.0, 300, limit, force=True)  # used 800 tokens, not 500
    assert forced.allowed
    assert forced.remaining == 0
    assert forced.retry_after == 0.0
    assert tat == pytest.approx(80.0)
    assert forced.reset_after == pytest.approx(80.0)
    blocked, _ = gcra_update(tat, 10.0, 1, limit)  # debt of 200 tokens = 20 s, plus T
    assert not blocked.allowed
    assert blocked.retry_after == pytest.approx(10.1)


def test_zero_cost_peeks() -> None:
    limit = Limit(rate=1, burst=2)
    peek, tat = gcra_update(None, 0.0, 0, limit)
    assert peek.allowed
    assert peek.remaining == 2
    assert tat == 0.0


def test_per_minute_admits_count_at_once_and_count_per_minute() -> None:
    limit = per_minute(60, name="rpm")
    assert limit == Limit(rate=1.0, burst=60)
    assert limit.name == "rpm"
    decisions = run(limit, [(0.0, 1)] * 61)
    assert sum(d.allowed for d in decisions) == 60
    assert decisions[-1].retry_after == pytest.approx(1.0)
    # one more each second; 60 more over the next minute
    minute = run(limit, [(0.0, 1)] * 60 + [(float(s), 1) for s in range(1, 61)])
    assert sum(d.allowed for d in minute[60:]) == 60

    tokens = per_minute(6000)
    tat: float | None = None
    reserve, tat = gcra_update(tat, 0.0, 6000, tokens)
    assert reserve.allowed
    assert reserve.remaining == 0
    denied, tat = gcra_update(tat, 0.0, 100, tokens)
    assert not denied.allowed
    assert denied.retry_after == pytest.approx(1.0)


def test_fractional_burst_and_rate() -> None:
    limit = Limit(rate=1 / 3, burst=2.5)  # T = 3 s
    decisions = run(limit, [(0.0, 1)] * 3)
    assert [d.allowed for d in decisions] == [True, True, False]
    assert decisions[2].retry_after == pytest.approx(1.5)
    assert decisions[0].remaining == 1


@pytest.mark.parametrize(
    ("rate", "burst"),
    [(0, 1), (-1, 1), (math.inf, 1), (math.nan, 1), (1, 0.5), (1, math.inf), (1, math.nan)],
)
def test_limit_rejects_out_of_range_values(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        Limit(rate=rate, burst=burst)


@pytest.mark.parametrize("cost", [math.nan, math.inf, -math.inf])
def test_cost_must_be_finite(cost: float) -> None:
    with pytest.raises(ValueError, match="cost must be finite"):
        gcra_update(None, 0.0, cost, Limit(rate=1, burst=1))


def test_scaled_limit_keeps_burst_at_least_one() -> None:
    limit = Limit(rate=10, burst=20, name="rps")
    assert limit.scaled(0.5) == Limit(rate=5, burst=10)
    assert limit.scaled(0.5).name == "rps"
    assert Limit(rate=1, burst=1).scaled(0.25) == Limit(rate=0.25, burst=1)
    with pytest.raises(ValueError, match="share"):
        limit.scaled(0)
    with pytest.raises(ValueError, match="share"):
        limit.scaled(1.5)
    assert limit.emission_interval == 0.1


def test_decisions_say_who_answered() -> None:
    decision, _ = gcra_update(None, 0.0, 1, Limit(rate=1, burst=1))
    assert decision.source is Source.LOCAL
    assert not decision.is_degraded
    assert {s for s in Source if s.is_degraded} == {Source.FALLBACK, Source.OPEN, Source.CLOSED}


def max_window_excess(events: list[tuple[float, float]], rate: float) -> float:
    """max over windows [t_i, t_j] of (net cost admitted in it) - rate x (t_j - t_i)."""
    best_start = -math.inf  # max over i <= j of (rate x t_i - admitted before i)
    admitted = 0.0
    worst = -math.inf
    for t, cost in events:
        best_start = max(best_start, rate * t - admitted)
        admitted += cost
        worst = max(worst, admitted - rate * t + best_start)
    return worst


@pytest.mark.parametrize(
    ("seed", "rate", "burst"),
    [(0, 0.5, 1), (1, 10, 5), (2, 1000 / 60, 1000), (3, 3, 2.5), (4, 7, 40)],
)
@pytest.mark.parametrize("now", [0.0, 1_700_000_000.0])
def test_admitted_cost_never_exceeds_burst_plus_rate_times_window(
    seed: int, rate: float, burst: float, now: float
) -> None:
    rng = random.Random(seed)
    limit = Limit(rate=rate, burst=burst)
    interval = 1 / rate
    tat: float | None = None
    events: list[tuple[float, float]] = []
    for _ in range(3000):
        now += rng.expovariate(1 / (0.6 * interval)) if rng.random() < 0.9 else 0.0
        cost = rng.choice([1, 1, 1, 2, 3, 0.5, min(burst, 4)])
        if rng.random() < 0.1:
            cost = -rng.choice([1, 2, 0.5])  # refunds count as negative admitted cost
        decision, tat = gcra_update(tat, now, cost, limit)
        assert tat >= now
        if decision.allowed:
            events.append((now, cost))
    excess = max_window_excess(events, rate)
    slack = rate * EPSILON + 1e-6 * burst
    assert excess <= burst + slack
    assert excess >= burst - 4  # the load saturates the limit: the bound is nearly reached


def test_module_does_no_io() -> None:
    probe = (
        "import sys; import gateway.gcra; "
        "loaded = {'aiohttp', 'redis', 'asyncio'} & set(sys.modules); assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)
