"""Clocks: the manual one tests drive, and the two production ones."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from gateway.clock import Clock, LoopClock, ManualClock, MonotonicClock


def test_manual_clock_starts_where_told_and_moves_only_when_advanced() -> None:
    clock = ManualClock(start=100.0)
    assert clock.now() == clock.now() == 100.0
    clock.advance(0.25)
    clock.advance(0)
    assert clock.now() == 100.25
    assert repr(clock) == "<ManualClock now=100.25s>"


def test_manual_clock_fixture_starts_at_zero(manual_clock: ManualClock) -> None:
    assert manual_clock.now() == 0.0


@pytest.mark.parametrize("seconds", [-0.001, -1.0, math.nan])
def test_manual_clock_refuses_to_go_back(manual_clock: ManualClock, seconds: float) -> None:
    with pytest.raises(ValueError, match="cannot go back"):
        manual_clock.advance(seconds)
    assert manual_clock.now() == 0.0


def test_monotonic_clock_follows_time_monotonic() -> None:
    before = time.monotonic()
    reading = MonotonicClock().now()
    assert before <= reading <= time.monotonic()


async def test_loop_clock_reads_the_running_loop() -> None:
    loop = asyncio.get_running_loop()
    before = loop.time()
    reading = LoopClock().now()
    assert before <= reading <= loop.time()


def test_loop_clock_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError):
        LoopClock().now()


def test_every_clock_satisfies_the_protocol() -> None:
    clocks: list[Clock] = [LoopClock(), MonotonicClock(), ManualClock()]
    assert [repr(c) for c in clocks] == ["<LoopClock>", "<MonotonicClock>", "<ManualClock now=0s>"]
