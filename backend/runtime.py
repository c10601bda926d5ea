"""What a running backend holds, typed by ``AppKey``, and the request-body reader.

``build_app`` puts ``SETTINGS``, ``MODEL`` and ``STATE`` on the app; the startup context
adds ``CHAINS`` and ``HEALTH`` once the region's documents are loaded. Route modules read
them from ``request.app``; none of them builds a runnable per request.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from langchain_core.language_models import BaseChatModel

from backend.chains import RegionChains
from backend.errors import InvalidJson, PayloadTooLarge
from backend.health import HealthProbe
from backend.settings import BackendSettings

__all__ = [
    "CHAINS",
    "HEALTH",
    "MODEL",
    "SETTINGS",
    "STATE",
    "BackendState",
    "Phase",
    "read_json",
]


class Phase(enum.Enum):
    """Life of a backend process.

    STARTING: documents not loaded yet; ``/ready`` answers 503 -> READY once startup ends.
    READY: serving; ``/ready`` answers 200 -> DRAINING on SIGTERM/SIGINT or app shutdown.
    DRAINING: in-flight requests finish; ``/ready`` and ``/health`` answer 503. Final.
    """

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


@dataclass(slots=True)
class BackendState:
    """Mutable lifecycle state of one app.

    Attributes:
        phase: see ``Phase``.
        documents: sections the retriever indexed at startup.
    """

    phase: Phase = Phase.STARTING
    documents: int = 0

    def __repr__(self) -> str:
        return f"<BackendState {self.phase.name} documents={self.documents}>"


SETTINGS = web.AppKey("settings", BackendSettings)
MODEL = web.AppKey("model", BaseChatModel)
STATE = web.AppKey("state", BackendState)
CHAINS = web.AppKey("chains", RegionChains)
HEALTH = web.AppKey("health", HealthProbe)


async def read_json(request: web.Request) -> Any:
    """Read and parse the request body as JSON, within ``max_body_bytes``.

    Args:
        request: the request; its app holds ``SETTINGS``.

    Returns:
        The parsed JSON value (any type; callers check the shape).

    Raises:
        PayloadTooLarge: ``Content-Length`` or the bytes read exceed ``max_body_bytes`` (413).
        InvalidJson: the body is empty or not JSON (400).
    """
    limit = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(
            f"body of {request.content_length} bytes is over the limit of {limit} bytes",
            max_body_bytes=limit,
        )
    try:
        raw = await request.read()  # the app's client_max_size is ``limit``
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(
            f"body is over the limit of {limit} bytes", max_body_bytes=limit
        ) from exc
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"body is not valid JSON: {exc}") from exc
