"""Upstream endpoints grouped by region, and the choice of one for a request.

Invariant: ``choose(regions)`` only returns endpoints of the regions it is given, and callers
only pass ``ResidencyRules.regions_for(zone)``; no code path widens the list.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from yarl import URL

from gateway.balancer import choose_least_request
from gateway.config import RegionConfig
from gateway.errors import NoHealthyUpstream

__all__ = ["Endpoint", "Upstreams"]


class Endpoint:
    """One upstream endpoint (``scheme://host:port``) of a region, with live counters.

    Attributes:
        region: the region it belongs to.
        origin: ``"http://127.0.0.1:9101"``, no trailing slash.
        url: the origin as a yarl URL.
        in_flight: requests currently forwarded to it.
    """

    __slots__ = ("in_flight", "origin", "region", "url")

    def __init__(self, region: str, origin: str) -> None:
        self.region = region
        self.origin = origin.rstrip("/")
        self.url = URL(self.origin)
        self.in_flight = 0

    def __repr__(self) -> str:
        return f"<Endpoint {self.region} {self.origin} in_flight={self.in_flight}>"


class Upstreams:
    """Every region's endpoints.

    Args:
        regions: region name -> RegionConfig, from the validated config.
        rng: random source for the balancer (tests pass a seeded one).
    """

    __slots__ = ("_rng", "regions")

    def __init__(self, regions: Mapping[str, RegionConfig], rng: random.Random | None = None):
        self.regions: dict[str, tuple[Endpoint, ...]] = {
            name: tuple(Endpoint(name, e) for e in rc.endpoints) for name, rc in regions.items()
        }
        self._rng = rng or random.Random()

    def choose(self, regions: Sequence[str], *, zone: str) -> Endpoint:
        """Pick an endpoint in the first of ``regions`` that has one.

        Args:
            regions: candidate regions in preference order (from ``ResidencyRules``).
            zone: the request's zone, for the error.

        Returns:
            The endpoint, chosen by power-of-two-choices least-request inside the region.

        Raises:
            NoHealthyUpstream: none of ``regions`` has an endpoint (503).
        """
        for name in regions:
            endpoints = self.regions.get(name)
            if endpoints:
                return choose_least_request(endpoints, self._rng)
        raise NoHealthyUpstream(f"no endpoint available in zone {zone!r}", zone=zone)

    def __repr__(self) -> str:
        sizes = {name: len(eps) for name, eps in self.regions.items()}
        return f"<Upstreams {sizes}>"
