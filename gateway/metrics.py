"""Prometheus metrics, declared in one place (as Envoy declares its stats).

Names carry the ``geogate_`` prefix and base units (``_seconds``, ``_total``); labels come
only from bounded sets: zone, region, endpoint (from config), route prefix, status class,
result, reason (Prometheus naming guide). State that already lives in the upstream objects
(health, ejection, breaker state, latency) is read at scrape time by a collector instead of
being mirrored into gauges on the request path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.breaker import BreakerState
from gateway.outlier import OutlierState

if TYPE_CHECKING:
    from gateway.budget import RetryBudget
    from gateway.cachestore import MemoryCache
    from gateway.exchange import Exchange
    from gateway.upstreams import Upstreams

__all__ = ["CacheStateCollector", "Metrics", "UpstreamStateCollector"]


_STATUS_CLASSES = {0: "none", 1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class UpstreamStateCollector(Collector):
    """Scrape-time gauges of endpoint and region state.

    Args:
        upstreams: the live upstream state.
        budget: the retry budget (its refusals counter).
    """

    def __init__(self, upstreams: Upstreams, budget: RetryBudget) -> None:
        self._upstreams = upstreams
        self._budget = budget

    def collect(self) -> Iterator[Metric]:
        ups = self._upstreams
        snapshot_now = ups.clock.now()
        healthy = GaugeMetricFamily(
            "geogate_endpoint_healthy", "1 when active probes say the endpoint is healthy",
            labels=["region", "endpoint"],
        )  # fmt: skip
        ejected = GaugeMetricFamily(
            "geogate_endpoint_ejected", "1 while outlier detection has the endpoint ejected",
            labels=["region", "endpoint"],
        )  # fmt: skip
        breaker = GaugeMetricFamily(
            "geogate_endpoint_breaker_state", "1 for the breaker's current state",
            labels=["region", "endpoint", "state"],
        )  # fmt: skip
        in_flight = GaugeMetricFamily(
            "geogate_endpoint_in_flight", "requests in flight to the endpoint",
            labels=["region", "endpoint"],
        )  # fmt: skip
        available = GaugeMetricFamily(
            "geogate_region_available", "1 while the region can take requests",
            labels=["region"],
        )  # fmt: skip
        drained = GaugeMetricFamily(
            "geogate_region_drained", "1 while an operator drains the region", labels=["region"]
        )
        latency = GaugeMetricFamily(
            "geogate_region_latency_seconds", "EWMA of probe and request round trips",
            labels=["region"],
        )  # fmt: skip
        for name, region in ups.regions.items():
            available.add_metric([name], float(region.is_available(snapshot_now)))
            drained.add_metric([name], float(region.drained))
            if region.latency is not None:
                latency.add_metric([name], region.latency)
            for e in region.endpoints:
                labels = [name, e.origin]
                healthy.add_metric(labels, float(e.healthy))
                state = region.outliers.state(e.origin)
                ejected.add_metric(labels, float(state is OutlierState.EJECTED))
                current = e.breaker.state
                for s in BreakerState:
                    breaker.add_metric([*labels, s.name.lower()], float(s is current))
                in_flight.add_metric(labels, float(e.in_flight))
        yield from (healthy, ejected, breaker, in_flight, available, drained, latency)
        retries = GaugeMetricFamily(
            "geogate_retries_in_flight", "retries in flight (the retry budget caps them)"
        )
        retries.add_metric([], float(self._budget.retries_in_flight))
        yield retries


class CacheStateCollector(Collector):
    """Scrape-time gauges of the in-process cache (L1): stored bytes and entries.

    Args:
        l1: the MemoryCache.
    """

    def __init__(self, l1: MemoryCache) -> None:
        self._l1 = l1

    def collect(self) -> Iterator[Metric]:
        stored = GaugeMetricFamily(
            "geogate_cache_stored_bytes", "bytes held by the in-process cache", labels=["tier"]
        )
        stored.add_metric(["l1"], float(self._l1.stored_bytes))
        entries = GaugeMetricFamily(
            "geogate_cache_entries", "entries held by the in-process cache", labels=["tier"]
        )
        entries.add_metric(["l1"], float(self._l1.entries))
        yield from (stored, entries)


class Metrics:
    """The gateway's counters and histograms, in their own registry.

    One instance per GatewayServer: tests read ``registry.get_sample_value(...)``; the admin
    listener serves ``registry`` at ``/metrics``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "geogate_requests", "requests answered, by route, zone and status class",
            ["route", "zone", "status_class"], registry=r,
        )  # fmt: skip
        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self.upstream_attempts = Counter(
            "geogate_upstream_attempts", "attempts sent upstream, by region and result",
            ["region", "result"], registry=r,
        )  # fmt: skip
        self.retries = Counter(
            "geogate_retries", "retries on another endpoint, by route and reason",
            ["route", "reason"], registry=r,
        )  # fmt: skip
        self.retry_budget_exhausted = Counter(
            "geogate_retry_budget_exhausted", "retries refused by the retry budget",
            ["route"], registry=r,
        )  # fmt: skip
        self.residency_blocked = Counter(
            "geogate_residency_blocked",
            "requests refused because no region of their zone was available (fail closed)",
            ["zone"], registry=r,
        )  # fmt: skip
        self.bulkhead_rejections = Counter(
            "geogate_bulkhead_rejections", "requests refused because every endpoint was full",
            ["zone"], registry=r,
        )  # fmt: skip
        self.ratelimit_decisions = Counter(
            "geogate_ratelimit_decisions",
            "rate-limit decisions by route, policy and result "
            "(allowed, limited, fallback, error)",
            ["route", "policy", "result"], registry=r,
        )  # fmt: skip
        self.ratelimit_degraded = Counter(
            "geogate_ratelimit_store_degraded",
            "times the control Redis went into trouble (breaker opened; local fallback)",
            registry=r,
        )
        self.cache_lookups = Counter(
            "geogate_cache_lookups", "cache lookups by result "
            "(hit, miss, stale, revalidated, coalesced, bypass) and zone",
            ["result", "zone"], registry=r,
        )  # fmt: skip
        self.cache_stores = Counter(
            "geogate_cache_stores", "answers stored in the cache, by zone", ["zone"], registry=r
        )
        self.ejections = Counter(
            "geogate_upstream_ejections", "outlier-detection ejections",
            ["region", "endpoint"], registry=r,
        )  # fmt: skip
        self.breaker_transitions = Counter(
            "geogate_breaker_transitions", "circuit-breaker state changes, by the new state",
            ["region", "endpoint", "state"], registry=r,
        )  # fmt: skip
        self.health_transitions = Counter(
            "geogate_health_transitions", "active-probe verdict changes",
            ["region", "endpoint", "healthy"], registry=r,
        )  # fmt: skip
        self.stream_aborts = Counter(
            "geogate_stream_aborts", "responses cut after their headers went out",
            ["region", "reason"], registry=r,
        )  # fmt: skip
        self.upstream_duration = Histogram(
            "geogate_upstream_first_byte_seconds",
            "time from sending an attempt to its response headers",
            ["region"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )  # fmt: skip

    def count_request(self, ex: Exchange) -> None:
        """Count one answered request (``geogate_requests_total``); cheap: children cached."""
        key = (ex.route.prefix if ex.route else "none", ex.zone or "none", (ex.status or 0) // 100)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(
                key[0], key[1], _STATUS_CLASSES.get(key[2], "other")
            )
        child.inc()
