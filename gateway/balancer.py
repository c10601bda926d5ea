"""Endpoint choice inside one region: power-of-two-choices least-request.

Rule: this module decides from counters; it never opens a connection. Two endpoints are drawn
at random and the one with fewer requests in flight wins (Mitzenmacher, "The Power of Two
Choices in Randomized Load Balancing", 2001; Envoy's LEAST_REQUEST default), which avoids the
herd behaviour of a global least-request pick across several gateway processes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol, TypeVar

__all__ = ["HasInFlight", "choose_least_request"]


class HasInFlight(Protocol):
    """Anything with a count of requests in flight."""

    in_flight: int


E = TypeVar("E", bound=HasInFlight)


def choose_least_request(endpoints: Sequence[E], rng: random.Random | None = None) -> E:
    """Pick one of ``endpoints`` by power-of-two-choices least-request.

    Args:
        endpoints: one or more candidates.
        rng: the random source (tests pass a seeded one); default the module's.

    Returns:
        The chosen endpoint.

    Raises:
        IndexError: ``endpoints`` is empty.
    """
    n = len(endpoints)
    if n == 0:
        raise IndexError("no endpoints to choose from")
    if n == 1:
        return endpoints[0]
    rand = (rng or random).randrange
    a = rand(n)
    b = rand(n - 1)
    if b >= a:
        b += 1
    first, second = endpoints[a], endpoints[b]
    return second if second.in_flight < first.in_flight else first
