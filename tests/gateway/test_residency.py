"""Residency rules: precedence, region order, 451."""

from __future__ import annotations

import pytest

from gateway.errors import ResidencyUnavailable
from gateway.residency import ResidencyRules


@pytest.fixture
def rules() -> ResidencyRules:
    return ResidencyRules(
        zone_countries={"eu": ["DE", "GB"], "us": ["US"], "global": [], "cn": ["CN"]},
        default_zone="global",
        region_zones={
            "us-east-1": ["us", "global"],
            "eu-west-1": ["eu", "global"],
            "eu-central-1": ["eu", "global"],
            "ap-southeast-1": ["global"],
        },
        own_region="eu-central-1",
    )


@pytest.mark.parametrize(
    ("country", "pin", "zone", "source"),
    [
        ("DE", None, "eu", "country"),
        ("GB", None, "eu", "country"),
        ("US", None, "us", "country"),
        ("JP", None, "global", "default"),
        (None, None, "global", "default"),
        ("US", "eu", "eu", "tenant"),  # tenant pin beats the country
        (None, "us", "us", "tenant"),
    ],
)
def test_decide_precedence(
    rules: ResidencyRules, country: str | None, pin: str | None, zone: str, source: str
) -> None:
    decision = rules.decide(country=country, tenant_pin=pin)
    assert (decision.zone, decision.source) == (zone, source)


def test_regions_own_region_first_then_config_order(rules: ResidencyRules) -> None:
    assert rules.regions_for("eu") == ("eu-central-1", "eu-west-1")
    assert rules.regions_for("global") == (
        "eu-central-1", "us-east-1", "eu-west-1", "ap-southeast-1",
    )  # fmt: skip
    assert rules.regions_for("us") == ("us-east-1",)


def test_zone_without_regions_is_451(rules: ResidencyRules) -> None:
    with pytest.raises(ResidencyUnavailable) as info:
        rules.regions_for("cn")
    assert info.value.status == 451
    assert info.value.extra == {"zone": "cn"}


def test_regions_never_include_a_region_outside_the_zone(rules: ResidencyRules) -> None:
    region_zones = {
        "us-east-1": ["us", "global"], "eu-west-1": ["eu", "global"],
        "eu-central-1": ["eu", "global"], "ap-southeast-1": ["global"],
    }  # fmt: skip
    for zone in ("eu", "us", "global"):
        assert all(zone in region_zones[r] for r in rules.regions_for(zone))
