"""Server lifecycle: build the pipeline from a config, listen, serve, drain.

One ``GatewayServer`` per process. It owns the process's resources (GeoIP database, the one
upstream ClientSession, the listener) and renders every GatewayError in one place, as RFC 9457
problem details with the request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import uuid
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from gateway.admin import build_admin_app
from gateway.breaker import Breaker, BreakerState
from gateway.budget import RetryBudget
from gateway.cache import CacheStage
from gateway.cachestore import MemoryCache, RedisCache, ZoneCaches
from gateway.clock import LoopClock
from gateway.dns import TTLResolver
from gateway.errors import (
    PROBLEM_CONTENT_TYPE,
    BadRequest,
    GatewayError,
    HeaderFieldsTooLarge,
    RouteNotFound,
)
from gateway.exchange import Exchange
from gateway.forwarded import TrustedProxies
from gateway.geo import GeoDatabase
from gateway.health import HealthChecker, ProbeSettings
from gateway.llmcache import LlmCachePolicy, LlmCacheStage
from gateway.locate import LocateStage
from gateway.metrics import CacheStateCollector, Metrics, UpstreamStateCollector
from gateway.pipeline import BackgroundTasks, Pipeline, Stage
from gateway.proxy import HttpForwarder
from gateway.ratelimit import LocalStore, PolicyStore, RateLimitStage
from gateway.ratelimit_store import MemoryStore, RedisStore, ResilientStore
from gateway.residency import ResidencyRules
from gateway.routing import RouteTable
from gateway.tenants import TenantStage
from gateway.upstreams import Upstreams

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

__all__ = ["GatewayServer"]

log = logging.getLogger("geogate.server")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _problem_response(err: GatewayError, request_id: str | None) -> web.Response:
    headers = {"X-Request-Id": request_id} if request_id else {}
    headers.update(err.headers())
    return web.Response(
        status=err.status,
        body=err.to_problem(request_id),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


class _GatewayProtocol(RequestHandler):
    """aiohttp's connection handler, answering unparsable requests with problem+json.

    aiohttp answers every parse error with a plain-text 400; the gateway distinguishes a too
    long request line (414, RFC 9110 §15.5.15), too large or too many header fields (431,
    RFC 6585 §5) and other malformed HTTP (400), and logs them at debug level: they are the
    client's fault, not the gateway's.
    """

    request_line_limit = 8190

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == 500 or not isinstance(exc, BadHttpMessage):
            return super().handle_error(request, status, exc, message)
        log.debug("malformed request from %s: %s", request.remote, exc)
        error: GatewayError
        if isinstance(exc, LineTooLong):
            line, limit = exc.args[0], exc.args[1]
            if limit == self.request_line_limit and bytes(line).startswith((b"/", b"http", b"*")):
                error = _UriTooLong(f"request line longer than {limit} bytes")
            else:
                error = HeaderFieldsTooLarge(f"a header field is longer than {limit} bytes")
        elif "Too many headers" in str(exc):
            error = HeaderFieldsTooLarge("too many header fields")
        else:
            error = BadRequest(f"malformed HTTP request: {exc.message}")
        resp = _problem_response(error, uuid.uuid4().hex)
        resp.force_close()
        return resp


class _UriTooLong(BadRequest):
    status = 414
    slug = "uri-too-long"
    title = "Request line too long"


class _Server(web.Server):
    """web.Server that builds our connection handler class."""

    request_line_limit = 8190

    def __call__(self) -> RequestHandler:
        handler = _GatewayProtocol(self, loop=self._loop, **self._kwargs)
        handler.request_line_limit = self.request_line_limit
        return handler


class GatewayServer:
    """One gateway process: resources, pipeline and listener built from a GatewayConfig.

    Usage::

        server = GatewayServer(load_config("config/gateway.yaml"))
        await server.start()          # opens the GeoIP DB in a thread, then listens
        ...
        await server.stop(drain_timeout=10.0)

    Args:
        config: the validated configuration.
    """

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.geodb: GeoDatabase | None = None
        self.session: aiohttp.ClientSession | None = None
        self.clock = LoopClock()
        self.metrics = Metrics()
        self.upstreams = Upstreams(
            config.regions,
            config.upstream,
            own_region=config.gateway.region,
            clock=self.clock,
            on_breaker_change=self._on_breaker_change,
        )
        budget_cfg = config.upstream.retry_budget
        self.budget = RetryBudget(ratio=budget_cfg.ratio, min_concurrent=budget_cfg.min_concurrent)
        self.metrics.registry.register(UpstreamStateCollector(self.upstreams, self.budget))
        self.health: HealthChecker | None = None
        self.tasks = BackgroundTasks()
        self.ratelimit_store: PolicyStore | None = None
        self.caches: ZoneCaches | None = None
        self._health_session: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._admin_runner: web.AppRunner | None = None
        self.admin_bound: list[tuple[str, int]] = []
        self.routes = RouteTable(config.routes, config.gateway.limits)
        self.rules = ResidencyRules(
            zone_countries={z: zc.countries for z, zc in config.residency.zones.items()},
            default_zone=config.residency.default_zone,
            region_zones={r: rc.zones for r, rc in config.regions.items()},
            own_region=config.gateway.region,
        )
        self.trusted = TrustedProxies.parse(config.gateway.trusted_proxies)
        self._pipeline: Pipeline | None = None
        self._resolver: TTLResolver | None = None
        self._runner: web.ServerRunner | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self.bound: list[tuple[str, int]] = []

    async def start(self) -> None:
        """Open resources and start listening on ``gateway.listen``.

        Raises:
            GeoDatabaseError: the GeoIP database is missing or unreadable.
            OSError: the listen address is taken or not ours.
        """
        cfg = self.config
        self.geodb = await GeoDatabase.open(
            cfg.gateway.geodb, cache_size=cfg.gateway.geoip_cache_size
        )
        up = cfg.upstream
        self._resolver = TTLResolver(
            min_ttl=up.dns_min_ttl, max_ttl=up.dns_max_ttl, nameservers=list(up.nameservers) or None
        )
        connector = aiohttp.TCPConnector(
            limit=up.max_connections,
            limit_per_host=up.max_connections_per_endpoint,
            keepalive_timeout=up.keepalive_timeout,
            resolver=self._resolver,
            use_dns_cache=False,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        hc = up.health
        forwarder = HttpForwarder(
            self.session,
            self.upstreams,
            self.routes,
            cfg.gateway.via,
            budget=self.budget,
            metrics=self.metrics,
            retry_after=max(1, math.ceil(hc.interval * hc.healthy_threshold)),
        )
        if hc.enabled:
            await self._start_health_checks()
        locate = LocateStage(
            self.geodb, self.rules, self.trusted, header=cfg.gateway.client_address_header
        )
        identify = TenantStage(cfg.tenants)
        self.ratelimit_store = self._make_ratelimit_store()
        await self._warm_redis()
        ratelimit = RateLimitStage(
            cfg.rate_limits,
            self.ratelimit_store,
            metrics=self.metrics,
            tasks=self.tasks,
            always_headers=cfg.gateway.ratelimit_headers == "always",
        )
        stages: list[Stage] = [identify, locate, ratelimit]
        http_cached = {r.prefix: r.cache for r in cfg.routes if r.cache.policy == "http"}
        llm_cached = {
            r.prefix: LlmCachePolicy(
                ttl=r.cache.ttl,
                stale_if_error=r.cache.stale_if_error,
                max_entry_bytes=r.cache.max_entry_bytes,
                default_temperature=r.cache.default_temperature,
                share_scope=r.cache.share_scope,
                ignore_fields=r.cache.ignore_fields,
            )
            for r in cfg.routes
            if r.cache.policy == "llm-exact"
        }
        if http_cached or llm_cached:
            sizes = [c.max_entry_bytes for c in http_cached.values()]
            sizes += [p.max_entry_bytes for p in llm_cached.values()]
            self.caches = self._make_caches(max(sizes))
            self.metrics.registry.register(CacheStateCollector(self.caches.l1))
        if self.caches is not None and http_cached:
            stages.append(
                CacheStage(
                    self.caches,
                    http_cached,
                    metrics=self.metrics,
                    tasks=self.tasks,
                    fetch=forwarder.fetch,
                )
            )
        if self.caches is not None and llm_cached:
            stages.append(
                LlmCacheStage(self.caches, llm_cached, metrics=self.metrics, tasks=self.tasks)
            )
        self._pipeline = Pipeline(self.routes, stages, forwarder)
        limits = cfg.gateway.limits
        server = _Server(
            self._handle,
            handler_cancellation=True,
            access_log=None,
            max_line_size=limits.max_request_line_bytes,
            max_field_size=limits.max_header_bytes,
            max_headers=limits.max_headers,
        )
        server.request_line_limit = limits.max_request_line_bytes
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        listen = cfg.gateway.listen
        site = web.TCPSite(self._runner, listen.host, listen.port, reuse_address=True)
        await site.start()
        server_obj = site._server
        sockets = getattr(server_obj, "sockets", None) or ()
        self.bound = [sock.getsockname()[:2] for sock in sockets]
        log.info("gateway %s listening on %s", cfg.gateway.region, self.bound)
        if cfg.admin.listen is not None:
            self._admin_runner = web.AppRunner(
                build_admin_app(self, cfg.admin.token), access_log=None, handle_signals=False
            )
            await self._admin_runner.setup()
            admin_site = web.TCPSite(
                self._admin_runner, cfg.admin.listen.host, cfg.admin.listen.port
            )
            await admin_site.start()
            sockets = getattr(admin_site._server, "sockets", None) or ()
            self.admin_bound = [sock.getsockname()[:2] for sock in sockets]
            log.info("admin listening on %s", self.admin_bound)

    def _make_ratelimit_store(self) -> PolicyStore:
        """The control Redis behind a time budget and a breaker, or the in-process store."""
        rc = self.config.redis
        memory = MemoryStore(clock=self.clock)
        if rc.control is None:
            return LocalStore(memory)

        def degraded(on: bool) -> None:
            if on:
                self.metrics.ratelimit_degraded.inc()

        return ResilientStore(
            RedisStore.from_url(rc.control),
            memory,
            breaker=Breaker(
                "control-redis",
                fail_max=rc.breaker_fail_max,
                reset_timeout=rc.breaker_reset_timeout,
                clock=self.clock,
            ),
            call_timeout=rc.call_timeout,
            on_degraded=degraded,
        )

    def _make_caches(self, max_entry_bytes: int) -> ZoneCaches:
        """L1 in process; an L2 per zone that ``redis.cache`` maps to its own Redis."""
        cfg = self.config
        l1 = MemoryCache(max_bytes=cfg.cache.l1_max_bytes, max_entry_bytes=max_entry_bytes)
        l2 = {
            zone: RedisCache.from_url(zone, url, max_entry_bytes=max_entry_bytes)
            for zone, url in cfg.redis.cache.items()
        }
        return ZoneCaches(l1, l2, call_timeout=cfg.cache.l2_call_timeout)

    async def _warm_redis(self, connections: int = 32) -> None:
        """Open the control Redis connections before traffic arrives.

        Each Redis call has a budget of ``redis.call_timeout`` (20 ms); a burst that finds the
        pool empty would spend it connecting, trip the breaker and push the gateway into local
        fallback for ``breaker_reset_timeout`` (seen in bench/ratelimit_bench.py). A Redis that
        is down at start is not an error: the breaker and the fallback handle it.
        """
        store = self.ratelimit_store
        if not isinstance(store, ResilientStore):
            return
        primary = store.primary
        if not isinstance(primary, RedisStore):
            return
        try:
            async with asyncio.timeout(1.0):
                await asyncio.gather(*(primary.client.ping() for _ in range(connections)))
        except Exception as exc:  # any failure here only means a cold pool
            log.warning("control Redis not reachable at start (%s); limiting locally", exc)

    async def _start_health_checks(self) -> None:
        hc = self.config.upstream.health
        endpoints = list(self.upstreams.endpoints)
        # A session of its own: probes never wait for, or hold, the proxy's pooled connections.
        self._health_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(4, len(endpoints)), resolver=self._resolver),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        self.health = HealthChecker(
            self._health_session,
            endpoints,
            ProbeSettings(
                path=hc.path,
                interval=hc.interval,
                timeout=hc.timeout,
                healthy_threshold=hc.healthy_threshold,
                unhealthy_threshold=hc.unhealthy_threshold,
                expected_statuses=frozenset(hc.expected_statuses),
                jitter=hc.jitter,
            ),
            on_change=self._on_health_change,
            on_rtt=self._on_probe_rtt,
        )
        self._health_task = asyncio.create_task(self.health.run(), name="health-checks")

    def _on_health_change(self, origin: str, healthy: bool) -> None:
        self.upstreams.set_health(origin, healthy)
        endpoint = self.upstreams.endpoints[origin]
        self.metrics.health_transitions.labels(
            endpoint.region, origin, "true" if healthy else "false"
        ).inc()
        log.warning(
            "endpoint %s (%s) is now %s", origin, endpoint.region,
            "healthy" if healthy else "UNHEALTHY",
        )  # fmt: skip

    def _on_breaker_change(
        self, region: str, origin: str, old: BreakerState, new: BreakerState
    ) -> None:
        self.metrics.breaker_transitions.labels(region, origin, new.name.lower()).inc()
        log.warning("breaker of %s (%s): %s -> %s", origin, region, old.name, new.name)

    def _on_probe_rtt(self, origin: str, seconds: float) -> None:
        self.upstreams.record_rtt(self.upstreams.endpoints[origin], seconds)

    def status(self) -> dict[str, object]:
        """Everything the admin ``/status`` route shows (JSON-ready)."""
        return {
            "region": self.config.gateway.region,
            "zones": {
                zone: list(self.rules.regions_for(zone)) if self.rules.has_regions(zone) else []
                for zone in sorted(self.rules.zones)
            },
            "regions": self.upstreams.snapshot(),
            "health": self.health.snapshot() if self.health else None,
            "retry_budget": self.budget.snapshot(),
            "in_flight": self._in_flight,
        }

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        loop_time = asyncio.get_running_loop().time()
        rid = request.headers.get("X-Request-Id")
        if rid is None or not _REQUEST_ID_RE.match(rid):
            rid = uuid.uuid4().hex
        ex = Exchange(request, rid, loop_time)
        self._in_flight += 1
        self._idle.clear()
        try:
            assert self._pipeline is not None
            if request.method == "CONNECT" or not (
                request.raw_path.startswith("/") or self._same_host(request)
            ):
                raise RouteNotFound("the gateway is not a forward proxy")
            return await self._pipeline.run(ex)
        except GatewayError as err:
            ex.status = err.status
            return _problem_response(err, rid)
        except Exception:
            log.exception("unhandled error in request %s", rid)
            ex.status = 500
            return _problem_response(GatewayError(), rid)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            self.metrics.count_request(ex)

    @staticmethod
    def _same_host(request: web.BaseRequest) -> bool:
        # absolute-form target (RFC 9112 §3.2.2): allowed only when it names the Host we got
        host_header = request.headers.get("Host", "")
        target_host = request.host  # aiohttp takes it from the absolute URI
        return bool(target_host) and host_header.split(":")[0].lower() == target_host.lower()

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish for up to ``drain_timeout`` seconds,
        then close connections, the upstream session and the GeoIP database."""
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()
            if self._in_flight:
                try:
                    async with asyncio.timeout(drain_timeout):
                        await self._idle.wait()
                except TimeoutError:
                    log.warning("drain timeout: %d requests still in flight", self._in_flight)
            await self._runner.cleanup()
            self._runner = None
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        await self.tasks.drain(1.0)
        if self.caches is not None:
            await self.caches.close()
            self.caches = None
        if self.ratelimit_store is not None:
            await self.ratelimit_store.close()
            self.ratelimit_store = None
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        if self._health_session is not None:
            await self._health_session.close()
            self._health_session = None
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self._resolver is not None:  # the connector does not close a resolver it was given
            await self._resolver.close()
            self._resolver = None
        if self.geodb is not None:
            self.geodb.close()
            self.geodb = None
