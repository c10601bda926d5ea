"""Prometheus metrics, declared in one place (as Envoy declares its stats).

Names carry the ``geogate_`` prefix and base units (``_seconds``, ``_total``); labels come
only from bounded sets: zone, region, endpoint (from config), route prefix, status class,
result, reason (Prometheus naming guide, https://prometheus.io/docs/practices/naming/).
Tenant ids, paths and client addresses are never labels. State that already lives in other
objects (health, ejection, breaker state, latency, GeoIP lookup counts) is read at scrape time
by a collector instead of being mirrored into metrics on the request path.

Request timeline (``time.monotonic()`` seconds) and the histograms cut from it::

    start        first_sent      upstream_headers_at    headers_sent          end
      |--overhead--|--upstream first byte--|--overhead--|--streaming body--|
      |-------------------- request_first_byte ---------|                  |
      |------------------------------ request_duration ---------------------|
                   |---------------- upstream_duration (attempt sent -> body end) ---|

Hot path: the request-path families (requests, attempts, rate-limit decisions, cache lookups
and stores, the five latency histograms) are ``LoopCounter``/``LoopHistogram``: plain numbers
updated without a lock from the event loop, rendered through prometheus_client's metric
families at scrape time. One request costs a dict lookup and an addition per family.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway import __version__
from gateway.breaker import BreakerState
from gateway.outlier import OutlierState

if TYPE_CHECKING:
    from gateway.budget import RetryBudget
    from gateway.cachestore import MemoryCache
    from gateway.exchange import Exchange
    from gateway.geo import GeoDatabase
    from gateway.upstreams import Upstreams

__all__ = [
    "LATENCY_BUCKETS",
    "OVERHEAD_BUCKETS",
    "CacheStateCollector",
    "GeoCollector",
    "LoopCounter",
    "LoopHistogram",
    "Metrics",
    "UpstreamStateCollector",
]


_STATUS_CLASSES = {0: "none", 1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}

# seconds: from a loopback hop (sub-millisecond) to a long LLM answer (the last bucket, 30 s,
# below the default first_byte timeout of 60 s; longer ones land in +Inf)
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# seconds: the gateway's own share is tens to hundreds of microseconds, so the buckets start
# lower; an overhead of a second means something queued on the loop (GC, blocking call)
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip


class _CounterChild:
    """One label set of a LoopCounter."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0; not checked: the callers count events)."""
        self.value += amount


class _HistogramChild:
    """One label set of a LoopHistogram: per-bucket counts (not cumulative) and the sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count ``value`` (seconds) in the first bucket whose upper bound is >= it."""
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value


_C = TypeVar("_C", _CounterChild, _HistogramChild)


class _LoopFamily(Collector, Generic[_C]):
    """A labelled metric family updated from one event loop: children are plain numbers.

    prometheus_client's Counter and Histogram take a lock on every update (a Histogram twice,
    walking its bounds in Python): about 0.5 and 2 µs, several times per request. The gateway
    updates and scrapes its metrics on its event-loop thread only, so the request path needs
    no lock; the families are rendered at scrape time through prometheus_client's own
    ``*MetricFamily`` classes, so the exposition is the library's.

    Args:
        name: the family name (a counter's without ``_total``).
        documentation: the HELP text.
        labelnames: label names, in the order ``labels()`` takes values.
        registry: where the family is registered.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _C] = {}
        registry.register(self)

    def _new_child(self) -> _C:
        raise NotImplementedError

    def _family(self) -> Metric:
        raise NotImplementedError

    def labels(self, *values: str) -> _C:
        """The child of one label set (made on first use; a dict lookup after that).

        Raises:
            ValueError: not one value per label name.
        """
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
            child = self._children[values] = self._new_child()
        return child

    def describe(self) -> Iterator[Metric]:
        yield self._family()


class LoopCounter(_LoopFamily[_CounterChild]):
    """A labelled Prometheus counter for the request path (see ``_LoopFamily``)."""

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` to the family without labels."""
        self.labels().inc(amount)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in self._children.items():
            family.add_metric(list(values), child.value)
        yield family


class LoopHistogram(_LoopFamily[_HistogramChild]):
    """A labelled Prometheus histogram for the request path (see ``_LoopFamily``).

    An observation is a ``bisect`` and two additions; counts are made cumulative at scrape
    time (``_bucket{le}``, ``_count``, ``_sum``).

    Args:
        name: the family name, e.g. ``geogate_request_duration_seconds``.
        documentation: the HELP text.
        labelnames: label names, in the order ``labels()`` takes values.
        buckets: upper bounds, seconds, ascending; ``+Inf`` is added.
        registry: where the family is registered.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._bounds = (*(float(b) for b in buckets), math.inf)
        super().__init__(name, documentation, labelnames, registry=registry)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self._bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        les = [floatToGoString(b) for b in self._bounds]  # type: ignore[no-untyped-call]
        for values, child in self._children.items():
            running, buckets = 0, []
            for le, count in zip(les, child.counts, strict=True):
                running += count
                buckets.append((le, float(running)))
            family.add_metric(list(values), buckets, child.sum)
        yield family


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


class GeoCollector(Collector):
    """Scrape-time GeoIP figures of the database in use (it may be swapped by a reload).

    ``geogate_geoip_lookups_total{result}`` (result: found, not_found, special, error) comes
    from the database's ``LookupCounts``; ``geogate_geoip_database_build_timestamp_seconds``
    from its MaxMind DB metadata ``build_epoch`` (seconds since the Unix epoch), so an
    operator can alert on a stale database. Nothing is exported while no database is open.

    Args:
        geodb: returns the database in use, or None.
    """

    def __init__(self, geodb: Callable[[], GeoDatabase | None]) -> None:
        self._geodb = geodb

    def collect(self) -> Iterator[Metric]:
        db = self._geodb()
        if db is None:
            return
        lookups = CounterMetricFamily(
            "geogate_geoip_lookups", "GeoIP lookups by result (found, not_found, special, error)",
            labels=["result"],
        )  # fmt: skip
        for result, count in db.counts.as_dict().items():
            lookups.add_metric([result], float(count))
        built = GaugeMetricFamily(
            "geogate_geoip_database_build_timestamp_seconds",
            "build time of the GeoIP database in use (MaxMind DB metadata build_epoch)",
        )
        built.add_metric([], float(db.build_epoch))
        yield from (lookups, built)


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
    listener serves ``registry`` at ``/metrics``. Histograms use ``LATENCY_BUCKETS`` (seconds),
    the gateway overhead ``OVERHEAD_BUCKETS``.

    Args:
        registry: where to register; a new CollectorRegistry when None.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        Info("geogate_build", "the running gateway's version", registry=r).info(
            {"version": __version__}
        )
        self.requests = LoopCounter(
            "geogate_requests",
            "requests answered, by route, zone, serving region (none: answered by the gateway) "
            "and status class",
            ["route", "zone", "region", "status_class"], registry=r,
        )  # fmt: skip
        self.request_duration = LoopHistogram(
            "geogate_request_duration_seconds",
            "request received -> response complete (a streamed body included)",
            ["route", "zone"], registry=r, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.request_first_byte = LoopHistogram(
            "geogate_request_first_byte_seconds",
            "request received -> response headers sent to the client",
            ["route", "zone"], registry=r, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.gateway_overhead = LoopHistogram(
            "geogate_gateway_overhead_seconds",
            "time spent in the gateway itself: received -> first attempt sent, plus upstream "
            "headers received -> client headers sent; a local reply's whole time to first byte",
            ["route"], registry=r, buckets=OVERHEAD_BUCKETS,
        )  # fmt: skip
        self.upstream_attempts = LoopCounter(
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
        self.ratelimit_decisions = LoopCounter(
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
        self.cache_lookups = LoopCounter(
            "geogate_cache_lookups", "cache lookups by result "
            "(hit, miss, stale, revalidated, coalesced, bypass) and zone",
            ["result", "zone"], registry=r,
        )  # fmt: skip
        self.cache_stores = LoopCounter(
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
        self.upstream_first_byte = LoopHistogram(
            "geogate_upstream_first_byte_seconds",
            "time from sending an attempt to its response headers",
            ["region"], registry=r, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.upstream_duration = LoopHistogram(
            "geogate_upstream_duration_seconds",
            "time from sending an attempt to the end of its response body",
            ["region"], registry=r, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        # config reloads (gateway.reload): the running version is the one label set at 1
        self.config_info = Gauge(
            "geogate_config_info", "1 for the running config version (sha256 prefix)",
            ["version"], registry=r,
        )  # fmt: skip
        self.config_reloads = Counter(
            "geogate_config_reloads", "config reloads by result (success, error)",
            ["result"], registry=r,
        )  # fmt: skip
        for result in ("success", "error"):
            self.config_reloads.labels(result)
        self.config_last_reload = Gauge(
            "geogate_config_last_reload_timestamp_seconds",
            "Unix time the running config was loaded (at start or by the last successful reload)",
            registry=r,
        )

    def observe_upstream_first_byte(self, region: str, seconds: float) -> None:
        """One attempt's wait for response headers (``geogate_upstream_first_byte_seconds``).

        Args:
            region: the endpoint's region.
            seconds: attempt sent -> response headers received.
        """
        self.upstream_first_byte.labels(region).observe(seconds)

    def observe_upstream_duration(self, region: str, seconds: float) -> None:
        """One attempt whose body was read to its end (``geogate_upstream_duration_seconds``).

        Args:
            region: the endpoint's region.
            seconds: attempt sent -> last body byte received.
        """
        self.upstream_duration.labels(region).observe(seconds)

    def observe_request(self, ex: Exchange, end: float) -> None:
        """Count one finished request and observe its timings (a dict lookup per family).

        ``geogate_requests_total`` and ``geogate_request_duration_seconds`` always (a client
        that left ends the duration early); ``geogate_request_first_byte_seconds`` and
        ``geogate_gateway_overhead_seconds`` once response headers went out. When no upstream
        answered (502 or 504 after the attempts), only the overhead before the first attempt
        is observed: the gap between the last failure and the answer is not the gateway's.

        Args:
            ex: the finished exchange: ``route``, ``zone``, ``endpoint`` (its region is the
                region label; "none" when no attempt was made), ``status`` and the
                timestamps.
            end: monotonic time the response was complete (or the handler ended), seconds.
        """
        route = ex.route.prefix if ex.route is not None else "none"
        zone = ex.zone or "none"
        endpoint = ex.endpoint
        region = endpoint.region if endpoint is not None else "none"
        status_class = _STATUS_CLASSES.get((ex.status or 0) // 100, "other")
        self.requests.labels(route, zone, region, status_class).inc()
        start = ex.start
        self.request_duration.labels(route, zone).observe(end - start)
        sent = ex.headers_sent
        if sent is None:
            return
        self.request_first_byte.labels(route, zone).observe(sent - start)
        overhead = self.gateway_overhead.labels(route)
        first = ex.first_sent
        if first is None:  # a local reply: cache hit, 401, 429, ...
            overhead.observe(sent - start)
            return
        own = first - start
        answered = ex.upstream_headers_at
        if answered is not None and answered <= sent:
            own += sent - answered
        overhead.observe(own)
