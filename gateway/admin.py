"""The admin listener: upstream state as JSON, region drain/undrain, Prometheus metrics.

It listens on its own address (``admin.listen``, loopback in the demo), never on the proxy
listener. When ``admin.token`` is set every route needs ``Authorization: Bearer <token>``
(compared in constant time) except the GETs in ``OPEN_PATHS``: ``/metrics`` (as Prometheus
scrapes expect), the probes ``/ready`` and ``/live``, and the status page ``/``, which holds
no data itself and fetches ``/status`` with the token (see ``gateway.statuspage``).

Routes:
    GET  /                         the status page (HTML; also at /ui)
    GET  /status                   regions, endpoints, health, ejections, breakers, drain state,
                                   config version, last-minute window stats per zone and region
    GET  /config                   the effective config, secrets redacted
    POST /regions/{region}/drain   no new requests to the region; in-flight ones finish
    POST /regions/{region}/undrain
    POST /cache/purge              {"key"|"route_prefix"|"tenant"|"zone": ...} -> {"removed": n}
    POST /reload                   reload the config file -> {"ok", "version", "error"}; 422 when
                                   refused (the old config keeps running; see gateway.reload)
    GET  /metrics                  Prometheus text exposition format
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.cachestore import PurgeIncomplete
from gateway.errors import PROBLEM_CONTENT_TYPE, problem_bytes
from gateway.statuspage import status_page

if TYPE_CHECKING:
    from gateway.server import GatewayServer

__all__ = ["OPEN_PATHS", "REDACTED", "bearer_auth", "build_admin_app", "redacted_config"]

# GET (and HEAD) of these paths needs no token: scrapers and probes carry none, and the page
# is static (its data comes from /status, with the token)
OPEN_PATHS = frozenset({"/metrics", "/ready", "/live", "/", "/ui"})
REDACTED = "***"
# config keys whose values are secrets (or hashes of them) wherever they appear
_SECRET_KEYS = frozenset({"token", "password", "secret", "keys", "api_key"})
_SECRET_SUFFIXES = ("_token", "_password", "_secret")
# scheme://[user]:password@host -> keep the user and host, hide the password (RFC 3986 §3.2.1)
_URL_PASSWORD = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):[^/@]*@")


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


def _redact(value: Any, key: str | None = None) -> Any:
    if key is not None and (key in _SECRET_KEYS or key.endswith(_SECRET_SUFFIXES)):
        if value is None:
            return None
        return [REDACTED] * len(value) if isinstance(value, list) else REDACTED
    if isinstance(value, dict):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(rf"\g<head>:{REDACTED}@", value)
    return value


def redacted_config(server: GatewayServer) -> dict[str, Any]:
    """The server's effective config as JSON-ready values, with every secret hidden.

    Hidden: values under keys such as ``token``, ``password``, ``secret`` and ``keys`` (the
    admin token, tenants' key hashes), as ``"***"`` (a list keeps its length), and the password
    of any ``scheme://user:password@host`` URL (Redis URLs), as ``scheme://user:***@host``.
    File paths (the GeoIP database, a TLS key file's path) are shown; file contents never are.

    Returns:
        ``GatewayConfig.model_dump(mode="json")`` after redaction.
    """
    dumped: dict[str, Any] = server.config.model_dump(mode="json")
    redacted: dict[str, Any] = _redact(dumped)
    return redacted


def bearer_auth(token: str | None) -> Middleware:
    """The admin listener's auth middleware: every request but a GET or HEAD of
    ``OPEN_PATHS`` must carry ``Authorization: Bearer <token>`` (RFC 6750 §2.1), compared in
    constant time; otherwise 401 problem+json with ``WWW-Authenticate`` (RFC 6750 §3).

    Args:
        token: the admin token; None: every request passes.
    """
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def auth(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if expected is None or (request.method in ("GET", "HEAD") and request.path in OPEN_PATHS):
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            resp = _problem(401, "Admin token required", "unauthorized", "missing or wrong token")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="geogate-admin"'
            return resp
        return await handler(request)

    return auth


def build_admin_app(server: GatewayServer, token: str | None) -> web.Application:
    """Build the admin aiohttp application for ``server``.

    Args:
        server: the running gateway whose state the routes read and change.
        token: the bearer token required on every route but the GETs in ``OPEN_PATHS``;
            None: no auth.

    Returns:
        The application; the caller runs it on the admin listener.
    """
    auth = bearer_auth(token)

    async def status(request: web.Request) -> web.Response:
        return _json(
            {
                **server.status(),
                "config_version": getattr(server, "config_version", None),
                "window": server.window.snapshot(),
            }
        )

    async def config(request: web.Request) -> web.Response:
        return _json(redacted_config(server))

    async def reload(request: web.Request) -> web.Response:
        # Always the file the running config came from: a path from the request would let
        # an admin client make the gateway read any file.
        result = await server.reload()
        return _json(result.as_dict(), status=200 if result.ok else 422)

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
    app.router.add_get("/", status_page)
    app.router.add_get("/ui", status_page)
    app.router.add_get("/status", status)
    app.router.add_get("/config", config)
    app.router.add_post("/regions/{region}/drain", drain)
    app.router.add_post("/regions/{region}/undrain", undrain)
    app.router.add_post("/cache/purge", purge)
    app.router.add_post("/reload", reload)
    app.router.add_get("/metrics", metrics)
    return app
