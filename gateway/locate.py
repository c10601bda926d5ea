"""Locate stage: client address -> country -> residency zone -> candidate regions.

The client address is the socket peer, or the right-most X-Forwarded-For / Forwarded entry
that is not a trusted proxy (``gateway.forwarded``); the country comes from the GeoIP database
(``gateway.geo``), the zone and regions from ``ResidencyRules``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.forwarded import TrustedProxies, client_address

if TYPE_CHECKING:
    from gateway.exchange import Exchange
    from gateway.geo import GeoDatabase
    from gateway.pipeline import LocalReply
    from gateway.residency import ResidencyRules

__all__ = ["LocateStage"]


class LocateStage:
    """Fill ``client_ip``, ``country``, ``zone`` and ``regions`` on the Exchange.

    Args:
        geodb: the open GeoIP database.
        rules: the residency rules.
        trusted: proxies whose forwarding headers are believed.
        header: ``gateway.client_address_header``: which header names the client.
    """

    name = "locate"
    __slots__ = ("_geodb", "_rules", "_trusted", "_use_forwarded", "_use_xff")

    def __init__(
        self,
        geodb: GeoDatabase,
        rules: ResidencyRules,
        trusted: TrustedProxies,
        *,
        header: str = "x-forwarded-for",
    ) -> None:
        self._geodb = geodb
        self._rules = rules
        self._trusted = trusted
        self._use_xff = header in ("x-forwarded-for", "both")
        self._use_forwarded = header in ("forwarded", "both")

    async def on_request(self, ex: Exchange) -> LocalReply | None:
        """Decide the zone (tenant pin > country > default) and its candidate regions.

        Raises:
            ResidencyUnavailable: no region serves the zone (451).
        """
        request = ex.request
        headers = request.headers
        peer = request.remote
        xff = headers.getall("X-Forwarded-For", None) if self._use_xff else None
        fwd = headers.getall("Forwarded", None) if self._use_forwarded else None
        ip, _ = client_address(
            peer,
            x_forwarded_for=",".join(xff) if xff else None,
            forwarded=",".join(fwd) if fwd else None,
            trusted=self._trusted,
        )
        ex.peer_trusted = peer is not None and self._trusted.trusts(peer)
        ex.client_ip = ip
        ex.country = country = self._geodb.lookup(ip) if ip is not None else None
        tenant = ex.tenant
        decision = self._rules.decide(
            country=country, tenant_pin=tenant.residency if tenant is not None else None
        )
        ex.zone = decision.zone
        ex.zone_source = decision.source
        ex.regions = self._rules.regions_for(decision.zone)
        return None

    def on_complete(self, ex: Exchange) -> None:
        """Nothing to finish: the zone stays on the Exchange for later stages and the log."""
