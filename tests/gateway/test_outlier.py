"""Passive outlier detection: consecutive failures, growing ejections, share cap, trials, decay."""

from __future__ import annotations

import random

import pytest

from gateway.clock import ManualClock
from gateway.outlier import OutlierDetector, OutlierState

A, B, C, D = (f"http://127.0.0.1:920{i}" for i in range(1, 5))
ACTIVE, EJECTED, TRIAL = OutlierState.ACTIVE, OutlierState.EJECTED, OutlierState.TRIAL


def make(clock: ManualClock, keys: list[str] | None = None, **kwargs: object) -> OutlierDetector:
    return OutlierDetector(keys or [A, B], clock=clock, **kwargs)  # type: ignore[arg-type]


def fail(od: OutlierDetector, key: str, times: int = 1) -> bool:
    """Fail ``times`` requests; True when the last one ejected."""
    ejected = False
    for _ in range(times):
        assert od.try_acquire(key)
        ejected = od.release(key, success=False)
    return ejected


def succeed(od: OutlierDetector, key: str) -> None:
    assert od.try_acquire(key)
    assert not od.release(key, success=True)


def test_ejects_at_the_threshold_and_refuses(manual_clock: ManualClock) -> None:
    od = make(manual_clock, consecutive_failures=5)
    assert not fail(od, A, 4)
    assert od.state(A) is ACTIVE
    assert fail(od, A)
    assert od.state(A) is EJECTED
    assert not od.try_acquire(A)
    assert od.try_acquire(B)  # the other endpoint is untouched
    assert od.ejected_count() == 1
    assert od.returns_in(A) == 30.0
    assert od.snapshot()[A] == {
        "state": "ejected",
        "consecutive_failures": 0,
        "times_ejected": 1,
        "returns_in": 30.0,
        "trials_in_flight": 0,
        "in_flight": 0,
    }
    assert repr(od) == "<OutlierDetector endpoints=2 out=1/1>"


def test_a_success_resets_the_consecutive_count(manual_clock: ManualClock) -> None:
    od = make(manual_clock, consecutive_failures=3)
    fail(od, A, 2)
    succeed(od, A)
    assert not fail(od, A, 2)
    assert od.state(A) is ACTIVE
    assert fail(od, A)


def test_unjudged_outcomes_count_nothing(manual_clock: ManualClock) -> None:
    od = make(manual_clock, consecutive_failures=2)
    fail(od, A)
    for _ in range(5):
        assert od.try_acquire(A)
        assert not od.release(A, success=None)
    assert od.snapshot()[A]["consecutive_failures"] == 1
    assert fail(od, A)


def test_ejection_time_is_base_times_ejections_capped(manual_clock: ManualClock) -> None:
    od = make(manual_clock, [A], consecutive_failures=1, base_ejection_time=30.0,
              max_ejection_time=100.0)  # fmt: skip
    assert fail(od, A)
    durations = [od.returns_in(A)]
    for _ in range(4):
        manual_clock.advance(durations[-1] or 0.0)
        assert od.try_acquire(A)
        assert od.release(A, success=False)  # the trial fails: ejected again, for longer
        durations.append(od.returns_in(A))
    assert durations == [30.0, 60.0, 90.0, 100.0, 100.0]


def test_ejected_until_exactly_its_time_then_trial(manual_clock: ManualClock) -> None:
    od = make(manual_clock, consecutive_failures=1)
    fail(od, A)
    manual_clock.advance(29.999)
    assert od.state(A) is EJECTED
    assert not od.try_acquire(A)
    manual_clock.advance(0.001)
    assert od.state(A) is TRIAL
    assert od.returns_in(A) is None
    assert od.ejected_count() == 1  # a trial endpoint still counts against the cap


@pytest.mark.parametrize(
    ("n", "share", "cap"),
    [(1, 0.5, 1), (2, 0.5, 1), (3, 0.5, 1), (4, 0.5, 2), (10, 0.5, 5), (10, 0.1, 1),
     (10, 0.0, 1), (10, 1.0, 10), (100, 0.29, 29)],
)  # fmt: skip
def test_share_cap(manual_clock: ManualClock, n: int, share: float, cap: int) -> None:
    keys = [f"http://10.0.0.{i}:80" for i in range(n)]
    od = make(manual_clock, keys, consecutive_failures=1, max_ejection_share=share)
    assert od.max_ejected == cap
    ejected = [fail(od, key) for key in keys]
    assert ejected == [True] * cap + [False] * (n - cap)
    assert od.ejected_count() == cap
    assert [od.state(k) for k in keys] == [EJECTED] * cap + [ACTIVE] * (n - cap)


def test_the_only_endpoint_of_a_region_can_be_ejected(manual_clock: ManualClock) -> None:
    od = make(manual_clock, [A], consecutive_failures=5)
    assert fail(od, A, 5)
    assert not od.try_acquire(A)  # the region is unavailable: traffic fails over in the zone


def test_a_blocked_endpoint_stays_active_and_is_ejected_once_the_cap_frees(
    manual_clock: ManualClock,
) -> None:
    od = make(manual_clock, [A, B], consecutive_failures=3, max_ejection_share=0.5)
    assert fail(od, A, 3)
    assert not fail(od, B, 5)  # cap of 1 reached: B keeps taking traffic
    assert od.state(B) is ACTIVE
    assert od.snapshot()[B]["consecutive_failures"] == 5
    manual_clock.advance(30.0)
    assert not fail(od, B)  # A is in TRIAL: still out, still counted
    succeed(od, A)  # A is back
    assert od.ejected_count() == 0
    assert fail(od, B)  # B's next failure ejects it at once
    assert od.state(B) is EJECTED


def test_trial_admits_only_trial_requests(manual_clock: ManualClock) -> None:
    od = make(manual_clock, consecutive_failures=1, trial_requests=2)
    fail(od, A)
    manual_clock.advance(30.0)
    assert od.try_acquire(A)
    assert od.try_acquire(A)
    assert not od.try_acquire(A)
    assert od.snapshot()[A]["trials_in_flight"] == 2
    assert not od.release(A, success=None)  # a cancelled trial frees its slot
    assert od.state(A) is TRIAL
    assert od.try_acquire(A)
    assert not od.release(A, success=True)  # one success returns the endpoint
    assert od.state(A) is ACTIVE
    assert od.ejected_count() == 0
    assert not od.release(A, success=True)  # the other trial ends in ACTIVE: ordinary success
    assert od.try_acquire(A)


def test_a_trial_failure_ejects_again_for_longer(manual_clock: ManualClock) -> None:
    od = make(manual_clock, consecutive_failures=1)
    fail(od, A)
    manual_clock.advance(30.0)
    assert od.try_acquire(A)
    assert od.release(A, success=False)
    assert od.state(A) is EJECTED
    assert od.returns_in(A) == 60.0
    assert od.ejected_count() == 1


def test_outcomes_of_requests_from_before_the_ejection_are_ignored(
    manual_clock: ManualClock,
) -> None:
    od = make(manual_clock, consecutive_failures=2)
    assert od.try_acquire(A)
    assert od.try_acquire(A)
    assert od.try_acquire(A)
    od.release(A, success=False)
    assert od.release(A, success=False)  # ejected
    assert not od.release(A, success=True)  # the third ends while EJECTED: ignored
    assert od.state(A) is EJECTED
    assert od.try_acquire(B)
    manual_clock.advance(30.0)
    assert od.snapshot()[A]["in_flight"] == 0


def test_an_old_request_ending_in_trial_without_trials_counts_nothing(
    manual_clock: ManualClock,
) -> None:
    od = make(manual_clock, consecutive_failures=1)
    assert od.try_acquire(A)  # a long request starts while ACTIVE
    assert fail(od, A)
    manual_clock.advance(30.0)
    assert od.state(A) is TRIAL
    assert not od.release(A, success=False)  # no trial in flight: it is not a trial's failure
    assert od.state(A) is TRIAL
    assert od.try_acquire(A)
    assert not od.release(A, success=True)
    assert od.state(A) is ACTIVE


def test_decay_lowers_the_multiplier_while_active(manual_clock: ManualClock) -> None:
    od = make(manual_clock, [A], consecutive_failures=1, base_ejection_time=30.0)
    for expected in (30.0, 60.0, 90.0):  # three ejections back to back
        assert fail(od, A)
        assert od.returns_in(A) == expected
        manual_clock.advance(expected)
        succeed(od, A)
    assert od.times_ejected(A) == 3
    manual_clock.advance(59.999)  # one full base period ACTIVE: 3 -> 2
    assert od.times_ejected(A) == 2
    manual_clock.advance(0.001)  # two: -> 1
    assert od.times_ejected(A) == 1
    assert fail(od, A)
    assert od.returns_in(A) == 60.0  # multiplier 1 + 1
    manual_clock.advance(60.0)
    succeed(od, A)
    manual_clock.advance(10 * 30.0)  # long healthy: floor 0
    assert od.times_ejected(A) == 0
    assert od.snapshot()[A]["times_ejected"] == 0
    assert fail(od, A)
    assert od.returns_in(A) == 30.0


def test_no_decay_while_ejected_or_in_trial(manual_clock: ManualClock) -> None:
    od = make(manual_clock, [A], consecutive_failures=1, max_ejection_time=1000.0)
    fail(od, A)
    manual_clock.advance(500.0)  # long past its ejection, never tried again
    assert od.times_ejected(A) == 1
    assert od.try_acquire(A)
    assert od.release(A, success=False)
    assert od.returns_in(A) == 60.0


def test_cap_holds_in_random_interleavings(manual_clock: ManualClock) -> None:
    rng = random.Random(99)
    keys = [A, B, C, D]
    od = make(manual_clock, keys, consecutive_failures=2, max_ejection_share=0.5)
    held: dict[str, int] = dict.fromkeys(keys, 0)
    seen = set()
    for _ in range(5000):
        manual_clock.advance(rng.choice([0.0, 1.0, 5.0]))
        key = rng.choice(keys)
        if held[key] and rng.random() < 0.5:
            held[key] -= 1
            od.release(key, success=rng.random() < 0.3)
        elif od.try_acquire(key):
            held[key] += 1
        states = [od.state(k) for k in keys]
        seen.update(states)
        assert sum(s is not ACTIVE for s in states) == od.ejected_count() <= 2
        assert all(od.snapshot()[k]["in_flight"] == held[k] for k in keys)
    assert seen == set(OutlierState)


def test_release_without_acquire_is_a_bug(manual_clock: ManualClock) -> None:
    od = make(manual_clock)
    with pytest.raises(RuntimeError, match="without a successful try_acquire"):
        od.release(A, success=False)
    with pytest.raises(KeyError):
        od.try_acquire("http://elsewhere:1")


@pytest.mark.parametrize(
    ("keys", "kwargs", "message"),
    [
        ([], {}, "at least one"),
        ([A, A], {}, "duplicate"),
        ([A], {"consecutive_failures": 0}, "consecutive_failures"),
        ([A], {"base_ejection_time": 0.0}, "base_ejection_time"),
        ([A], {"max_ejection_time": 10.0}, "max_ejection_time"),
        ([A], {"max_ejection_share": 1.5}, "max_ejection_share"),
        ([A], {"trial_requests": 0}, "trial_requests"),
    ],
)
def test_arguments_are_checked(
    manual_clock: ManualClock, keys: list[str], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        OutlierDetector(keys, clock=manual_clock, **kwargs)  # type: ignore[arg-type]
