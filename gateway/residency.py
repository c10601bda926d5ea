"""Residency decisions: which zone a request belongs to, and which regions may serve it.

Rule: this module decides; it never resolves an address, reads a header or touches Redis.
Invariant: ``regions_for(zone)`` only ever lists regions whose config names ``zone``; the
forwarder never looks anywhere else, so a request of zone Z is only ever served in Z.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from gateway.errors import ResidencyUnavailable

__all__ = ["ResidencyRules", "ZoneDecision"]


@dataclass(frozen=True, slots=True)
class ZoneDecision:
    """The zone of one request and why.

    Attributes:
        zone: the residency zone name.
        source: ``"tenant"`` (tenant pin), ``"country"`` (a country rule) or ``"default"``.
    """

    zone: str
    source: str


class ResidencyRules:
    """Country -> zone, and zone -> ordered regions, precomputed at config load.

    Args:
        zone_countries: zone name -> ISO 3166-1 alpha-2 codes of that zone.
        default_zone: zone of a request whose country is unknown or in no zone.
        region_zones: region name -> zones it serves, in config order.
        own_region: this gateway's region; first in every list that contains it.
    """

    __slots__ = ("_decisions", "_default", "_regions", "zones")

    def __init__(
        self,
        *,
        zone_countries: Mapping[str, Iterable[str]],
        default_zone: str,
        region_zones: Mapping[str, Sequence[str]],
        own_region: str,
    ) -> None:
        self.zones = frozenset(zone_countries)
        self._default = ZoneDecision(default_zone, "default")
        ordered = sorted(region_zones, key=lambda r: r != own_region)  # stable: config order
        self._regions = {
            zone: tuple(r for r in ordered if zone in region_zones[r]) for zone in self.zones
        }
        # shared immutable results: no allocation per request
        self._decisions = {
            c: ZoneDecision(z, "country") for z, cs in zone_countries.items() for c in cs
        }

    def decide(self, *, country: str | None, tenant_pin: str | None = None) -> ZoneDecision:
        """Return the residency zone allowed to see this request.

        Precedence: tenant pin, then the country rule, then ``default_zone``.

        Args:
            country: ISO 3166-1 alpha-2 code such as ``"DE"``; None when the client address is
                private or missing from the GeoIP database.
            tenant_pin: zone name from the tenant record, or None.

        Returns:
            The ZoneDecision. Upstream, cache and log sink for the request must belong to it.
        """
        if tenant_pin is not None:
            return ZoneDecision(tenant_pin, "tenant")
        if country is None:
            return self._default
        return self._decisions.get(country, self._default)

    def has_regions(self, zone: str) -> bool:
        """True when at least one region serves ``zone``."""
        return bool(self._regions.get(zone))

    def regions_for(self, zone: str) -> tuple[str, ...]:
        """Regions that may serve ``zone``: the gateway's own region first, then config order.

        Raises:
            ResidencyUnavailable: no region serves ``zone`` (451, RFC 7725).
        """
        regions = self._regions.get(zone)
        if not regions:
            raise ResidencyUnavailable(f"no region serves residency zone {zone!r}", zone=zone)
        return regions

    def __repr__(self) -> str:
        return f"<ResidencyRules zones={sorted(self.zones)} default={self._default.zone}>"
