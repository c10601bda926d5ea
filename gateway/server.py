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
import os
import re
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from gateway.accesslog import AccessLog
from gateway.admin import build_admin_app
from gateway.breaker import Breaker, BreakerState
from gateway.budget import RetryBudget
from gateway.cache import CacheStage
from gateway.cachestore import MemoryCache, RedisCache, ZoneCaches
from gateway.clock import LoopClock
from gateway.config import load_config
from gateway.dns import TTLResolver
from gateway.errors import ConfigError, GatewayError, RouteNotFound
from gateway.exchange import Exchange, new_request_id
from gateway.forwarded import TrustedProxies
from gateway.geo import GeoDatabase, GeoDatabaseError
from gateway.health import HealthChecker, ProbeSettings
from gateway.http1 import Http1Server, Request, Response, StreamResponse, problem_response
from gateway.listener import make_ssl_context, probe_middleware
from gateway.llmcache import LlmCachePolicy, LlmCacheStage
from gateway.locate import LocateStage
from gateway.metrics import CacheStateCollector, GeoCollector, Metrics, UpstreamStateCollector
from gateway.pipeline import BackgroundTasks, Stage
from gateway.proxy import HttpForwarder
from gateway.ratelimit import LocalStore, PolicyStore, RateLimitStage
from gateway.ratelimit_store import MemoryStore, RedisStore, ResilientStore
from gateway.reload import (
    GenerationPipeline,
    ReloadResult,
    close_idle_connections,
    config_version,
    restart_required,
)
from gateway.residency import ResidencyRules
from gateway.routing import RouteTable
from gateway.tenants import TenantStage
from gateway.tracecontext import TraceContext
from gateway.upstream_client import UpstreamClient
from gateway.upstreams import Upstreams
from gateway.windowstats import WindowStats

if TYPE_CHECKING:
    from gateway.config import GatewayConfig, RouteCacheConfig

__all__ = ["GatewayServer"]

log = logging.getLogger("geogate.server")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


# what a ZoneCaches was built for: l1_max_bytes, max entry bytes, L2 call timeout, Redis mapping
_CacheShape = tuple[int, int, float, tuple[tuple[str, str], ...]]


class _ReloadRefused(Exception):
    """A reload cannot go ahead; ``message`` says why (``file:key: reason`` lines)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _residency_rules(cfg: GatewayConfig) -> ResidencyRules:
    return ResidencyRules(
        zone_countries={z: zc.countries for z, zc in cfg.residency.zones.items()},
        default_zone=cfg.residency.default_zone,
        region_zones={r: rc.zones for r, rc in cfg.regions.items()},
        own_region=cfg.gateway.region,
    )


def _probe_settings(cfg: GatewayConfig) -> ProbeSettings | None:
    """The health probe settings of ``cfg``; None when health checks are off."""
    hc = cfg.upstream.health
    if not hc.enabled:
        return None
    return ProbeSettings(
        path=hc.path,
        interval=hc.interval,
        timeout=hc.timeout,
        healthy_threshold=hc.healthy_threshold,
        unhealthy_threshold=hc.unhealthy_threshold,
        expected_statuses=frozenset(hc.expected_statuses),
        jitter=hc.jitter,
    )


def _cache_policies(
    cfg: GatewayConfig,
) -> tuple[dict[str, RouteCacheConfig], dict[str, LlmCachePolicy]]:
    """Route prefix -> cache config of ``http`` routes; -> policy of ``llm-exact`` ones."""
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
    return http_cached, llm_cached


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
        self.session: UpstreamClient | None = None  # the forwarder's pooled upstream client
        self.clock = LoopClock()
        self.metrics = Metrics()
        self.metrics.registry.register(GeoCollector(lambda: self.geodb))
        self.access_log: AccessLog | None = None  # opened by start() when configured
        self.window = WindowStats(clock=self.clock)  # the last minute, for the status page
        # Config-derived objects: reload() builds a new set and swaps them in one step.
        self.config_path: Path | None = config.source  # what reload() reads by default
        self.config_version = config_version(config)
        self.metrics.config_info.labels(self.config_version).set(1)
        self.metrics.config_last_reload.set(time.time())
        self.upstreams = Upstreams(
            config.regions,
            config.upstream,
            own_region=config.gateway.region,
            clock=self.clock,
            on_breaker_change=self._on_breaker_change,
        )
        budget_cfg = config.upstream.retry_budget
        self.budget = RetryBudget(ratio=budget_cfg.ratio, min_concurrent=budget_cfg.min_concurrent)
        self._upstream_collector = UpstreamStateCollector(self.upstreams, self.budget)
        self.metrics.registry.register(self._upstream_collector)
        self._cache_collector: CacheStateCollector | None = None
        self._cache_shape: _CacheShape | None = None  # what self.caches was built for
        self._reload_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()  # replaced generations, until idle
        self._stop_retiring = asyncio.Event()
        self.health: HealthChecker | None = None
        self.tasks = BackgroundTasks()
        self.ratelimit_store: PolicyStore | None = None
        self.caches: ZoneCaches | None = None
        self._health_session: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._admin_runner: web.AppRunner | None = None
        self.admin_bound: list[tuple[str, int]] = []
        self.routes = RouteTable(config.routes, config.gateway.limits)
        self.rules = _residency_rules(config)
        self.trusted = TrustedProxies.parse(config.gateway.trusted_proxies)
        self._pipeline: GenerationPipeline | None = None
        self._resolver: TTLResolver | None = None
        self._listener: asyncio.Server | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self.bound: list[tuple[str, int]] = []
        self._http: Http1Server | None = None
        self.draining = False  # phase 1 of stop() began: /ready fails, Connection: close

    async def start(
        self, *, sock: socket.socket | None = None, admin_path: str | None = None
    ) -> None:
        """Open resources and start listening on ``gateway.listen``.

        Args:
            sock: a listening socket to serve instead of binding ``gateway.listen`` (a worker
                of ``--workers N`` gets its slot's ``SO_REUSEPORT`` socket from the
                supervisor; closing ours leaves the supervisor's open).
            admin_path: serve the admin app on this Unix socket instead of ``admin.listen``
                (a worker; the supervisor owns ``admin.listen``).

        Raises:
            GeoDatabaseError: the GeoIP database is missing or unreadable.
            OSError: the listen address is taken or not ours.
            ssl.SSLError: ``gateway.tls`` files changed since the config was loaded.
        """
        cfg = self.config
        self.geodb = await GeoDatabase.open(
            cfg.gateway.geodb, cache_size=cfg.gateway.geoip_cache_size
        )
        self.access_log = await AccessLog.open(
            cfg.access_log, own_zones=set(cfg.regions[cfg.gateway.region].zones)
        )
        up = cfg.upstream
        self._resolver = TTLResolver(
            min_ttl=up.dns_min_ttl, max_ttl=up.dns_max_ttl, nameservers=list(up.nameservers) or None
        )
        self.session = UpstreamClient(
            resolver=self._resolver,
            limit=up.max_connections,
            limit_per_endpoint=up.max_connections_per_endpoint,
            keepalive_timeout=up.keepalive_timeout,
        )
        if (probes := _probe_settings(cfg)) is not None:
            self._open_health_checks(probes)
        self.ratelimit_store = self._make_ratelimit_store()
        await self._warm_redis()
        self._use_caches(*self._caches_for(cfg))
        self._pipeline = self._build_pipeline(
            cfg, geodb=self.geodb, upstreams=self.upstreams, routes=self.routes,
            rules=self.rules, trusted=self.trusted, budget=self.budget, caches=self.caches,
        )  # fmt: skip
        limits = cfg.gateway.limits
        server = Http1Server(
            self._handle,
            max_line=limits.max_request_line_bytes,
            max_field=limits.max_header_bytes,
            max_headers=limits.max_headers,
        )
        await self._listen(server, sock=sock, admin_path=admin_path)

    async def _listen(
        self, server: Http1Server, *, sock: socket.socket | None, admin_path: str | None
    ) -> None:
        """Open the proxy listener (TLS when ``gateway.tls``) and the admin listener."""
        cfg = self.config
        self._http = server
        ssl_context = make_ssl_context(cfg.gateway.tls) if cfg.gateway.tls else None
        loop = asyncio.get_running_loop()
        if sock is not None:  # a worker: the supervisor's SO_REUSEPORT slot socket
            listener = await loop.create_server(server, sock=sock, ssl=ssl_context, backlog=1024)
        else:
            listen = cfg.gateway.listen
            listener = await loop.create_server(
                server, listen.host, listen.port, reuse_address=True, ssl=ssl_context,
                backlog=1024,
            )  # fmt: skip
        self._listener = listener
        self.bound = [s.getsockname()[:2] for s in listener.sockets]
        log.info("gateway %s listening on %s", cfg.gateway.region, self.bound)
        if cfg.admin.listen is None and admin_path is None:
            return
        admin_app = build_admin_app(self, cfg.admin.token)
        admin_app.middlewares.insert(0, probe_middleware(lambda: self.is_ready))
        self._admin_runner = web.AppRunner(admin_app, access_log=None, handle_signals=False)
        await self._admin_runner.setup()
        admin_site: web.BaseSite
        if admin_path is not None:  # a worker: the supervisor fans admin calls out to it
            admin_site = web.UnixSite(self._admin_runner, admin_path)
        else:
            assert cfg.admin.listen is not None
            admin_site = web.TCPSite(
                self._admin_runner, cfg.admin.listen.host, cfg.admin.listen.port
            )
        await admin_site.start()
        if admin_path is None:
            sockets = getattr(admin_site._server, "sockets", None) or ()
            self.admin_bound = [s.getsockname()[:2] for s in sockets]
            log.info("admin listening on %s", self.admin_bound)

    @property
    def is_ready(self) -> bool:
        """True from a completed ``start()`` until ``stop()`` begins (what ``/ready`` says)."""
        return self._listener is not None and not self.draining

    def begin_drain(self) -> None:
        """Phase 1 of the drain: fail readiness and close every connection after its answer.

        The listener still accepts. Idempotent; ``stop()`` calls it.
        """
        if not self.draining:
            log.info("draining: readiness fails; answers carry Connection: close")
        self.draining = True
        if self._http is not None:
            self._http.draining = True

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

    def _caches_for(self, cfg: GatewayConfig) -> tuple[ZoneCaches | None, _CacheShape | None]:
        """The ZoneCaches ``cfg``'s cached routes use: the running one when it fits.

        L1 in process; an L2 per zone that ``redis.cache`` maps to its own Redis. On reload
        the running ZoneCaches (entries, L2 connections, breakers) is kept unless the Redis
        mapping, the ``cache`` section or the largest ``max_entry_bytes`` changed; a new one
        still keeps the running L1 and its entries when ``l1_max_bytes`` and the largest
        ``max_entry_bytes`` are as before. Without cached routes the running one is kept for
        the admin purge (None at start). Builds only: nothing running is changed.

        Returns:
            The ZoneCaches (or None) and the shape it was built for (for the next reload).
        """
        http_cached, llm_cached = _cache_policies(cfg)
        if not (http_cached or llm_cached):
            return self.caches, self._cache_shape
        max_entry = max(
            [c.max_entry_bytes for c in http_cached.values()]
            + [p.max_entry_bytes for p in llm_cached.values()]
        )
        l1_shape = (cfg.cache.l1_max_bytes, max_entry)
        shape = (*l1_shape, cfg.cache.l2_call_timeout, tuple(sorted(cfg.redis.cache.items())))
        running, running_shape = self.caches, self._cache_shape
        if running is not None and running_shape == shape:
            return running, shape
        if running is not None and running_shape is not None and running_shape[:2] == l1_shape:
            l1 = running.l1
        else:
            l1 = MemoryCache(max_bytes=cfg.cache.l1_max_bytes, max_entry_bytes=max_entry)
        l2 = {
            zone: RedisCache.from_url(zone, url, max_entry_bytes=max_entry)
            for zone, url in cfg.redis.cache.items()
        }
        return ZoneCaches(l1, l2, call_timeout=cfg.cache.l2_call_timeout), shape

    def _use_caches(
        self, caches: ZoneCaches | None, shape: _CacheShape | None
    ) -> ZoneCaches | None:
        """Make ``caches`` the running ZoneCaches (synchronous); return the one it replaced."""
        old = self.caches
        self._cache_shape = shape
        if caches is old:
            return None
        self.caches = caches
        if caches is not None and (old is None or caches.l1 is not old.l1):
            if self._cache_collector is not None:
                self.metrics.registry.unregister(self._cache_collector)
            self._cache_collector = CacheStateCollector(caches.l1)
            self.metrics.registry.register(self._cache_collector)
        return old

    def _build_pipeline(
        self,
        cfg: GatewayConfig,
        *,
        geodb: GeoDatabase,
        upstreams: Upstreams,
        routes: RouteTable,
        rules: ResidencyRules,
        trusted: TrustedProxies,
        budget: RetryBudget,
        caches: ZoneCaches | None,
    ) -> GenerationPipeline:
        """Build one config generation's request path; builds only, changes nothing running.

        Per generation: the forwarder (it holds the upstream set and route table), the
        identify, locate, rate-limit and cache stages. Shared by every generation: the
        upstream ClientSession, the rate-limit store (counters), the ZoneCaches passed in,
        the metrics and the background task set.
        """
        assert self.session is not None
        assert self.ratelimit_store is not None
        hc = cfg.upstream.health
        forwarder = HttpForwarder(
            self.session,
            upstreams,
            routes,
            cfg.gateway.via,
            budget=budget,
            metrics=self.metrics,
            retry_after=max(1, math.ceil(hc.interval * hc.healthy_threshold)),
        )
        stages: list[Stage] = [
            TenantStage(cfg.tenants),
            LocateStage(geodb, rules, trusted, header=cfg.gateway.client_address_header),
            RateLimitStage(
                cfg.rate_limits,
                self.ratelimit_store,
                metrics=self.metrics,
                tasks=self.tasks,
                always_headers=cfg.gateway.ratelimit_headers == "always",
            ),
        ]
        http_cached, llm_cached = _cache_policies(cfg)
        if caches is not None and http_cached:
            stages.append(
                CacheStage(
                    caches, http_cached, metrics=self.metrics, tasks=self.tasks,
                    fetch=forwarder.fetch,
                )
            )  # fmt: skip
        if caches is not None and llm_cached:
            stages.append(LlmCacheStage(caches, llm_cached, metrics=self.metrics, tasks=self.tasks))
        return GenerationPipeline(routes, stages, forwarder)

    async def reload(self, path: str | os.PathLike[str] | None = None) -> ReloadResult:
        """Load, validate and apply a new config without dropping a request (SIGHUP, admin).

        Steps: parse and validate the whole file (``load_config``, in a thread); refuse it
        when a ``RESTART_ONLY`` key changed; open the GeoIP database again (in a thread, the
        same path re-reads the file); build the complete new generation (``_build_pipeline``)
        with the state of what did not change carried over (``Upstreams(previous=...)``, the
        rate-limit store, the ZoneCaches); then swap it in with one assignment, in one
        synchronous step. A request runs wholly on the generation it started on. The replaced
        generation's own objects (GeoIP database, replaced caches, pooled connections to
        removed endpoints) are released once its last request has finished.

        Any failure leaves the running config untouched; it is logged, counted in
        ``geogate_config_reloads_total{result="error"}`` and returned. Reloads run one at a
        time.

        Args:
            path: the YAML file; None: the file the running config came from.

        Returns:
            A ReloadResult: ``ok``, the running ``version`` afterwards, and the ``error`` text
            (``file:key: reason`` lines) when refused.
        """
        async with self._reload_lock:
            target = Path(path) if path is not None else self.config_path
            try:
                version = await self._reload(target)
            except _ReloadRefused as exc:
                self.metrics.config_reloads.labels("error").inc()
                log.error(
                    "config reload refused, version %s keeps running: %s",
                    self.config_version, exc.message,
                )  # fmt: skip
                return ReloadResult(ok=False, version=self.config_version, error=exc.message)
        self.metrics.config_reloads.labels("success").inc()
        self.metrics.config_last_reload.set(time.time())
        return ReloadResult(ok=True, version=version)

    async def _reload(self, path: Path | None) -> str:
        if path is None:
            raise _ReloadRefused("the running config was not loaded from a file")
        if self._pipeline is None or self.draining:
            raise _ReloadRefused("the gateway is not running (not started, or stopping)")
        try:
            cfg = await asyncio.to_thread(load_config, path)
        except ConfigError as exc:
            raise _ReloadRefused(str(exc)) from exc
        if problems := restart_required(self.config, cfg):
            raise _ReloadRefused("\n".join(f"{path}:{problem}" for problem in problems))
        counts = getattr(self.geodb, "counts", None)  # lookups counted across databases
        try:
            geodb = await GeoDatabase.open(
                cfg.gateway.geodb, cache_size=cfg.gateway.geoip_cache_size, counts=counts
            )
        except GeoDatabaseError as exc:
            raise _ReloadRefused(f"{path}:gateway.geodb: {exc}") from exc
        caches: ZoneCaches | None = None
        cache_shape: _CacheShape | None = None
        try:
            if self.session is None or self.draining:  # stop() began while we read files
                raise _ReloadRefused("the gateway is stopping")
            old = self.config
            upstreams = Upstreams(
                cfg.regions, cfg.upstream, own_region=cfg.gateway.region, clock=self.clock,
                on_breaker_change=self._on_breaker_change,
                previous=self.upstreams, previous_config=old.upstream,
            )  # fmt: skip
            routes = RouteTable(cfg.routes, cfg.gateway.limits)
            rules = _residency_rules(cfg)
            trusted = TrustedProxies.parse(cfg.gateway.trusted_proxies)
            budget = self.budget
            if cfg.upstream.retry_budget != old.upstream.retry_budget:
                bc = cfg.upstream.retry_budget
                budget = RetryBudget(ratio=bc.ratio, min_concurrent=bc.min_concurrent)
            caches, cache_shape = self._caches_for(cfg)
            pipeline = self._build_pipeline(
                cfg, geodb=geodb, upstreams=upstreams, routes=routes, rules=rules,
                trusted=trusted, budget=budget, caches=caches,
            )  # fmt: skip
            probes = _probe_settings(cfg)
        except BaseException as exc:
            geodb.close()
            if caches is not None and caches is not self.caches:
                await caches.close()
            if isinstance(exc, _ReloadRefused | asyncio.CancelledError):
                raise
            log.exception("building the new config failed")
            raise _ReloadRefused(f"{path}: cannot apply: {exc!r}") from exc
        # The swap: one synchronous step, no await, so no request sees half of it.
        version = config_version(cfg)
        old_pipeline, old_geodb, old_upstreams = self._pipeline, self.geodb, self.upstreams
        upstreams.activate()
        self.config, self.config_path = cfg, path
        self.upstreams, self.routes, self.rules, self.trusted = upstreams, routes, rules, trusted
        self.budget, self.geodb = budget, geodb
        replaced_caches = self._use_caches(caches, cache_shape)
        self.metrics.registry.unregister(self._upstream_collector)
        self._upstream_collector = UpstreamStateCollector(upstreams, budget)
        self.metrics.registry.register(self._upstream_collector)
        self._pipeline = pipeline
        retired_origins, retired_probes = self._update_health(old_upstreams, probes)
        if version != self.config_version:
            self.metrics.config_info.remove(self.config_version)
            self.metrics.config_info.labels(version).set(1)
        log.warning("config reloaded from %s: version %s -> %s", path, self.config_version, version)
        self.config_version = version
        retire = asyncio.create_task(
            self._retire(
                old_pipeline, old_geodb, replaced_caches, retired_origins, retired_probes,
                within=max(r.timeouts.total for r in old.routes) + 5.0,
            ),
            name=f"retire config {version}",
        )  # fmt: skip
        self._retiring.add(retire)
        retire.add_done_callback(self._retiring.discard)
        return version

    def _update_health(
        self, old: Upstreams, probes: ProbeSettings | None
    ) -> tuple[list[str], tuple[asyncio.Task[None], aiohttp.ClientSession] | None]:
        """Point the health checker at the new endpoint set (synchronous, at the swap).

        Returns:
            The origins no longer configured (their pooled connections are to close), and
            the probe task and session to close when health checking was switched off.
        """
        new = self.upstreams.endpoints
        removed = [o for o in old.endpoints if o not in new]
        moved = [o for o, e in new.items() if o in old.endpoints and old.endpoints[o] is not e]
        if probes is None:  # health checks off: nothing judges health any more
            for endpoint in new.values():
                endpoint.healthy = True
            stopped = None
            if self._health_task is not None and self._health_session is not None:
                self._health_task.cancel()  # now: no verdict may land after the line above
                stopped = (self._health_task, self._health_session)
            self.health = self._health_task = self._health_session = None
            return removed, stopped
        if self.health is None:
            self._open_health_checks(probes)
        else:
            self.health.update(list(new), probes, restart=moved)
        return removed, None

    async def _retire(
        self,
        pipeline: GenerationPipeline | None,
        geodb: GeoDatabase | None,
        caches: ZoneCaches | None,
        removed: list[str],
        probes: tuple[asyncio.Task[None], aiohttp.ClientSession] | None,
        *,
        within: float,
    ) -> None:
        """Release what only a replaced generation used, once its last request finished.

        Waits for the generation to be idle for up to ``within`` seconds (its longest route
        ``total`` timeout and a margin), or until ``stop()`` says to finish at once.
        """
        close_idle_connections(self.session, removed)
        close_idle_connections(self._health_session, removed)
        if pipeline is not None and pipeline.in_flight:
            waiters = [
                asyncio.ensure_future(pipeline.wait_idle()),
                asyncio.ensure_future(self._stop_retiring.wait()),
            ]
            try:
                await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            if pipeline.in_flight:
                log.warning("%d requests still run on the replaced config", pipeline.in_flight)
        if geodb is not None:
            geodb.close()
        close_idle_connections(self.session, removed)
        if probes is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await probes[0]
            await probes[1].close()
        if caches is not None:
            await caches.close()

    async def _finish_reloads(self) -> None:
        """Release every replaced generation now (``stop()``: its requests have ended)."""
        self._stop_retiring.set()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

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

    def _open_health_checks(self, probes: ProbeSettings) -> None:
        """Start probing the running endpoint set (at start, or a reload that enables it)."""
        endpoints = list(self.upstreams.endpoints)
        # A session of its own: probes never wait for, or hold, the proxy's pooled connections.
        # Its limit leaves room for endpoints a reload adds.
        self._health_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=max(16, 2 * len(endpoints)), resolver=self._resolver
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        self.health = HealthChecker(
            self._health_session,
            endpoints,
            probes,
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

    async def _handle(self, request: Request) -> Response | StreamResponse:
        headers = request.headers
        rid = headers.get("X-Request-Id")
        if rid is None or not _REQUEST_ID_RE.match(rid):
            rid = new_request_id()
        ex = Exchange(request, rid, time.monotonic())
        ex.trace = TraceContext.from_headers(
            headers.getall("traceparent", ()), headers.getall("tracestate", ())
        )
        self._in_flight += 1
        self._idle.clear()
        try:
            try:
                assert self._pipeline is not None
                if request.method == "CONNECT" or not (
                    request.raw_path.startswith("/") or self._same_host(request)
                ):
                    raise RouteNotFound("the gateway is not a forward proxy")
                response = await self._pipeline.run(ex)
            except GatewayError as err:
                ex.status = err.status
                response = problem_response(err, rid)
            except Exception:
                log.exception("unhandled error in request %s", rid)
                ex.status = 500
                response = problem_response(GatewayError(), rid)
            if not response.prepared:
                # written here rather than by the connection after we return, so that the
                # timings and the log cover the write
                assert isinstance(response, Response)
                ex.headers_sent = time.monotonic()
                with contextlib.suppress(ConnectionError):  # the client left: nothing to do
                    await request.connection.respond(request, response)
                if ex.bytes_out is None:
                    ex.bytes_out = 0 if request.method == "HEAD" else response.content_length
            return response
        finally:
            end = time.monotonic()
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            self.metrics.observe_request(ex, end)
            self.window.record_exchange(ex, end)
            if self.access_log is not None:
                self.access_log.log(ex, end=end)

    @staticmethod
    def _same_host(request: Request) -> bool:
        # absolute-form target (RFC 9112 §3.2.2): allowed only when it names the Host we got
        host_header = request.headers.get("Host", "")
        target_host = request.host  # taken from the absolute URI
        return bool(target_host) and host_header.split(":")[0].lower() == target_host.lower()

    async def stop(self, drain_timeout: float | None = None, *, grace: float = 0.0) -> None:
        """Drain in phases, then close connections, sessions, Redis and the GeoIP database.

        The order uvicorn and Envoy use (``DrainConfig`` has the operator's view):

        1. ``begin_drain()``: ``/ready`` answers 503 and every answer carries
           ``Connection: close``, while the listener still accepts for ``grace`` seconds.
        2. The listener closes (new connections are refused; a worker closes only its copy
           of the supervisor's slot socket). Idle keep-alive connections close now, busy ones
           after their answer. In-flight requests and streams get ``drain_timeout`` seconds.
        3. What is still running is cancelled (the handler task is cancelled, which drops the
           upstream request); background tasks get 1 s; the admin listener closes last.

        Args:
            drain_timeout: seconds for phase 2; None: ``gateway.drain.timeout``.
            grace: seconds for phase 1 (the CLI passes ``gateway.drain.grace``; 0 skips it).
        """
        self.begin_drain()
        if grace > 0 and self._listener is not None:
            await asyncio.sleep(grace)
        if drain_timeout is None:
            drain_timeout = self.config.gateway.drain.timeout
        if self._listener is not None and self._http is not None:
            self._listener.close()
            self._http.close_idle()  # idle keep-alive connections close now
            if self._in_flight:
                try:
                    async with asyncio.timeout(drain_timeout):
                        await self._idle.wait()
                except TimeoutError:
                    log.warning("drain timeout: %d requests still in flight", self._in_flight)
            # what is left after drain.timeout gets a moment, then is cut
            await self._http.shutdown(1.0)
            self._listener = None
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        await self.tasks.drain(1.0)
        await self._finish_reloads()
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
        if self.access_log is not None:  # after the last request: every line is written
            await self.access_log.close()
            self.access_log = None
