"""Circuit breaker: pybreaker's state machine, timed by a ManualClock, driven per request."""

# mypy narrows ``breaker.state`` after an assert, but the property moves when the test acts:
# mypy: disable-error-code="comparison-overlap, unreachable"

from __future__ import annotations

import random
from datetime import UTC, datetime

import pybreaker
import pytest

from gateway.breaker import Breaker, BreakerState, ClockStorage
from gateway.clock import ManualClock

NAME = "eu-west-1 127.0.0.1:9201"


def make(clock: ManualClock, **kwargs: object) -> Breaker:
    return Breaker(NAME, clock=clock, **kwargs)  # type: ignore[arg-type]


def fail(breaker: Breaker, times: int = 1) -> None:
    for _ in range(times):
        assert breaker.try_acquire()
        breaker.release(success=False)


def succeed(breaker: Breaker) -> None:
    assert breaker.try_acquire()
    breaker.release(success=True)


def test_closed_admits_and_counts_nothing_on_success(manual_clock: ManualClock) -> None:
    breaker = make(manual_clock)
    for _ in range(100):
        succeed(breaker)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot() == {
        "state": "closed",
        "failures": 0,
        "reopens_in": None,
        "trials_in_flight": 0,
        "in_flight": 0,
    }
    assert repr(breaker) == f"<Breaker {NAME} CLOSED failures=0>"


def test_opens_after_fail_max_consecutive_failures_and_refuses_at_once(
    manual_clock: ManualClock,
) -> None:
    breaker = make(manual_clock, fail_max=5)
    fail(breaker, 4)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot()["failures"] == 4
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.try_acquire()
    assert breaker.reopens_in() == 30.0
    manual_clock.advance(17.7)
    assert not breaker.try_acquire()
    assert breaker.snapshot() == {
        "state": "open",
        "failures": 5,
        "reopens_in": pytest.approx(12.3),
        "trials_in_flight": 0,
        "in_flight": 0,
    }
    assert repr(breaker) == f"<Breaker {NAME} OPEN failures=5 reopens_in=12.3s>"


def test_a_success_resets_the_failure_count(manual_clock: ManualClock) -> None:
    breaker = make(manual_clock, fail_max=3)
    fail(breaker, 2)
    succeed(breaker)
    assert breaker.snapshot()["failures"] == 0
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN


def test_half_open_after_exactly_reset_timeout(manual_clock: ManualClock) -> None:
    breaker = make(manual_clock, fail_max=1, reset_timeout=30.0)
    fail(breaker)
    manual_clock.advance(29.999)
    assert breaker.state is BreakerState.OPEN
    assert breaker.reopens_in() == pytest.approx(0.001)
    assert not breaker.try_acquire()
    manual_clock.advance(0.001)
    # reading the state already shows HALF_OPEN, but changes nothing in pybreaker
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.reopens_in() is None
    assert breaker.circuit.current_state == pybreaker.STATE_OPEN
    assert breaker.try_acquire()
    assert breaker.circuit.current_state == pybreaker.STATE_HALF_OPEN


def test_half_open_admits_only_its_concurrent_trials(manual_clock: ManualClock) -> None:
    breaker = make(manual_clock, fail_max=1, half_open_max_concurrent=2, success_threshold=3)
    fail(breaker)
    manual_clock.advance(30.0)
    assert breaker.try_acquire()
    assert breaker.try_acquire()
    assert not breaker.try_acquire()
    assert breaker.snapshot()["trials_in_flight"] == 2
    assert repr(breaker) == f"<Breaker {NAME} HALF_OPEN trials=2/2>"
    breaker.release(success=True)  # one trial done: its slot is free again, 1 of 3 successes
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.try_acquire()
    assert not breaker.try_acquire()
    breaker.release(success=True)
    breaker.release(success=True)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot()["in_flight"] == 0


def test_a_trial_success_closes(manual_clock: ManualClock) -> None:
    breaker = make(manual_clock, fail_max=2)
    fail(breaker, 2)
    manual_clock.advance(30.0)
    succeed(breaker)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot()["failures"] == 0
    fail(breaker)  # the count starts afresh: one failure does not reopen
    assert breaker.state is BreakerState.CLOSED


def test_a_trial_failure_reopens_with_a_fresh_timeout(manual_clock: ManualClock) -> None:
    breaker = make(manual_clock, fail_max=2, reset_timeout=30.0)
    fail(breaker, 2)
    manual_clock.advance(45.0)  # well past the first timeout
    assert breaker.try_acquire()
    manual_clock.advance(5.0)  # the trial takes 5 s and fails
    breaker.release(success=False)
    assert breaker.state is BreakerState.OPEN
    assert breaker.reopens_in() == 30.0
    manual_clock.advance(29.999)
    assert not breaker.try_acquire()
    manual_clock.advance(0.001)
    assert breaker.try_acquire()


def test_unjudged_releases_count_nothing(manual_clock: ManualClock) -> None:
    breaker = make(manual_clock, fail_max=2)
    fail(breaker)
    for _ in range(10):
        assert breaker.try_acquire()
        breaker.release(success=None)
    assert breaker.snapshot()["failures"] == 1  # neither reset nor counted
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    manual_clock.advance(30.0)
    assert breaker.try_acquire()
    breaker.release(success=None)  # a cancelled trial: the slot is free, still HALF_OPEN
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.try_acquire()
    breaker.release(success=True)
    assert breaker.state is BreakerState.CLOSED


def test_success_that_started_closed_and_ends_open_does_not_close(
    manual_clock: ManualClock,
) -> None:
    breaker = make(manual_clock, fail_max=2)
    assert breaker.try_acquire()  # a long stream starts while CLOSED
    fail(breaker, 2)
    assert breaker.state is BreakerState.OPEN
    breaker.release(success=True)
    assert breaker.state is BreakerState.OPEN
    assert breaker.reopens_in() == 30.0


def test_failure_that_ends_while_open_does_not_stretch_the_timeout(
    manual_clock: ManualClock,
) -> None:
    breaker = make(manual_clock, fail_max=1)
    assert breaker.try_acquire()
    fail(breaker)
    manual_clock.advance(10.0)
    breaker.release(success=False)
    assert breaker.reopens_in() == 20.0


def test_old_request_ending_in_half_open_without_trials_counts_nothing(
    manual_clock: ManualClock,
) -> None:
    breaker = make(manual_clock, fail_max=1)
    assert breaker.try_acquire()  # started CLOSED
    fail(breaker)
    manual_clock.advance(30.0)
    assert breaker.try_acquire()  # the trial
    breaker.release(success=None)  # the trial ends unjudged
    breaker.release(success=True)  # the old request: no trial in flight, so not a trial
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.try_acquire()  # the trial slot is free


def test_trials_stay_within_the_bound_in_random_interleavings(manual_clock: ManualClock) -> None:
    """Seeded random schedules. While HALF_OPEN, the test ends a request from before the
    current state only when no trial is in flight (the case the breaker can tell apart; see
    the module docstring for the other): trials in flight then always match and stay <= 2."""
    rng = random.Random(1234)
    epoch = 0

    def bump(b: Breaker, old: BreakerState, new: BreakerState) -> None:
        nonlocal epoch
        epoch += 1

    breaker = make(
        manual_clock,
        fail_max=3,
        reset_timeout=1.0,
        half_open_max_concurrent=2,
        on_state_change=bump,
    )
    held: list[tuple[int, bool]] = []  # (epoch at acquire, acquired as a trial)
    seen = set()
    for _ in range(5000):
        manual_clock.advance(rng.choice([0.0, 0.0, 0.1, 0.5]))
        half_open = breaker.circuit.current_state == pybreaker.STATE_HALF_OPEN
        if held and rng.random() < 0.5:
            trials = [i for i, (e, trial) in enumerate(held) if e == epoch and trial]
            pick = rng.choice(trials) if half_open and trials else rng.randrange(len(held))
            held.pop(pick)
            breaker.release(success=rng.choice([True, False, False, None]))
        elif breaker.try_acquire():
            held.append((epoch, breaker.circuit.current_state == pybreaker.STATE_HALF_OPEN))
        seen.add(breaker.state)
        if breaker.circuit.current_state == pybreaker.STATE_HALF_OPEN:
            in_trial = sum(1 for e, trial in held if e == epoch and trial)
            assert in_trial <= 2
            assert breaker.snapshot()["trials_in_flight"] == in_trial
        assert breaker.snapshot()["in_flight"] == len(held)
    assert seen == set(BreakerState)


def test_an_old_request_ending_among_trials_is_taken_for_a_trial(
    manual_clock: ManualClock,
) -> None:
    """The documented approximation: its verdict counts and it frees a trial slot."""
    breaker = make(manual_clock, fail_max=1, success_threshold=2)
    assert breaker.try_acquire()  # started CLOSED, still running
    fail(breaker)
    manual_clock.advance(30.0)
    assert breaker.try_acquire()  # the trial
    assert not breaker.try_acquire()
    breaker.release(success=True)  # the old request ends: 1 of 2 successes, a slot is free
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.try_acquire()  # a second trial runs beside the first
    breaker.release(success=True)
    assert breaker.state is BreakerState.CLOSED
    breaker.release(success=True)  # the last trial ends in CLOSED: an ordinary success
    assert breaker.snapshot()["in_flight"] == 0


def test_release_without_acquire_is_a_bug(manual_clock: ManualClock) -> None:
    breaker = make(manual_clock)
    with pytest.raises(RuntimeError, match="without a successful try_acquire"):
        breaker.release(success=True)


def test_state_changes_are_reported_once_consistent(manual_clock: ManualClock) -> None:
    seen: list[tuple[BreakerState, BreakerState, BreakerState]] = []

    def on_change(b: Breaker, old: BreakerState, new: BreakerState) -> None:
        seen.append((old, new, b.state))

    breaker = make(manual_clock, fail_max=1, on_state_change=on_change)
    fail(breaker)
    manual_clock.advance(30.0)
    assert breaker.state is BreakerState.HALF_OPEN
    assert seen == [(BreakerState.CLOSED, BreakerState.OPEN, BreakerState.OPEN)]  # lazy: none yet
    fail(breaker)
    manual_clock.advance(30.0)
    succeed(breaker)
    c, o, h = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
    assert seen == [(c, o, o), (o, h, h), (h, o, o), (o, h, h), (h, c, c)]


def test_pybreaker_decides_and_agrees(manual_clock: ManualClock) -> None:
    breaker = make(manual_clock, fail_max=2, reset_timeout=30.0)
    cb = breaker.circuit
    assert (cb.fail_max, cb.reset_timeout, cb.success_threshold) == (2, 30.0, 1)
    fail(breaker)
    assert (cb.current_state, cb.fail_counter) == (pybreaker.STATE_CLOSED, 1)
    fail(breaker)
    assert cb.current_state == pybreaker.STATE_OPEN
    assert cb.state.name == pybreaker.STATE_OPEN


def test_the_storage_times_pybreaker_own_call_path(manual_clock: ManualClock) -> None:
    """pybreaker's own OPEN check (datetime.now(UTC) < opened_at + reset_timeout) follows
    the ManualClock through ClockStorage: no wall time passes in this test."""
    storage = ClockStorage(manual_clock)
    cb = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=30.0, state_storage=storage)
    with pytest.raises(pybreaker.CircuitBreakerError):
        cb.call(_boom)  # trips
    assert storage.opened_clock == 0.0
    manual_clock.advance(29.999)
    with pytest.raises(pybreaker.CircuitBreakerError, match="Timeout not elapsed"):
        cb.call(lambda: "never called")
    manual_clock.advance(0.001)
    assert cb.call(lambda: "trial") == "trial"
    assert cb.current_state == pybreaker.STATE_CLOSED


def test_storage_opened_at_follows_the_clock_not_the_datetime_given(
    manual_clock: ManualClock,
) -> None:
    storage = ClockStorage(manual_clock)
    assert storage.opened_at is None
    manual_clock.advance(100.0)
    storage.opened_at = datetime(1970, 1, 1, tzinfo=UTC)  # pybreaker's wall time: ignored
    assert storage.opened_clock == 100.0
    manual_clock.advance(29.0)
    opened_at = storage.opened_at
    assert opened_at is not None
    assert 28.99 < (datetime.now(UTC) - opened_at).total_seconds() < 29.5


def _boom() -> None:
    raise ConnectionError("upstream down")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fail_max": 0}, "fail_max"),
        ({"reset_timeout": -1.0}, "reset_timeout"),
        ({"half_open_max_concurrent": 0}, "half_open_max_concurrent"),
        ({"success_threshold": 0}, "success_threshold"),
    ],
)
def test_limits_are_checked(
    manual_clock: ManualClock, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make(manual_clock, **kwargs)
