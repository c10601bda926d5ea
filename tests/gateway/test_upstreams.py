"""Region availability, ordering and endpoint choice, with a manual clock."""

from __future__ import annotations

import random

import orjson
import pytest

from gateway.breaker import BreakerState
from gateway.clock import ManualClock
from gateway.config import RegionConfig, UpstreamConfig
from gateway.upstreams import Upstreams

US1, US2 = "http://127.0.0.1:9101", "http://127.0.0.1:9102"
EUW, EUC = "http://127.0.0.1:9201", "http://127.0.0.1:9301"


def make(clock: ManualClock, **upstream: object) -> Upstreams:
    regions = {
        "us-east-1": RegionConfig(zones=("us", "global"), endpoints=(US1, US2)),
        "eu-west-1": RegionConfig(zones=("eu", "global"), endpoints=(EUW,)),
        "eu-central-1": RegionConfig(zones=("eu", "global"), endpoints=(EUC,)),
    }
    cfg = UpstreamConfig.model_validate(
        {"outlier": {"consecutive_failures": 2, "base_ejection_time": 10},
         "breaker": {"fail_max": 3, "reset_timeout": 30}} | upstream
    )  # fmt: skip
    return Upstreams(regions, cfg, own_region="us-east-1", clock=clock, rng=random.Random(3))


def names(ups: Upstreams, zone_regions: tuple[str, ...]) -> list[str]:
    return [r.name for r in ups.candidates(zone_regions)]


def test_own_region_first_then_latency_then_config_order(manual_clock: ManualClock) -> None:
    ups = make(manual_clock)
    everyone = ("eu-west-1", "eu-central-1", "us-east-1")
    assert names(ups, everyone) == ["us-east-1", "eu-west-1", "eu-central-1"]
    ups.record_rtt(ups.endpoints[EUC], 0.005)
    ups.record_rtt(ups.endpoints[EUW], 0.050)
    assert names(ups, everyone) == ["us-east-1", "eu-central-1", "eu-west-1"]
    assert names(ups, ("eu-west-1", "eu-central-1")) == ["eu-central-1", "eu-west-1"]


def test_latency_is_an_ewma(manual_clock: ManualClock) -> None:
    ups = make(manual_clock, latency_ewma_alpha=0.5)
    ep = ups.endpoints[EUW]
    ups.record_rtt(ep, 0.010)
    ups.record_rtt(ep, 0.030)
    assert ep.latency == pytest.approx(0.020)
    assert ups.regions["eu-west-1"].latency == pytest.approx(0.020)


def test_unhealthy_drained_and_ejected_regions_are_not_candidates(
    manual_clock: ManualClock,
) -> None:
    ups = make(manual_clock)
    eu = ("eu-west-1", "eu-central-1")
    ups.set_health(EUW, False)
    assert names(ups, eu) == ["eu-central-1"]
    ups.set_drained("eu-central-1", True)
    assert names(ups, eu) == []  # fail closed: nothing outside the zone is offered
    ups.set_drained("eu-central-1", False)
    ups.set_health(EUW, True)
    for _ in range(2):  # two consecutive failures eject eu-west-1's only endpoint
        lease = ups.acquire(ups.candidates(("eu-west-1",)))
        assert lease is not None
        lease.release(False)
    assert names(ups, eu) == ["eu-central-1"]
    manual_clock.advance(10)  # ejection over: back through a trial
    assert names(ups, eu) == ["eu-west-1", "eu-central-1"]


def test_open_breaker_makes_the_endpoint_unavailable_until_half_open(
    manual_clock: ManualClock,
) -> None:
    ups = make(manual_clock, outlier={"consecutive_failures": 100})
    for _ in range(3):
        lease = ups.acquire(ups.candidates(("eu-west-1",)))
        assert lease is not None
        lease.release(False)
    assert ups.endpoints[EUW].breaker.state is BreakerState.OPEN
    assert ups.acquire([ups.regions["eu-west-1"]]) is None  # at once, no upstream call
    manual_clock.advance(30)
    lease = ups.acquire([ups.regions["eu-west-1"]])
    assert lease is not None  # the one half-open trial
    assert ups.acquire([ups.regions["eu-west-1"]]) is None  # no second trial at once
    lease.release(True)
    assert ups.endpoints[EUW].breaker.state is BreakerState.CLOSED


def test_acquire_skips_tried_endpoints_and_spills_within_the_given_regions(
    manual_clock: ManualClock,
) -> None:
    ups = make(manual_clock)
    regions = ups.candidates(("us-east-1",))
    first = ups.acquire(regions)
    assert first is not None
    second = ups.acquire(regions, {first.endpoint})
    assert second is not None
    assert {first.endpoint.origin, second.endpoint.origin} == {US1, US2}
    assert ups.acquire(regions, {first.endpoint, second.endpoint}) is None
    for lease in (first, second):
        lease.release(True)
    assert ups.endpoints[US1].in_flight == ups.endpoints[US2].in_flight == 0


def test_bulkhead(manual_clock: ManualClock) -> None:
    ups = make(manual_clock, max_concurrent_per_endpoint=1)
    regions = ups.candidates(("eu-west-1",))
    lease = ups.acquire(regions)
    assert lease is not None
    assert ups.acquire(regions) is None
    assert ups.is_bulkhead_full(regions)
    lease.release(True)
    assert not ups.is_bulkhead_full(regions)


def test_retry_after_holds_an_endpoint(manual_clock: ManualClock) -> None:
    ups = make(manual_clock)
    ups.hold(ups.endpoints[EUW], 5)
    assert names(ups, ("eu-west-1", "eu-central-1")) == ["eu-central-1"]
    manual_clock.advance(5)
    assert "eu-west-1" in names(ups, ("eu-west-1", "eu-central-1"))
    ups.hold(ups.endpoints[EUW], 10_000)  # capped
    manual_clock.advance(60)
    assert "eu-west-1" in names(ups, ("eu-west-1", "eu-central-1"))


def test_lease_releases_once(manual_clock: ManualClock) -> None:
    ups = make(manual_clock)
    lease = ups.acquire(ups.candidates(("eu-west-1",)))
    assert lease is not None
    lease.release(True)
    lease.release(False)  # ignored: one outcome per attempt
    assert ups.endpoints[EUW].in_flight == 0
    assert ups.endpoints[EUW].breaker.snapshot()["failures"] == 0


def test_snapshot_is_json_ready(manual_clock: ManualClock) -> None:
    ups = make(manual_clock)
    data = orjson.loads(orjson.dumps(ups.snapshot()))
    assert data["eu-west-1"]["endpoints"][0]["url"] == EUW
    assert data["us-east-1"]["available"] is True
