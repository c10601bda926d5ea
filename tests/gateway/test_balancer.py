"""Power-of-two-choices least-request."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from gateway.balancer import choose_least_request


@dataclass
class Ep:
    name: str
    in_flight: int = 0


def test_single_endpoint() -> None:
    only = Ep("a")
    assert choose_least_request([only]) is only


def test_empty_raises() -> None:
    with pytest.raises(IndexError):
        choose_least_request([])


def test_two_endpoints_always_picks_the_less_loaded() -> None:
    a, b = Ep("a", 5), Ep("b", 1)
    rng = random.Random(1)
    assert all(choose_least_request([a, b], rng) is b for _ in range(100))


def test_spreads_evenly_when_equal_and_avoids_the_busiest() -> None:
    eps = [Ep(str(i)) for i in range(4)]
    eps[3].in_flight = 100
    rng = random.Random(7)
    counts = Counter(choose_least_request(eps, rng).name for _ in range(3000))
    assert counts["3"] == 0  # the busiest can only win against itself, which p2c never draws
    for name in "012":
        assert 800 < counts[name] < 1200
