"""Retry budget, full-jitter backoff and Retry-After parsing."""

from __future__ import annotations

import random
import statistics
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from gateway.budget import RetryBudget, backoff_delay, parse_retry_after

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()


def start(budget: RetryBudget, n: int) -> None:
    for _ in range(n):
        budget.request_started()


def take_all(budget: RetryBudget) -> int:
    taken = 0
    while budget.try_acquire_retry():
        taken += 1
    return taken


@pytest.mark.parametrize(
    ("active", "allowed"),
    [(0, 3), (1, 3), (15, 3), (19, 3), (20, 4), (24, 4), (25, 5), (100, 20), (1000, 200)],
)
def test_min_three_with_few_requests_twenty_percent_with_many(active: int, allowed: int) -> None:
    budget = RetryBudget(ratio=0.2, min_concurrent=3)
    start(budget, active)
    assert budget.limit == allowed
    assert take_all(budget) == allowed
    assert budget.exhausted_total == 1
    assert budget.snapshot() == {
        "active": active,
        "retries_in_flight": allowed,
        "limit": allowed,
        "exhausted_total": 1,
    }


def test_released_retries_and_finished_requests_move_the_limit() -> None:
    budget = RetryBudget(ratio=0.2, min_concurrent=3)
    start(budget, 25)
    assert take_all(budget) == 5
    budget.release_retry()
    assert budget.try_acquire_retry()
    for _ in range(10):
        budget.request_finished()  # 15 active: limit 3, 5 still in flight
    assert budget.limit == 3
    assert not budget.try_acquire_retry()
    for _ in range(3):
        budget.release_retry()
    assert budget.try_acquire_retry()  # 2 in flight < 3
    assert not budget.try_acquire_retry()
    assert budget.exhausted_total == 3
    assert repr(budget) == "<RetryBudget retries=3/3 active=15 exhausted_total=3>"


def test_zero_minimum_and_zero_ratio() -> None:
    none = RetryBudget(ratio=0.0, min_concurrent=0)
    start(none, 1000)
    assert not none.try_acquire_retry()
    floor_only = RetryBudget(ratio=0.0, min_concurrent=2)
    start(floor_only, 1000)
    assert take_all(floor_only) == 2


def test_unbalanced_calls_are_bugs() -> None:
    budget = RetryBudget()
    with pytest.raises(RuntimeError):
        budget.request_finished()
    with pytest.raises(RuntimeError):
        budget.release_retry()
    with pytest.raises(ValueError, match="ratio"):
        RetryBudget(ratio=-0.1)
    with pytest.raises(ValueError, match="min_concurrent"):
        RetryBudget(min_concurrent=-1)


@pytest.mark.parametrize(
    ("retry", "ceiling"),
    [(1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (6, 0.25), (64, 0.25), (10_000, 0.25)],
)
def test_backoff_stays_within_its_ceiling(retry: int, ceiling: float) -> None:
    rng = random.Random(retry)
    delays = [backoff_delay(retry, rng=rng) for _ in range(2000)]
    assert all(0.0 <= d <= ceiling for d in delays)
    assert max(delays) > 0.95 * ceiling  # the whole range is used: full jitter
    assert min(delays) < 0.05 * ceiling


def test_backoff_is_uniform_full_jitter() -> None:
    rng = random.Random(2015)
    delays = [backoff_delay(3, base=0.025, cap=0.25, rng=rng) for _ in range(20_000)]
    assert statistics.fmean(delays) == pytest.approx(0.05, rel=0.02)  # uniform(0, 0.1)
    deciles = [sum(1 for d in delays if k * 0.01 <= d < (k + 1) * 0.01) for k in range(10)]
    assert all(1800 < n < 2200 for n in deciles)


def test_backoff_is_reproducible_with_a_seed_and_checks_its_arguments() -> None:
    first = [backoff_delay(2, rng=random.Random(7)) for _ in range(3)]
    assert first == [backoff_delay(2, rng=random.Random(7)) for _ in range(3)]
    assert backoff_delay(1, base=0.5, cap=0.1, rng=random.Random(1)) <= 0.1
    with pytest.raises(ValueError, match="from 1"):
        backoff_delay(0)
    with pytest.raises(ValueError, match=">= 0"):
        backoff_delay(1, base=-0.1)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 7 ", 7.0),
        (format_datetime(datetime.fromtimestamp(NOW + 90, UTC), usegmt=True), 90.0),  # IMF-fixdate
        ("Saturday, 01-Mar-25 12:00:30 GMT", 30.0),  # obsolete RFC 850 form
        ("Sat Mar  1 12:01:00 2025", 60.0),  # obsolete asctime form (no zone: UTC)
        ("Sat, 01 Mar 2025 11:00:00 GMT", 0.0),  # in the past: now
    ],
)
def test_retry_after_forms(value: str, seconds: float) -> None:
    assert parse_retry_after(value, now_epoch=NOW) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "  ",
        "-5",  # delay-seconds is 1*DIGIT
        "1.5",
        "+3",
        "1e3",
        "soon",
        "\uff11\uff12",  # fullwidth digits: str.isdigit() says yes, RFC 5234 DIGIT says no
        "Sat, 32 Mar 2025 12:00:00 GMT",
        "Sat, 01 Mar 2025 25:00:00 GMT",
        "9" * 400,  # beyond float
        "9" * 5000,  # beyond int's default digit limit
    ],
)
def test_retry_after_garbage_is_none(value: str | None) -> None:
    assert parse_retry_after(value, now_epoch=NOW) is None
