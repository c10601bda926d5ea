"""Upstream endpoints grouped by region: availability, region order and endpoint choice.

Invariant: every method that returns an endpoint takes the request's candidate regions, and
callers only pass ``ResidencyRules.regions_for(zone)``; no code path widens that list, so a
request of zone Z is served by a region of Z or not at all (fail closed: 503).

An endpoint is *available* while its last active probes say healthy, outlier detection has not
ejected it, its breaker is not open and no upstream Retry-After holds it. A region is available
while it is not drained and any endpoint in it is available. Candidate regions are ordered:
the gateway's own region first, then lowest measured latency (EWMA of probe and request
round trips), then config order for regions not measured yet.

Rule: this module decides from state the adapters feed it (probe results, request outcomes,
round-trip times); it never opens a connection itself.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from yarl import URL

from gateway.balancer import choose_least_request
from gateway.breaker import Breaker, BreakerState
from gateway.outlier import OutlierDetector, OutlierState

if TYPE_CHECKING:
    from gateway.clock import Clock
    from gateway.config import RegionConfig, UpstreamConfig

__all__ = ["Endpoint", "Lease", "Region", "Upstreams"]

BreakerChange = Callable[[str, str, BreakerState, BreakerState], None]
RETRY_AFTER_HOLD_MAX = 60.0  # seconds: longest an upstream's Retry-After keeps us away


class Endpoint:
    """One upstream endpoint (``scheme://host:port``) of a region, with its live state.

    Attributes:
        region: the region it belongs to.
        origin: ``"http://127.0.0.1:9101"``, no trailing slash.
        url: the origin as a yarl URL.
        in_flight: requests currently forwarded to it.
        max_concurrent: bulkhead; 0 means no cap.
        healthy: what the active probes last decided.
        breaker: its circuit breaker.
        held_until: clock time before which an upstream Retry-After keeps requests away.
        latency: EWMA of round-trip times, seconds; None until measured.
    """

    __slots__ = (
        "breaker",
        "healthy",
        "held_until",
        "in_flight",
        "latency",
        "max_concurrent",
        "origin",
        "region",
        "url",
    )

    def __init__(
        self, region: str, origin: str, *, breaker: Breaker, max_concurrent: int = 0
    ) -> None:
        self.region = region
        self.origin = origin.rstrip("/")
        self.url = URL(self.origin)
        self.in_flight = 0
        self.max_concurrent = max_concurrent
        self.healthy = True
        self.breaker = breaker
        self.held_until = 0.0
        self.latency: float | None = None

    def is_full(self) -> bool:
        """True when the bulkhead cap is reached."""
        return 0 < self.max_concurrent <= self.in_flight

    def __repr__(self) -> str:
        return (
            f"<Endpoint {self.region} {self.origin} healthy={self.healthy} "
            f"breaker={self.breaker.state.name} in_flight={self.in_flight}>"
        )


class Region:
    """A region: its endpoints, their outlier detector, drain state and measured latency.

    Attributes:
        drained: no new requests go to the region (in-flight ones finish).
        config_drained: what the config's ``drained`` says.
        admin_drained: what an operator set at run time (admin API), or None: the config
            decides. ``drained`` is ``admin_drained`` when set, else ``config_drained``.
    """

    __slots__ = (
        "admin_drained",
        "by_origin",
        "config_drained",
        "drained",
        "endpoints",
        "latency",
        "name",
        "outliers",
        "zones",
    )

    def __init__(
        self,
        name: str,
        zones: Sequence[str],
        endpoints: Sequence[Endpoint],
        outliers: OutlierDetector,
        *,
        drained: bool = False,
        admin_drained: bool | None = None,
    ) -> None:
        self.name = name
        self.zones = tuple(zones)
        self.endpoints = tuple(endpoints)
        self.by_origin = {e.origin: e for e in endpoints}
        self.outliers = outliers
        self.config_drained = drained
        self.admin_drained = admin_drained
        self.drained = drained if admin_drained is None else admin_drained
        self.latency: float | None = None

    def is_endpoint_available(self, endpoint: Endpoint, now: float) -> bool:
        """Healthy, not ejected, breaker not open, not held by a Retry-After."""
        return (
            endpoint.healthy
            and endpoint.held_until <= now
            and endpoint.breaker.state is not BreakerState.OPEN
            and self.outliers.state(endpoint.origin) is not OutlierState.EJECTED
        )

    def is_available(self, now: float) -> bool:
        """Not drained, and at least one endpoint is available."""
        return not self.drained and any(self.is_endpoint_available(e, now) for e in self.endpoints)

    def __repr__(self) -> str:
        return f"<Region {self.name} zones={list(self.zones)} drained={self.drained}>"


class Lease:
    """One attempt's hold on an endpoint: its outlier and breaker slots and in-flight count.

    Release exactly once, with the attempt's outcome (``True`` success, ``False`` failure,
    ``None`` not judged: the client left, or the failure was the client's).
    """

    __slots__ = ("_released", "endpoint", "region")

    def __init__(self, region: Region, endpoint: Endpoint) -> None:
        self.region = region
        self.endpoint = endpoint
        self._released = False

    def release(self, success: bool | None) -> bool:
        """Give the slots back and feed the outcome to outlier detection and the breaker.

        Returns:
            True when this outcome ejected the endpoint (for the ejection counter).
        """
        if self._released:
            return False
        self._released = True
        endpoint = self.endpoint
        endpoint.in_flight -= 1
        endpoint.breaker.release(success=success)
        return self.region.outliers.release(endpoint.origin, success=success)


class Upstreams:
    """Every region's endpoints, built from the config.

    On a config reload the new Upstreams is built with ``previous=`` the running one, and
    carries over the live state of what did not change (``GatewayServer.reload``):

    * an endpoint whose origin stays in the same region is the same ``Endpoint`` object:
      health verdict, breaker state, Retry-After hold, in-flight count and latency EWMA are
      kept (``activate()`` applies new breaker limits and bulkhead to it at the swap);
      requests still running on the previous Upstreams release into the same object;
    * a region keeps its outlier detector when its endpoint set and ``upstream.outlier`` are
      unchanged, else the new detector adopts the records of the kept endpoints;
    * a region keeps its latency EWMA, and an operator's drain (``set_drained``) unless the
      config's ``drained`` of that region changed, in which case the config decides.

    An endpoint that is new, or moved to another region, starts fresh (healthy, CLOSED).

    Args:
        regions: region name -> RegionConfig, from the validated config.
        upstream: the ``upstream`` config slice (outlier, breaker, bulkhead, EWMA weight).
        own_region: the gateway's region, preferred for every zone it serves.
        clock: monotonic seconds (LoopClock in the server, ManualClock in tests).
        rng: random source for the balancer (tests pass a seeded one).
        on_breaker_change: called as ``(region, origin, old, new)`` on each breaker
            transition (metrics, logs).
        previous: the Upstreams this one replaces (same clock), or None at start.
        previous_config: the ``upstream`` slice ``previous`` was built from (required with
            ``previous``: it tells whether the outlier limits changed).
    """

    def __init__(
        self,
        regions: Mapping[str, RegionConfig],
        upstream: UpstreamConfig,
        *,
        own_region: str,
        clock: Clock,
        rng: random.Random | None = None,
        on_breaker_change: BreakerChange | None = None,
        previous: Upstreams | None = None,
        previous_config: UpstreamConfig | None = None,
    ) -> None:
        self.clock = clock
        self._clock = clock
        self._rng: random.Random = rng or (previous._rng if previous else random.Random())
        self._alpha = upstream.latency_ewma_alpha
        self.own_region = own_region
        bc, oc = upstream.breaker, upstream.outlier
        old_regions = previous.regions if previous is not None else {}
        same_outlier = previous_config is not None and previous_config.outlier == oc
        self.regions: dict[str, Region] = {}
        for name, rc in regions.items():
            old = old_regions.get(name)
            endpoints: list[Endpoint] = []
            for origin in rc.endpoints:
                kept = old.by_origin.get(origin.rstrip("/")) if old is not None else None
                if kept is None:
                    kept = Endpoint(
                        name,
                        origin,
                        breaker=Breaker(
                            f"{name} {URL(origin).host}:{URL(origin).port}",
                            fail_max=bc.fail_max,
                            reset_timeout=bc.reset_timeout,
                            half_open_max_concurrent=bc.half_open_max_concurrent,
                            clock=clock,
                            on_state_change=_notify(on_breaker_change, name, origin),
                        ),
                    )
                    kept.max_concurrent = upstream.max_concurrent_per_endpoint
                endpoints.append(kept)
            origins = [e.origin for e in endpoints]
            if old is not None and same_outlier and list(old.by_origin) == origins:
                outliers = old.outliers
            else:
                outliers = OutlierDetector(
                    origins,
                    consecutive_failures=oc.consecutive_failures,
                    base_ejection_time=oc.base_ejection_time,
                    max_ejection_time=oc.max_ejection_time,
                    max_ejection_share=oc.max_ejection_share,
                    trial_requests=oc.trial_requests,
                    clock=clock,
                )
                if old is not None:
                    outliers.adopt(old.outliers)
            admin = None
            if old is not None and old.config_drained == rc.drained:
                admin = old.admin_drained  # the operator's drain outlives a reload
            region = Region(
                name, rc.zones, endpoints, outliers, drained=rc.drained, admin_drained=admin
            )
            if old is not None:
                region.latency = old.latency
            self.regions[name] = region
        self.endpoints: dict[str, Endpoint] = {
            e.origin: e for r in self.regions.values() for e in r.endpoints
        }
        self._upstream_config = upstream

    def activate(self) -> None:
        """Apply this config's breaker limits and bulkhead to every endpoint, in place.

        Endpoints kept from ``previous`` are shared with it, so the server calls this at the
        swap, not while building: a reload that fails later changes nothing that runs.
        """
        bc = self._upstream_config.breaker
        for endpoint in self.endpoints.values():
            endpoint.breaker.reconfigure(
                fail_max=bc.fail_max,
                reset_timeout=bc.reset_timeout,
                half_open_max_concurrent=bc.half_open_max_concurrent,
            )
            endpoint.max_concurrent = self._upstream_config.max_concurrent_per_endpoint

    def candidates(self, names: Iterable[str]) -> list[Region]:
        """Available regions among ``names``, best first.

        Order: the gateway's own region, then lowest latency EWMA, then regions not measured
        yet in the order given (config order).
        """
        now = self._clock.now()
        available = [r for n in names if (r := self.regions[n]).is_available(now)]
        if len(available) > 1:
            own = self.own_region
            available.sort(
                key=lambda r: (r.name != own, r.latency is None, r.latency or 0.0)
            )  # stable: config order among equals
        return available

    def acquire(
        self, regions: Sequence[Region], exclude: set[Endpoint] | frozenset[Endpoint] = frozenset()
    ) -> Lease | None:
        """Take an endpoint for one attempt: the first region with a free, available one.

        Inside a region: power-of-two-choices least-request over available endpoints not in
        ``exclude`` (the ones this request already tried); a breaker in HALF_OPEN or an
        outlier TRIAL admits only its bounded number of trial requests.

        Returns:
            A Lease, or None when every available endpoint is excluded, full (bulkhead) or
            refused a trial slot.
        """
        now = self._clock.now()
        for region in regions:
            if region.drained:
                continue
            pool = [
                e
                for e in region.endpoints
                if e not in exclude and not e.is_full() and region.is_endpoint_available(e, now)
            ]
            while pool:
                endpoint = choose_least_request(pool, self._rng)
                if self._take(region, endpoint):
                    return Lease(region, endpoint)
                pool.remove(endpoint)
        return None

    @staticmethod
    def _take(region: Region, endpoint: Endpoint) -> bool:
        if not region.outliers.try_acquire(endpoint.origin):
            return False
        if not endpoint.breaker.try_acquire():
            region.outliers.release(endpoint.origin, success=None)
            return False
        endpoint.in_flight += 1
        return True

    def is_bulkhead_full(self, regions: Sequence[Region]) -> bool:
        """True when every available endpoint of ``regions`` is at its concurrency cap."""
        now = self._clock.now()
        seen = False
        for region in regions:
            for e in region.endpoints:
                if region.is_endpoint_available(e, now):
                    seen = True
                    if not e.is_full():
                        return False
        return seen

    def hold(self, endpoint: Endpoint, seconds: float) -> None:
        """Keep requests away from ``endpoint`` for ``seconds`` (an upstream Retry-After,
        RFC 9110 §10.2.3), capped at RETRY_AFTER_HOLD_MAX."""
        endpoint.held_until = self._clock.now() + min(seconds, RETRY_AFTER_HOLD_MAX)

    def record_rtt(self, endpoint: Endpoint, seconds: float) -> None:
        """Feed one round-trip time (probe or request) into the endpoint's and region's EWMA."""
        a = self._alpha
        endpoint.latency = seconds if endpoint.latency is None else (
            a * seconds + (1 - a) * endpoint.latency
        )  # fmt: skip
        region = self.regions[endpoint.region]
        region.latency = seconds if region.latency is None else (
            a * seconds + (1 - a) * region.latency
        )  # fmt: skip

    def set_health(self, origin: str, healthy: bool) -> None:
        """Record an active-probe verdict for the endpoint at ``origin``."""
        endpoint = self.endpoints.get(origin)
        if endpoint is not None:
            endpoint.healthy = healthy

    def set_drained(self, region: str, drained: bool) -> None:
        """Drain (no new requests; in-flight ones finish) or undrain a region.

        This is the operator's decision: it beats the config's ``drained`` and outlives a
        config reload that leaves that region's ``drained`` as it was.

        Raises:
            KeyError: no such region.
        """
        target = self.regions[region]
        target.admin_drained = target.drained = drained

    def snapshot(self) -> dict[str, object]:
        """Per region and endpoint state, for the admin API and tests (JSON-ready)."""
        now = self._clock.now()
        out: dict[str, object] = {}
        for name, region in self.regions.items():
            outliers = region.outliers.snapshot()
            out[name] = {
                "zones": list(region.zones),
                "available": region.is_available(now),
                "drained": region.drained,
                "latency_ms": _ms(region.latency),
                "endpoints": [
                    {
                        "url": e.origin,
                        "available": region.is_endpoint_available(e, now),
                        "healthy": e.healthy,
                        "outlier": outliers.get(e.origin, {}),
                        "breaker": e.breaker.snapshot(),
                        "in_flight": e.in_flight,
                        "held_for_s": round(max(0.0, e.held_until - now), 3),
                        "latency_ms": _ms(e.latency),
                    }
                    for e in region.endpoints
                ],
            }
        return out

    def __repr__(self) -> str:
        sizes = {name: len(r.endpoints) for name, r in self.regions.items()}
        return f"<Upstreams {sizes}>"


def _notify(
    callback: BreakerChange | None, region: str, origin: str
) -> Callable[[Breaker, BreakerState, BreakerState], None] | None:
    if callback is None:
        return None

    def notify(_: Breaker, old: BreakerState, new: BreakerState) -> None:
        callback(region, origin, old, new)

    return notify


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
