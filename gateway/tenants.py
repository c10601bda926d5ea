"""Identify stage: API key -> tenant.

Keys arrive as ``Authorization: Bearer <key>`` (RFC 6750 §2.1) or ``X-API-Key: <key>``. The
gateway stores only SHA-256 hashes (``sha256:<hex>``), looks a key up by its hash and compares
the stored and computed hashes with ``hmac.compare_digest``: the dictionary lookup works on a
digest the client cannot steer, so its timing says nothing about stored keys. Keys are never
logged, and never forwarded upstream: the gateway removes both headers on routes that
authenticate, and tells the upstream the tenant in ``X-Tenant-Id`` instead.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.errors import Unauthorized

if TYPE_CHECKING:
    from gateway.config import TenantConfig
    from gateway.exchange import Exchange
    from gateway.pipeline import LocalReply

__all__ = ["KEY_HEADERS", "Tenant", "TenantStage", "hash_key", "new_key"]

KEY_HEADERS = ("Authorization", "X-API-Key")


def hash_key(key: str) -> str:
    """The stored form of an API key: ``"sha256:" + hex(SHA-256(key))``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key(prefix: str = "gg_") -> str:
    """A new random API key (32 bytes of entropy, URL-safe)."""
    return prefix + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class Tenant:
    """A tenant as the request path sees it.

    Attributes:
        id: the tenant id (logs, metrics: never as a label, the set is unbounded).
        residency: the zone the tenant's traffic must stay in, or None (the client's country
            decides).
        limits: route prefix -> rate-limit policy name, beating the route's default.
    """

    id: str
    residency: str | None
    limits: Mapping[str, str]


class TenantStage:
    """Fill ``ex.tenant`` from the request's API key.

    Args:
        tenants: the configured tenants.
    """

    name = "identify"
    __slots__ = ("_by_hash",)

    def __init__(self, tenants: Iterable[TenantConfig]) -> None:
        self._by_hash: dict[str, tuple[str, Tenant]] = {}
        for t in tenants:
            tenant = Tenant(id=t.id, residency=t.residency, limits=dict(t.limits))
            for stored in t.keys:
                self._by_hash[stored.removeprefix("sha256:")] = (stored, tenant)

    def identify(self, key: str) -> Tenant | None:
        """The tenant whose key this is, or None."""
        computed = hashlib.sha256(key.encode()).hexdigest()
        found = self._by_hash.get(computed)
        if found is None:
            return None
        stored, tenant = found
        return tenant if hmac.compare_digest(stored, "sha256:" + computed) else None

    async def on_request(self, ex: Exchange) -> LocalReply | None:
        """Identify the tenant; strip the key before the request goes upstream.

        Raises:
            Unauthorized: the route requires a key and none was sent, or a key was sent and
                it is unknown (401 with WWW-Authenticate, RFC 9110 §11.6.1).
        """
        route = ex.route
        assert route is not None
        if route.auth == "none":
            return None
        headers = ex.request.headers
        key = _presented_key(headers.get("Authorization"), headers.get("X-API-Key"))
        if key is None:
            if route.auth == "required":
                raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
            return None
        tenant = self.identify(key)
        if tenant is None:
            raise Unauthorized("unknown API key")
        ex.tenant = tenant
        return None

    def on_complete(self, ex: Exchange) -> None:
        """Nothing to finish."""


def _presented_key(authorization: str | None, api_key: str | None) -> str | None:
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if api_key is not None and api_key.strip():
        return api_key.strip()
    return None
