"""Errors the backend answers with, rendered as RFC 9457 problem details.

The body is made by ``gateway.errors.problem_bytes`` so gateway and backend speak one
problem+json dialect; the status lives on the class, as in ``gateway.errors``.

* BackendError
  - BadRequest 400 · InvalidJson 400 · RouteNotFound 404 · UnknownChain 404 · UnknownModel 404
  - MethodNotAllowed 405 · PayloadTooLarge 413 · InvalidInput 422
  - ResidencyMismatch 451
  - InternalError 500 · NotReady 503 · Unhealthy 503

Rule: this module renders; it never logs and never awaits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from aiohttp import web

from gateway.errors import PROBLEM_CONTENT_TYPE, problem_bytes

__all__ = [
    "BackendError",
    "BadRequest",
    "InternalError",
    "InvalidInput",
    "InvalidJson",
    "MethodNotAllowed",
    "NotReady",
    "PayloadTooLarge",
    "ResidencyMismatch",
    "RouteNotFound",
    "Unhealthy",
    "UnknownChain",
    "UnknownModel",
]


class BackendError(Exception):
    """Base of every error the backend renders itself.

    Args:
        detail: explanation specific to this occurrence (RFC 9457 ``detail``).
        param: the request field at fault, reported as ``error.param`` on ``/v1/`` routes.
        **extra: extension members (RFC 9457 §3.2), e.g. ``zone="eu"``.
    """

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"
    openai_type: ClassVar[str] = "server_error"

    def __init__(self, detail: str | None = None, *, param: str | None = None, **extra: Any):
        super().__init__(detail or self.title)
        self.detail = detail
        self.param = param
        self.extra: dict[str, Any] = extra

    def headers(self) -> dict[str, str]:
        """Extra response headers for this error (e.g. ``Allow``)."""
        return {}

    def to_response(self, *, openai: bool = False) -> web.Response:
        """Render as an ``application/problem+json`` response.

        Args:
            openai: add an ``error`` member shaped as the OpenAI API reference's error object
                (``message``, ``type``, ``param``, ``code``), which the ``openai`` client
                reads for its exception message.

        Returns:
            A response with ``status``, the problem body and ``headers()``.
        """
        extra: Mapping[str, Any] = self.extra
        if openai:
            extra = {
                **self.extra,
                "error": {
                    "message": self.detail or self.title,
                    "type": self.openai_type,
                    "param": self.param,
                    "code": self.slug,
                },
            }
        body = problem_bytes(
            status=self.status, title=self.title, slug=self.slug, detail=self.detail, extra=extra
        )
        return web.Response(
            status=self.status,
            body=body,
            content_type=PROBLEM_CONTENT_TYPE,
            headers=self.headers(),
        )


class BadRequest(BackendError):
    """Any other malformed request aiohttp refused (400, RFC 9110 §15.5.1)."""

    status = 400
    slug = "bad-request"
    title = "Bad request"
    openai_type = "invalid_request_error"


class InvalidJson(BackendError):
    """The body is not JSON (400, RFC 9110 §15.5.1)."""

    status = 400
    slug = "invalid-json"
    title = "Request body is not valid JSON"
    openai_type = "invalid_request_error"


class RouteNotFound(BackendError):
    """No route for this method and path (404)."""

    status = 404
    slug = "route-not-found"
    title = "No route for this request"
    openai_type = "invalid_request_error"


class UnknownChain(BackendError):
    """``/{chain}/...`` names a chain this backend does not serve (404). ``chain`` member."""

    status = 404
    slug = "unknown-chain"
    title = "No such chain"
    openai_type = "invalid_request_error"


class UnknownModel(BackendError):
    """``model`` names no model of ``/v1/models`` (404, as the OpenAI API does)."""

    status = 404
    slug = "model-not-found"
    title = "No such model"
    openai_type = "invalid_request_error"


class MethodNotAllowed(BackendError):
    """The path exists, the method does not (405, RFC 9110 §15.5.6).

    Args:
        allowed: methods the path accepts, sent as ``Allow``.
    """

    status = 405
    slug = "method-not-allowed"
    title = "Method not allowed"
    openai_type = "invalid_request_error"

    def __init__(self, detail: str | None = None, *, allowed: frozenset[str], **extra: Any):
        super().__init__(detail, **extra)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(sorted(self.allowed))}


class PayloadTooLarge(BackendError):
    """Body longer than ``max_body_bytes`` (413, RFC 9110 §15.5.14). ``max_body_bytes`` member."""

    status = 413
    slug = "payload-too-large"
    title = "Request body too large"
    openai_type = "invalid_request_error"


class InvalidInput(BackendError):
    """Valid JSON of the wrong shape (422, RFC 9110 §15.5.21).

    ``errors`` member: pydantic-style ``[{"loc": [...], "msg": ..., "type": ...}]``, the
    detail FastAPI (hence LangServe) gives for a request validation error.
    """

    status = 422
    slug = "invalid-input"
    title = "Request does not match the input schema"
    openai_type = "invalid_request_error"


class ResidencyMismatch(BackendError):
    """``X-Residency-Zone`` names a zone this region does not serve (451, RFC 7725).

    Defence in depth: the gateway should never route such a request here. Members: ``zone``
    (as sent), ``region`` and ``zones`` (what this region serves).
    """

    status = 451
    slug = "residency-mismatch"
    title = "This region may not serve the request's residency zone"
    openai_type = "invalid_request_error"


class InternalError(BackendError):
    """A bug; the traceback goes to the log, never to the client (500)."""


class NotReady(BackendError):
    """Starting or draining; ``/ready`` and ``/health`` say so (503, RFC 9110 §15.6.4)."""

    status = 503
    slug = "not-ready"
    title = "Backend is not ready"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class Unhealthy(BackendError):
    """The deep health probe failed (503). ``checks`` member says which check and why."""

    status = 503
    slug = "unhealthy"
    title = "Backend is unhealthy"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}
