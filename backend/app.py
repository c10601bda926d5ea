"""The backend's aiohttp application: routes, residency guard, problem rendering, health.

Request path: ``guard`` middleware (residency check, then every error rendered as
problem+json) -> route handler (``remote.py``: LangServe routes, ``completions.py``:
OpenAI routes, here: ``/health``, ``/ready``). ``X-Served-Region`` is stamped on every
response, streams and errors included, by an ``on_response_prepare`` hook, the one place
that sees each response just before its headers leave.

Startup (``cleanup_ctx``): read the region's documents in a worker thread, index them,
build the chains and the health probe once, then READY. Shutdown: DRAINING first, so
``/ready`` answers 503 while in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
from aiohttp import web

from backend import completions, remote
from backend.chains import build_chains
from backend.errors import (
    BackendError,
    BadRequest,
    InternalError,
    MethodNotAllowed,
    NotReady,
    PayloadTooLarge,
    ResidencyMismatch,
    RouteNotFound,
    Unhealthy,
)
from backend.health import HealthProbe
from backend.models import make_chat_model
from backend.retriever import LexicalRetriever, load_documents
from backend.runtime import CHAINS, HEALTH, MODEL, SETTINGS, STATE, BackendState, Phase
from backend.settings import BackendSettings

__all__ = [
    "RESIDENCY_HEADER",
    "SERVED_REGION_HEADER",
    "BackendSettings",
    "begin_drain",
    "build_app",
    "guard",
]

log = logging.getLogger(__name__)

RESIDENCY_HEADER = "X-Residency-Zone"
SERVED_REGION_HEADER = "X-Served-Region"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _from_http_exception(exc: web.HTTPException) -> BackendError:
    if exc.status == 404:
        return RouteNotFound("no route for this method and path")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(
            f"{exc.method} is not allowed here", allowed=frozenset(exc.allowed_methods)
        )
    if exc.status == 413:
        return PayloadTooLarge(exc.text)
    if exc.status < 500:
        return BadRequest(exc.reason)
    return InternalError(exc.reason)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse residency mismatches (451), then render every error as problem+json.

    No ``X-Residency-Zone`` header means direct use and is allowed; a header naming a zone
    outside ``settings.zones`` (an empty value included) is refused, as defence in depth
    behind the gateway's own residency decision.
    """
    openai = request.path.startswith("/v1/")
    zone = request.headers.get(RESIDENCY_HEADER)
    if zone is not None:
        settings = request.app[SETTINGS]
        if not settings.serves(zone):
            error = ResidencyMismatch(
                f"region {settings.region} serves zones {', '.join(settings.zones)}, not {zone!r}",
                zone=zone,
                region=settings.region,
                zones=list(settings.zones),
            )
            return error.to_response(openai=openai)
    try:
        return await handler(request)
    except BackendError as exc:
        return exc.to_response(openai=openai)
    except web.HTTPException as exc:
        return _from_http_exception(exc).to_response(openai=openai)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return InternalError("the backend failed; see its log").to_response(openai=openai)


async def health(request: web.Request) -> web.Response:
    """Deep check: the model answers a one-token prompt and the retriever returns documents.

    See ``health.HealthProbe``: no model delays, each check bounded by
    ``settings.health_timeout`` (s), one report reused for ``settings.health_ttl`` (s).

    Returns:
        200 ``{"status": "ok", "region", "zones", "provider", "age_s", "checks"}``; each
        check has ``ok`` and ``latency_ms``.

    Raises:
        NotReady: starting or draining (503).
        Unhealthy: a check failed; ``checks`` holds each one's ``ok`` and ``reason`` (503).
    """
    app = request.app
    state = app[STATE]
    if state.phase is not Phase.READY:
        raise NotReady(f"backend is {state.phase.value}", phase=state.phase.value)
    settings = app[SETTINGS]
    report = await app[HEALTH].report()
    if not report.ok:
        raise Unhealthy(report.reasons(), region=settings.region, checks=report.checks)
    body = {
        "status": "ok",
        "region": settings.region,
        "zones": list(settings.zones),
        "provider": settings.provider,
        "age_s": round(asyncio.get_running_loop().time() - report.checked_at, 3),
        "checks": report.checks,
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    """Cheap readiness: 200 ``{"status": "ready", "region": ...}`` once started.

    Raises:
        NotReady: starting or draining (503, ``phase`` member).
    """
    state = request.app[STATE]
    if state.phase is not Phase.READY:
        raise NotReady(f"backend is {state.phase.value}", phase=state.phase.value)
    region = request.app[SETTINGS].region
    return web.Response(
        body=orjson.dumps({"status": "ready", "region": region}), content_type="application/json"
    )


def begin_drain(app: web.Application) -> None:
    """Enter DRAINING: ``/ready`` and ``/health`` answer 503 from now on (synchronous)."""
    app[STATE].phase = Phase.DRAINING


async def _documents_and_chains(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    started = time.perf_counter()
    documents = await asyncio.to_thread(load_documents, settings.region_dir, region=settings.region)
    retriever = LexicalRetriever(documents=documents, k=settings.retriever_k)
    app[CHAINS] = build_chains(
        region=settings.region, zones=settings.zones, model=app[MODEL], retriever=retriever
    )
    probe = HealthProbe(
        model=app[MODEL],
        retriever=retriever,
        region_dir=settings.region_dir,
        timeout=settings.health_timeout,
        ttl=settings.health_ttl,
    )
    app[HEALTH] = probe
    state = app[STATE]
    state.documents = len(documents)
    state.phase = Phase.READY
    log.info(
        "region %s: %d sections from %s indexed in %.1f ms",
        settings.region,
        len(documents),
        settings.region_dir,
        (time.perf_counter() - started) * 1000,
    )
    yield
    state.phase = Phase.DRAINING
    probe.close()


async def _on_shutdown(app: web.Application) -> None:
    begin_drain(app)


def build_app(settings: BackendSettings) -> web.Application:
    """Build the backend app for one region (no I/O; documents load on startup).

    Args:
        settings: the region, zones, model timing, provider and limits.

    Returns:
        An aiohttp Application; run it with ``web.AppRunner`` or pytest-aiohttp.

    Raises:
        StartupError: the provider cannot be built (e.g. langchain-openai missing). A
            missing region folder is raised as StartupError at app startup instead.
    """
    app = web.Application(middlewares=[guard], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[MODEL] = make_chat_model(settings)
    app[STATE] = BackendState()
    region = settings.region

    async def stamp_region(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[SERVED_REGION_HEADER] = region

    app.on_response_prepare.append(stamp_region)
    app.on_shutdown.append(_on_shutdown)
    app.cleanup_ctx.append(_documents_and_chains)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_routes(completions.routes)
    app.router.add_routes(remote.routes)
    return app
