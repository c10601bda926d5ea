"""Errors the gateway answers with itself, rendered as RFC 9457 problem details.

* GatewayError
  + ClientError
    - BadRequest 400 · Unauthorized 401 · RouteNotFound 404 · MethodNotAllowed 405
    - PayloadTooLarge 413 · HeaderFieldsTooLarge 431 · ResidencyUnavailable 451
  + UpstreamError
    - UpstreamConnectError 502 · UpstreamProtocolError 502
    - NoHealthyUpstream 503 (.retry_after, seconds)
    - UpstreamTimeout 504 (.phase: connect | first_byte | idle | total)
* ConfigError: raised by load and reload; never reaches a client

Rule: this module renders; it never logs and never awaits. ``problem_bytes`` is shared with
the backend package so that both speak the same problem+json dialect.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import orjson

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "PROBLEM_TYPE_BASE",
    "BadRequest",
    "ClientError",
    "ConfigError",
    "ConfigIssue",
    "GatewayError",
    "HeaderFieldsTooLarge",
    "MethodNotAllowed",
    "NoHealthyUpstream",
    "PayloadTooLarge",
    "ResidencyUnavailable",
    "RouteNotFound",
    "Unauthorized",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTimeout",
    "problem_bytes",
]

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://geogate.dev/problems/"


def problem_bytes(
    *,
    status: int,
    title: str,
    slug: str,
    detail: str | None = None,
    request_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """Serialise one RFC 9457 problem details object.

    Args:
        status: HTTP status code, repeated in the body as RFC 9457 §3.1.2 asks.
        title: short, human-readable summary that does not change between occurrences.
        slug: last segment of the problem ``type`` URI (``PROBLEM_TYPE_BASE + slug``).
        detail: explanation specific to this occurrence, or None.
        request_id: the request id, echoed so that a user can quote it to an operator.
        extra: extension members (RFC 9457 §3.2), e.g. ``{"zone": "eu"}``.

    Returns:
        UTF-8 JSON bytes for a body served as ``application/problem+json``.
    """
    body: dict[str, Any] = {"type": PROBLEM_TYPE_BASE + slug, "title": title, "status": status}
    if detail is not None:
        body["detail"] = detail
    if request_id is not None:
        body["request_id"] = request_id
    if extra:
        body.update(extra)
    return orjson.dumps(body)


class GatewayError(Exception):
    """Base of every error the gateway renders itself.

    The HTTP status lives on the class (as h11's ``error_status_hint``); ``server.py``
    renders every GatewayError in one place, with the request id.
    """

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal gateway error"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail
        self.extra: dict[str, Any] = extra

    def headers(self) -> dict[str, str]:
        """Extra response headers for this error (e.g. Retry-After)."""
        return {}

    def to_problem(self, request_id: str | None = None) -> bytes:
        """Render as RFC 9457 problem+json bytes."""
        return problem_bytes(
            status=self.status,
            title=self.title,
            slug=self.slug,
            detail=self.detail,
            request_id=request_id,
            extra=self.extra,
        )


class ClientError(GatewayError):
    """The request itself is at fault (4xx)."""

    status = 400
    slug = "bad-request"
    title = "Bad request"


class BadRequest(ClientError):
    """Malformed request: bad request line, bad header, bad URI (400, RFC 9110 §15.5.1)."""


class Unauthorized(ClientError):
    """Missing or unknown API key (401, RFC 9110 §15.5.2)."""

    status = 401
    slug = "unauthorized"
    title = "Missing or unknown API key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="geogate"'}


class RouteNotFound(ClientError):
    """No configured route matches host and path; the gateway is never an open proxy (404)."""

    status = 404
    slug = "route-not-found"
    title = "No route for this request"


class MethodNotAllowed(ClientError):
    """CONNECT and other methods the gateway never proxies (405, RFC 9110 §15.5.6)."""

    status = 405
    slug = "method-not-allowed"
    title = "Method not allowed"

    def headers(self) -> dict[str, str]:
        return {"Allow": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"}


class PayloadTooLarge(ClientError):
    """Request body longer than the route's ``max_body_bytes`` (413, RFC 9110 §15.5.14)."""

    status = 413
    slug = "payload-too-large"
    title = "Request body too large"


class HeaderFieldsTooLarge(ClientError):
    """Too many header fields, or one too long (431, RFC 6585 §5)."""

    status = 431
    slug = "header-fields-too-large"
    title = "Request header fields too large"


class ResidencyUnavailable(ClientError):
    """The request's residency zone has no region configured at all (451, RFC 7725).

    Carries ``zone`` as an extension member.
    """

    status = 451
    slug = "residency-unavailable"
    title = "No region may serve this residency zone"


class UpstreamError(GatewayError):
    """The upstream failed us (5xx)."""

    status = 502
    slug = "bad-gateway"
    title = "Bad gateway"


class UpstreamConnectError(UpstreamError):
    """No TCP connection to any allowed endpoint (502, RFC 9110 §15.6.3)."""

    slug = "upstream-connect-error"
    title = "Could not connect to an upstream"


class UpstreamProtocolError(UpstreamError):
    """The upstream closed or answered with something that is not HTTP (502)."""

    slug = "upstream-protocol-error"
    title = "Upstream answered with a broken response"


class NoHealthyUpstream(UpstreamError):
    """Every region of the zone is unavailable; the gateway fails closed (503).

    Args:
        retry_after: seconds the client should wait, sent as Retry-After (RFC 9110 §10.2.3).
    """

    status = 503
    slug = "no-healthy-upstream"
    title = "No healthy upstream in the residency zone"

    def __init__(self, detail: str | None = None, *, retry_after: int = 1, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class UpstreamTimeout(UpstreamError):
    """An upstream phase ran out of time (504, RFC 9110 §15.6.5).

    Args:
        phase: ``connect``, ``first_byte``, ``idle`` or ``total``; also an extension member.
    """

    status = 504
    slug = "upstream-timeout"
    title = "Upstream timed out"

    def __init__(self, detail: str | None = None, *, phase: str, **extra: Any) -> None:
        super().__init__(detail, phase=phase, **extra)
        self.phase = phase


class ConfigIssue:
    """One problem in a config file: where it is and what is wrong.

    Attributes:
        file: path of the YAML file that holds the offending key.
        key: dotted path of the key (``routes[1].timeouts.connect``), or ``""`` for the file.
        reason: what is wrong, in words an operator can act on.
    """

    __slots__ = ("file", "key", "reason")

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file, self.key, self.reason = file, key, reason

    def __str__(self) -> str:
        return (
            f"{self.file}:{self.key}: {self.reason}" if self.key else f"{self.file}: {self.reason}"
        )

    def __repr__(self) -> str:
        return f"<ConfigIssue {self}>"


class ConfigError(Exception):
    """The config is invalid; raised by load and reload, never sent to a client.

    Attributes:
        issues: every problem found, each rendered ``file:key: reason``.
    """

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))
