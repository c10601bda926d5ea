"""The admin listener: upstream state as JSON, region drain/undrain, Prometheus metrics.

It listens on its own address (``admin.listen``, loopback in the demo), never on the proxy
listener. When ``admin.token`` is set every route but ``/metrics`` needs
``Authorization: Bearer <token>`` (compared in constant time); ``/metrics`` stays open, as
Prometheus scrapes expect.

Routes:
    GET  /status                   regions, endpoints, health, ejections, breakers, drain state
    POST /regions/{region}/drain   no new requests to the region; in-flight ones finish
    POST /regions/{region}/undrain
    POST /cache/purge              {"key"|"route_prefix"|"tenant"|"zone": ...} -> {"removed": n}
    GET  /metrics                  Prometheus text exposition format
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.cachestore import PurgeIncomplete
from gateway.errors import PROBLEM_CONTENT_TYPE, problem_bytes

if TYPE_CHECKING:
    from gateway.server import GatewayServer

__all__ = ["build_admin_app"]


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_INDENT_2),
        status=status,
        content_type="application/json",
    )


def _problem(status: int, title: str, slug: str, detail: str) -> web.Response:
    return web.Response(
        body=problem_bytes(status=status, title=title, slug=slug, detail=detail),
        status=status,
        content_type=PROBLEM_CONTENT_TYPE,
    )


def build_admin_app(server: GatewayServer, token: str | None) -> web.Application:
    """Build the admin aiohttp application for ``server``.

    Args:
        server: the running gateway whose state the routes read and change.
        token: the bearer token required on every route but ``/metrics``; None: no auth.

    Returns:
        The application; the caller runs it on the admin listener.
    """
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def auth(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if expected is None or request.path == "/metrics":
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            resp = _problem(401, "Admin token required", "unauthorized", "missing or wrong token")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="geogate-admin"'
            return resp
        return await handler(request)

    async def status(request: web.Request) -> web.Response:
        return _json(server.status())

    async def drain(request: web.Request) -> web.Response:
        return _set_drained(request, drained=True)

    async def undrain(request: web.Request) -> web.Response:
        return _set_drained(request, drained=False)

    def _set_drained(request: web.Request, *, drained: bool) -> web.Response:
        name = request.match_info["region"]
        try:
            server.upstreams.set_drained(name, drained)
        except KeyError:
            return _problem(404, "No such region", "unknown-region", f"region {name!r}")
        return _json({"region": name, "drained": drained})

    async def purge(request: web.Request) -> web.Response:
        caches = server.caches
        if caches is None:
            return _problem(404, "No cache", "no-cache", "no route has a cache policy")
        try:
            body = orjson.loads(await request.read() or b"{}")
        except orjson.JSONDecodeError:
            return _problem(400, "Bad request", "bad-request", "the body is not JSON")
        allowed = {"key", "route_prefix", "tenant", "zone"}
        if not isinstance(body, dict) or not body or set(body) - allowed:
            return _problem(
                400, "Bad request", "bad-request",
                "give one or more of key, route_prefix, tenant, zone",
            )  # fmt: skip
        if not all(isinstance(v, str) for v in body.values()):
            return _problem(400, "Bad request", "bad-request", "every filter is a string")
        try:
            removed = await caches.purge(**body)
        except PurgeIncomplete as exc:
            return _json({"removed": exc.removed, "failed_zones": sorted(exc.failed)}, status=502)
        return _json({"removed": removed})

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(server.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(middlewares=[auth])
    app.router.add_get("/status", status)
    app.router.add_post("/regions/{region}/drain", drain)
    app.router.add_post("/regions/{region}/undrain", undrain)
    app.router.add_post("/cache/purge", purge)
    app.router.add_get("/metrics", metrics)
    return app
