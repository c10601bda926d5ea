"""Typed, validated gateway configuration loaded from YAML.

``load_config(path)`` parses the YAML with PyYAML's safe loader, validates it with pydantic
(frozen models, unknown keys refused so a misspelled key is an error, not a silent default),
runs the cross-field checks pydantic cannot express (a route's region exists, a country sits in
one zone only, ...) and returns a ``GatewayConfig``. Every problem is reported at once as a
``ConfigError`` whose issues read ``file:key: reason``.

Units: durations are float seconds (YAML accepts ``250ms``, ``2s``, ``1m``, ``1h`` or a bare
number of seconds); sizes are int bytes (YAML accepts ``512``, ``64KiB``, ``10MiB``, ``1MB``).
Relative paths (``gateway.geodb``, ``residency.policy``) are resolved against the directory of
the file that names them.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)
from yarl import URL

from gateway.errors import ConfigError, ConfigIssue

__all__ = [
    "KIB",
    "MIB",
    "MS",
    "SECONDS",
    "AccessLogConfig",
    "AdminConfig",
    "BreakerConfig",
    "CacheConfig",
    "ConfigError",
    "DrainConfig",
    "GatewayConfig",
    "GatewaySection",
    "HealthConfig",
    "LimitsConfig",
    "Listen",
    "OutlierConfig",
    "RateLimitPolicy",
    "RedisConfig",
    "RegionConfig",
    "ResidencyConfig",
    "RetryBudgetConfig",
    "RetryConfig",
    "RouteCacheConfig",
    "RouteConfig",
    "TenantConfig",
    "TimeoutsConfig",
    "TlsConfig",
    "UpstreamConfig",
    "ZoneConfig",
    "load_config",
    "parse_duration",
    "parse_size",
]

SECONDS, MS, KIB, MIB = 1.0, 0.001, 1024, 1024 * 1024

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": MS, "s": SECONDS, "m": 60 * SECONDS, "h": 3600 * SECONDS, None: SECONDS}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "KB": 1000, "KiB": KIB, "MB": 1000**2, "MiB": MIB,
    "GB": 1000**3, "GiB": 1024 * MIB,
}  # fmt: skip
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def parse_duration(value: Any) -> float:
    """Parse a duration into float seconds.

    Args:
        value: a number of seconds (int or float) or a string such as ``"250ms"``, ``"2s"``,
            ``"1.5m"``, ``"1h"``.

    Returns:
        Seconds, >= 0.

    Raises:
        ValueError: not a duration (e.g. ``'5 parsecs'``), or negative.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (use e.g. 250ms, 2s, 1m)")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration (use e.g. 250ms, 2s, 1m)")
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    return seconds


def parse_size(value: Any) -> int:
    """Parse a size into int bytes.

    Args:
        value: an int number of bytes or a string such as ``"64KiB"``, ``"10MiB"``, ``"1MB"``.

    Returns:
        Bytes, >= 0.

    Raises:
        ValueError: not a size (e.g. ``'ten megs'``), or negative.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size (use e.g. 512, 64KiB, 10MiB)")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return value
    if isinstance(value, str) and (m := _SIZE_RE.match(value)):
        return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a size (use e.g. 512, 64KiB, 10MiB)")


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a valid name (lower-case letters, digits, - and _)")
    return value


def _check_country(value: Any) -> str:
    if isinstance(value, bool):
        raise ValueError(
            f"{value!r} is a boolean: YAML reads NO, YES, ON and OFF as booleans; quote the "
            "country code, e.g. 'NO'"
        )
    if not (isinstance(value, str) and len(value) == 2 and value.isascii() and value.isupper()):
        raise ValueError(f"{value!r} is not an ISO 3166-1 alpha-2 code such as 'DE'")
    return value


def _check_cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP network in CIDR form (e.g. 10.0.0.0/8)") from None
    return value


def _check_endpoint(value: str) -> str:
    try:
        url = URL(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
    if url.path not in ("", "/") or url.query_string or url.fragment:
        raise ValueError(f"{value!r}: an endpoint is scheme://host:port, without path or query")
    return str(url.origin())


def _check_prefix(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{value!r}: a route prefix starts with '/'")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
Name = Annotated[str, AfterValidator(_check_name)]
Country = Annotated[str, BeforeValidator(_check_country)]
Cidr = Annotated[str, AfterValidator(_check_cidr)]
Endpoint = Annotated[str, AfterValidator(_check_endpoint)]
Prefix = Annotated[str, AfterValidator(_check_prefix)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


class Listen(_Model):
    """A listener address, parsed from ``"host:port"`` (``"[::1]:8080"`` for IPv6)."""

    host: str
    port: int = Field(ge=0, le=65535)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _parse_listen(value: Any) -> Any:
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:8080)")
        return {"host": host.strip("[]"), "port": int(port)}
    return value


ListenAddr = Annotated[Listen, BeforeValidator(_parse_listen)]


class LimitsConfig(_Model):
    """Limits on what a client may send; enforced before any upstream is contacted.

    Usage::

        limits: {max_body_bytes: 10MiB, max_header_bytes: 8KiB, max_headers: 100}
    """

    max_body_bytes: Size = 10 * MIB  # larger request body -> 413 (RFC 9110 §15.5.14)
    max_request_line_bytes: Size = 8 * KIB  # longer request line -> 414 (RFC 9110 §15.5.15)
    max_header_bytes: Size = 8 * KIB  # longer header field line -> 431 (RFC 6585 §5)
    max_headers: int = Field(default=100, ge=1, le=1000)  # more header fields -> 431


class DrainConfig(_Model):
    """How a gateway process stops on SIGTERM or SIGINT (see ``GatewayServer.stop``).

    Usage::

        drain: {grace: 5s, timeout: 30s}
    """

    # phase 1: readiness answers 503 and every response says "Connection: close", while the
    # listener still accepts, so a load balancer sees the process go and keep-alive clients
    # move to another one before any connection is refused
    grace: Duration = 5 * SECONDS
    # phase 2: the listener is closed; in-flight requests and streams get this long to finish,
    # then they are cancelled and the process exits
    timeout: Duration = 30 * SECONDS


class TlsConfig(_Model):
    """TLS termination on the proxy listener (TLS 1.2 or newer, ALPN ``http/1.1``).

    Usage::

        tls: {cert: certs/gateway.pem, key: certs/gateway.key}   # relative to the config file

    ``cert`` is a PEM file with the certificate, intermediates after it; ``key`` the PEM
    private key. Both are read and checked by ``load_config``.
    """

    cert: Path
    key: Path


class GatewaySection(_Model):
    """The ``gateway:`` section: who this instance is and where it listens."""

    region: Name  # the region this gateway runs in; preferred for every zone it serves
    listen: ListenAddr = Listen(host="127.0.0.1", port=8080)
    trusted_proxies: tuple[Cidr, ...] = ()  # peers whose X-Forwarded-For / Forwarded we trust
    # Which forwarding header names the client behind a trusted proxy. Most proxies (nginx,
    # cloud load balancers) append to X-Forwarded-For and pass a client's own Forwarded header
    # through untouched, so believing Forwarded is opt-in: "forwarded" (RFC 7239 only) or
    # "both" (Forwarded when present, else X-Forwarded-For) for proxies that write it.
    client_address_header: Literal["x-forwarded-for", "forwarded", "both"] = "x-forwarded-for"
    geodb: Path  # MaxMind DB file: GeoIP2/GeoLite2 Country or City, or DB-IP country
    geoip_cache_size: int = Field(default=65536, ge=0)  # LRU entries of address -> country
    limits: LimitsConfig = LimitsConfig()
    via: str = "geogate"  # pseudonym in the Via header (RFC 9110 §7.6.3)
    # RateLimit-Policy / RateLimit fields on every rate-limited answer, or only on 429
    ratelimit_headers: Literal["always", "on_429"] = "always"
    drain: DrainConfig = DrainConfig()
    tls: TlsConfig | None = None  # None: plain HTTP on the listener


class ZoneConfig(_Model):
    """One residency zone: the countries whose users' requests must stay in it."""

    countries: tuple[Country, ...] = ()
    description: str = ""


class ResidencyConfig(_Model):
    """The ``residency:`` section: country -> zone rules.

    ``policy`` names a YAML file with ``default_zone`` and ``zones`` (config/residency.yaml
    ships EU27 + EEA + GB + CH -> eu, US -> us); keys given inline override the file's.
    """

    default_zone: Name
    zones: Mapping[Name, ZoneConfig]


class RegionConfig(_Model):
    """One region: the zones it may serve and its upstream endpoints."""

    zones: tuple[Name, ...] = Field(min_length=1)
    endpoints: tuple[Endpoint, ...] = Field(min_length=1)
    drained: bool = False  # a drained region takes no new requests; in-flight ones finish
    description: str = ""


class TimeoutsConfig(_Model):
    """Per-attempt upstream timeouts, seconds.

    Usage::

        timeouts: {connect: 2s, first_byte: 60s, idle: 60s, total: 10m}
    """

    connect: Duration = 2 * SECONDS  # TCP connect to an endpoint -> 504 phase=connect
    first_byte: Duration = 60 * SECONDS  # request sent -> response headers -> 504 first_byte
    idle: Duration = 60 * SECONDS  # longest gap between two body chunks -> 504 idle
    total: Duration = 600 * SECONDS  # whole exchange, retries included -> 504 total


class RetryConfig(_Model):
    """When a failed attempt is tried again on another endpoint (same zone, never another).

    Only before any response byte went to the client. A connect failure is retried for every
    method (nothing was sent); a reset before the response or a status in ``on_statuses`` only
    for idempotent methods (RFC 9110 §9.2.2), or for any method when ``non_idempotent`` is set
    or the request carries an ``Idempotency-Key`` (IETF httpapi draft).

    Usage::

        retry: {attempts: 3, on_statuses: [502, 503, 504], non_idempotent: false}
    """

    attempts: int = Field(default=3, ge=1, le=10)  # total attempts, the first included
    on_statuses: tuple[int, ...] = (502, 503, 504)
    non_idempotent: bool = False  # retry POST/PATCH too (the upstream dedupes)
    backoff_base: Duration = 25 * MS  # full-jitter exponential backoff between attempts
    backoff_cap: Duration = 250 * MS


class RouteCacheConfig(_Model):
    """A route's cache policy.

    ``http``: an RFC 9111 shared cache for GET and HEAD (freshness, Vary, revalidation,
    stale-while-revalidate / stale-if-error, invalidation after unsafe methods).
    ``llm-exact``: exact-match answers for deterministic LLM POSTs (OpenAI chat completions,
    LangServe invoke/stream), replayed as JSON or SSE. Entries of a zone are only stored in
    that zone's Redis (``redis.cache``) and in process.

    Usage::

        cache: {policy: http, max_entry_bytes: 1MiB}
    """

    policy: Literal["none", "http", "llm-exact"] = "none"
    max_entry_bytes: Size = 1 * MIB  # larger answers are passed through, not stored
    # http only: how stale an entry may be served when no answer comes from the upstream at
    # all (refused, reset, timed out, no region of the zone): RFC 9111 §4.2.4's disconnected
    # cache. Never for must-revalidate / proxy-revalidate / s-maxage / no-cache responses.
    stale_if_disconnected: Duration = 60 * SECONDS
    # llm-exact only:
    ttl: Duration = 3600 * SECONDS  # an answer is served fresh this long
    stale_if_error: Duration = 0 * SECONDS  # ... and this much longer when the upstream fails
    default_temperature: float | None = None  # the backend's when a body sends none; None: unknown
    share_scope: str | None = None  # tenants naming the same scope share entries; None: per tenant
    ignore_fields: tuple[str, ...] = ("user", "metadata")  # body fields left out of the key


class RouteConfig(_Model):
    """One route: requests whose host and path prefix match go to ``service``'s regions.

    Matching: the longest matching prefix wins among routes whose ``host`` is the request's
    host or None (any host); a host-specific route beats a host-less one of equal length.
    """

    prefix: Prefix
    host: str | None = None
    methods: tuple[str, ...] | None = None  # None: every method but CONNECT and TRACE
    timeouts: TimeoutsConfig = TimeoutsConfig()
    max_body_bytes: Size | None = None  # overrides gateway.limits.max_body_bytes
    retry: RetryConfig = RetryConfig()
    # "required": 401 without a known API key; "optional": a key, if sent, must be known;
    # "none": keys are not looked at.
    auth: Literal["required", "optional", "none"] = "none"
    rate_limit: str | None = None  # policy for tenants without one of their own for the route
    cache: RouteCacheConfig = RouteCacheConfig()


class HealthConfig(_Model):
    """Active health probes per endpoint (HAProxy ``inter``/``rise``/``fall``: 2 s, 2, 3)."""

    enabled: bool = True
    path: str = "/health"  # the backend's deep health check
    interval: Duration = 2 * SECONDS
    timeout: Duration = 1 * SECONDS
    healthy_threshold: int = Field(default=2, ge=1)
    unhealthy_threshold: int = Field(default=3, ge=1)
    expected_statuses: tuple[int, ...] = (200,)
    jitter: float = Field(default=0.2, ge=0, lt=1)  # each wait is interval x (1 ± jitter)


class OutlierConfig(_Model):
    """Passive outlier detection: consecutive failures on real traffic eject an endpoint."""

    consecutive_failures: int = Field(default=5, ge=1)  # 5xx, connect failures, timeouts
    base_ejection_time: Duration = 30 * SECONDS  # x times ejected
    max_ejection_time: Duration = 300 * SECONDS
    max_ejection_share: float = Field(default=0.5, gt=0, le=1)  # at least one may always go
    trial_requests: int = Field(default=1, ge=1)  # concurrent requests when an ejection ends


class BreakerConfig(_Model):
    """Circuit breaker per endpoint (pybreaker's state machine)."""

    fail_max: int = Field(default=5, ge=1)  # consecutive failures that open it
    reset_timeout: Duration = 30 * SECONDS  # OPEN lasts this long, then HALF_OPEN
    half_open_max_concurrent: int = Field(default=1, ge=1)  # trial requests in HALF_OPEN


class RetryBudgetConfig(_Model):
    """Retries in flight stay below max(min_concurrent, ratio x active requests) (Envoy)."""

    ratio: float = Field(default=0.2, ge=0, le=1)
    min_concurrent: int = Field(default=3, ge=0)


def _check_sink(value: str) -> str:
    if not value.strip():
        raise ValueError("a log sink is stdout, stderr, off or a file path, not empty")
    return value


LogSink = Annotated[str, AfterValidator(_check_sink)]


class AccessLogConfig(_Model):
    """The access log: one JSON line per request (``gateway.accesslog``); off when absent.

    A sink is ``stdout``, ``stderr``, ``off`` or a file path (relative to the config file).
    A request of zone Z is logged to ``zones[Z]`` when given, else to ``default``; there,
    when the gateway's own region does not serve Z, with the client address truncated and
    the tenant id hashed.

    Usage::

        access_log:
          default: stdout
          zones: {eu: /var/log/geogate/access-eu.log, us: stdout}
    """

    enabled: bool = True
    default: LogSink = "stdout"  # sink for zones without a sink of their own
    zones: Mapping[Name, LogSink] = {}  # zone -> its own sink (a sink inside that zone)


class AdminConfig(_Model):
    """The admin listener: status JSON, drain/undrain, metrics. Keep it off public networks."""

    listen: ListenAddr | None = None  # None: no admin listener
    token: str | None = None  # when set, required as "Authorization: Bearer <token>"


class UpstreamConfig(_Model):
    """Connection pool and DNS settings towards the upstream endpoints."""

    max_connections: int = Field(default=1000, ge=1)  # across all endpoints
    max_connections_per_endpoint: int = Field(default=0, ge=0)  # 0: no per-endpoint cap
    keepalive_timeout: Duration = 30 * SECONDS  # idle pooled connection lifetime
    dns_min_ttl: Duration = 1 * SECONDS  # record TTLs are clamped into [min, max]
    dns_max_ttl: Duration = 300 * SECONDS
    nameservers: tuple[str, ...] = ()  # "ip" or "ip:port"; empty: the system's resolvers
    max_concurrent_per_endpoint: int = Field(default=0, ge=0)  # bulkhead; 0: no cap -> 503
    latency_ewma_alpha: float = Field(default=0.3, gt=0, le=1)  # weight of a new RTT sample
    health: HealthConfig = HealthConfig()
    outlier: OutlierConfig = OutlierConfig()
    breaker: BreakerConfig = BreakerConfig()
    retry_budget: RetryBudgetConfig = RetryBudgetConfig()


_KEY_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def _check_key_hash(value: str) -> str:
    if not _KEY_HASH_RE.match(value):
        raise ValueError(
            "API keys are stored as 'sha256:<64 hex digits>' (print one with "
            "`geogate hash-key`), never in clear"
        )
    return value


KeyHash = Annotated[str, AfterValidator(_check_key_hash)]


class RateLimitPolicy(_Model):
    """A named set of limits applied per tenant x route (each one optional).

    Usage::

        rate_limits:
          default: {requests_per_second: 10, burst: 20, requests_per_minute: 600,
                    concurrent: 8, tokens_per_minute: 20000, on_redis_trouble: fallback}
    """

    requests_per_second: float | None = Field(default=None, gt=0)  # GCRA rate
    burst: int | None = Field(default=None, ge=1)  # GCRA burst; default = requests_per_second
    requests_per_minute: int | None = Field(default=None, ge=1)
    concurrent: int | None = Field(default=None, ge=1)  # in-flight requests
    tokens_per_minute: int | None = Field(default=None, ge=1)  # LLM prompt + completion tokens
    default_max_tokens: int = Field(default=256, ge=1)  # reserved when a request names none
    # When the control Redis is in trouble: "fallback" limits locally at local_share of each
    # limit, "open" admits, "closed" refuses (503).
    on_redis_trouble: Literal["fallback", "open", "closed"] = "fallback"
    local_share: float = Field(default=0.5, gt=0, le=1)


class TenantConfig(_Model):
    """A tenant: who a request is from, where its data must stay, what it may use."""

    id: Name
    keys: tuple[KeyHash, ...] = Field(min_length=1)  # SHA-256 of each API key
    residency: Name | None = None  # pin: beats the client's country (a zone name)
    limits: Mapping[str, str] = {}  # route prefix -> policy name (beats the route's default)


class RedisConfig(_Model):
    """Redis servers: ``control`` holds counters with no user data (rate limits); ``cache``
    maps each zone to the Redis that may hold that zone's cache entries (user data: prompts,
    answers), which must sit in that zone's regions."""

    control: str | None = None  # redis://host:port/db; None: in-process stores
    cache: Mapping[Name, str] = {}  # zone -> redis://...; zones without one: in process only
    call_timeout: Duration = 20 * MS  # budget per Redis call before falling back
    breaker_fail_max: int = Field(default=3, ge=1)
    breaker_reset_timeout: Duration = 5 * SECONDS


class CacheConfig(_Model):
    """The in-process (L1) cache, shared by every cached route."""

    l1_max_bytes: Size = 64 * MIB
    l2_call_timeout: Duration = 50 * MS  # budget per zone-Redis call before it counts a miss


class GatewayConfig(_Model):
    """The whole, validated configuration of one gateway instance."""

    gateway: GatewaySection
    residency: ResidencyConfig
    regions: Mapping[Name, RegionConfig]
    routes: tuple[RouteConfig, ...] = Field(min_length=1)
    upstream: UpstreamConfig = UpstreamConfig()
    admin: AdminConfig = AdminConfig()
    rate_limits: Mapping[Name, RateLimitPolicy] = {}
    tenants: tuple[TenantConfig, ...] = ()
    redis: RedisConfig = RedisConfig()
    cache: CacheConfig = CacheConfig()
    access_log: AccessLogConfig = AccessLogConfig(enabled=False)  # the section turns it on
    source: Path | None = Field(default=None, exclude=True)  # the file it was loaded from


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _issues_from(
    exc: ValidationError, file: str, prefix: tuple[str, ...] = ()
) -> list[ConfigIssue]:
    issues = []
    errors = exc.errors(include_url=False)
    failed_locs = {tuple(e["loc"]) for e in errors if e["type"] != "too_short"}
    missing = {tuple(e["loc"]) for e in errors if e["type"] == "missing"}
    explained: set[tuple[int | str, ...]] = set()
    messages: list[tuple[tuple[int | str, ...], str]] = []
    for err in errors:
        loc = tuple(err["loc"])
        if err["type"] == "too_short" and any(f[: len(loc)] == loc for f in failed_locs):
            continue  # a consequence of an item that failed: that item's error says it all
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            siblings = [str(m[-1]) for m in missing if m[:-1] == loc[:-1]]
            close = difflib.get_close_matches(str(loc[-1]), siblings, n=1)
            if close:
                msg = f"unknown key; did you mean {close[0]!r}?"
                explained.add((*loc[:-1], close[0]))
            else:
                msg = "unknown key (misspelled?)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        messages.append((loc, msg))
    for loc, msg in messages:
        if loc not in explained:
            issues.append(ConfigIssue(file, _key_path(prefix + loc), msg))
    return issues


def _read_yaml(path: Path, issues: list[ConfigIssue]) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        issues.append(ConfigIssue(str(path), "", "no such file"))
        return None
    except (OSError, UnicodeDecodeError) as exc:
        issues.append(ConfigIssue(str(path), "", f"cannot read: {exc}"))
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        issues.append(ConfigIssue(str(path), "", f"invalid YAML: {where}{problem}"))
        return None


def _merge_residency(raw: dict[str, Any], base: Path, issues: list[ConfigIssue]) -> dict[str, Any]:
    """Fold ``residency.policy`` (a file) into the inline residency keys; inline keys win."""
    residency = raw.get("residency")
    if not isinstance(residency, dict) or "policy" not in residency:
        return raw
    residency = dict(residency)
    policy_value = residency.pop("policy")
    if not isinstance(policy_value, str):
        issues.append(ConfigIssue(str(base), "residency.policy", "must be a file path"))
        return {**raw, "residency": residency}
    policy_path = base.parent / policy_value
    if not policy_path.is_file():
        issues.append(ConfigIssue(str(base), "residency.policy", f"{policy_path}: no such file"))
        return {**raw, "residency": residency}
    policy = _read_yaml(policy_path, issues)
    if policy is None:
        return {**raw, "residency": residency}
    if not isinstance(policy, dict) or not set(policy) <= {"default_zone", "zones"}:
        issues.append(
            ConfigIssue(str(policy_path), "", "a residency policy has only default_zone and zones")
        )
        return {**raw, "residency": residency}
    try:
        ResidencyConfig.model_validate({"default_zone": "x", "zones": {}} | policy)
    except ValidationError as exc:
        issues.extend(_issues_from(exc, str(policy_path)))
        return {**raw, "residency": residency}
    zones = dict(policy.get("zones") or {}) | dict(residency.get("zones") or {})
    merged = {"default_zone": policy.get("default_zone")} | residency | {"zones": zones}
    return {**raw, "residency": {k: v for k, v in merged.items() if v is not None}}


def _merge_tenants_file(
    raw: dict[str, Any], base: Path, issues: list[ConfigIssue]
) -> dict[str, Any]:
    """Append the tenants of ``tenants_file`` (a YAML file with a ``tenants`` list)."""
    if "tenants_file" not in raw:
        return raw
    raw = dict(raw)
    value = raw.pop("tenants_file")
    if not isinstance(value, str):
        issues.append(ConfigIssue(str(base), "tenants_file", "must be a file path"))
        return raw
    tenants_path = base.parent / value
    if not tenants_path.is_file():
        issues.append(ConfigIssue(str(base), "tenants_file", f"{tenants_path}: no such file"))
        return raw
    data = _read_yaml(tenants_path, issues)
    if data is None:
        return raw
    if not isinstance(data, dict) or set(data) != {"tenants"}:
        issues.append(ConfigIssue(str(tenants_path), "", "a tenants file has one key: tenants"))
        return raw
    for i, tenant in enumerate(data["tenants"] or []):
        try:
            TenantConfig.model_validate(tenant)
        except ValidationError as exc:
            issues.extend(_issues_from(exc, str(tenants_path), (f"tenants[{i}]",)))
    return {**raw, "tenants": [*(raw.get("tenants") or []), *(data["tenants"] or [])]}


def _cross_checks(cfg: GatewayConfig, file: str) -> Iterator[ConfigIssue]:
    zones = cfg.residency.zones
    if cfg.residency.default_zone not in zones:
        yield ConfigIssue(
            file, "residency.default_zone", f"zone {cfg.residency.default_zone!r} is not defined"
        )
    owner: dict[str, str] = {}
    for zone, zc in zones.items():
        for i, country in enumerate(zc.countries):
            if country in owner and owner[country] != zone:
                yield ConfigIssue(
                    file,
                    f"residency.zones.{zone}.countries[{i}]",
                    f"{country} is already in zone {owner[country]!r}; a country has one zone",
                )
            owner.setdefault(country, zone)
    for name, region in cfg.regions.items():
        for i, zone in enumerate(region.zones):
            if zone not in zones:
                yield ConfigIssue(
                    file, f"regions.{name}.zones[{i}]", f"zone {zone!r} is not defined"
                )
    if cfg.gateway.region not in cfg.regions:
        yield ConfigIssue(
            file, "gateway.region", f"region {cfg.gateway.region!r} is not in regions"
        )
    seen: dict[tuple[str | None, str], int] = {}
    for i, route in enumerate(cfg.routes):
        key = (route.host.lower() if route.host else None, route.prefix)
        if key in seen:
            yield ConfigIssue(
                file, f"routes[{i}].prefix", f"same host and prefix as routes[{seen[key]}]"
            )
        seen.setdefault(key, i)
        if route.methods:
            for j, method in enumerate(route.methods):
                if method.upper() in ("CONNECT", "TRACE") or not method.isalpha():
                    yield ConfigIssue(
                        file, f"routes[{i}].methods[{j}]", f"{method!r} cannot be proxied"
                    )
    for zone in cfg.redis.cache:
        if zone not in zones:
            yield ConfigIssue(file, f"redis.cache.{zone}", f"zone {zone!r} is not defined")
    for zone in cfg.access_log.zones:
        if zone not in zones:
            yield ConfigIssue(file, f"access_log.zones.{zone}", f"zone {zone!r} is not defined")
    policies = cfg.rate_limits
    for i, route in enumerate(cfg.routes):
        if route.rate_limit is not None and route.rate_limit not in policies:
            yield ConfigIssue(
                file, f"routes[{i}].rate_limit", f"policy {route.rate_limit!r} is not defined"
            )
    prefixes = {r.prefix for r in cfg.routes}
    seen_ids: dict[str, int] = {}
    seen_keys: dict[str, str] = {}
    for i, tenant in enumerate(cfg.tenants):
        if tenant.id in seen_ids:
            yield ConfigIssue(
                file, f"tenants[{i}].id", f"{tenant.id!r} is also tenants[{seen_ids[tenant.id]}]"
            )
        seen_ids.setdefault(tenant.id, i)
        if tenant.residency is not None and tenant.residency not in zones:
            yield ConfigIssue(
                file, f"tenants[{i}].residency", f"zone {tenant.residency!r} is not defined"
            )
        for j, key_hash in enumerate(tenant.keys):
            owner_id = seen_keys.setdefault(key_hash, tenant.id)
            if owner_id != tenant.id:
                yield ConfigIssue(
                    file, f"tenants[{i}].keys[{j}]", f"the same key belongs to {owner_id!r}"
                )
        for prefix, policy in tenant.limits.items():
            if prefix not in prefixes:
                yield ConfigIssue(file, f"tenants[{i}].limits.{prefix}", "no route has this prefix")
            if policy not in policies:
                yield ConfigIssue(
                    file, f"tenants[{i}].limits.{prefix}", f"policy {policy!r} is not defined"
                )
    if not cfg.gateway.geodb.is_file():
        yield ConfigIssue(file, "gateway.geodb", f"{cfg.gateway.geodb}: no such file")
    yield from _check_tls(cfg.gateway.tls, file)


def _check_tls(tls: TlsConfig | None, file: str) -> Iterator[ConfigIssue]:
    """Both files exist and ``SSLContext.load_cert_chain`` accepts them (key matches cert)."""
    if tls is None:
        return
    missing = False
    for key, path in (("cert", tls.cert), ("key", tls.key)):
        if not path.is_file():
            missing = True
            yield ConfigIssue(file, f"gateway.tls.{key}", f"{path}: no such file")
    if missing:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        yield ConfigIssue(file, "gateway.tls", f"cannot load the certificate and key: {reason}")


def _resolve_sinks(section: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the access log's file sinks absolute (relative to the config file's folder)."""

    def resolve(sink: Any) -> Any:
        if not isinstance(sink, str) or sink in ("stdout", "stderr", "off") or not sink.strip():
            return sink
        return str((base / sink).resolve())

    out = dict(section)
    if "default" in out:
        out["default"] = resolve(out["default"])
    if isinstance(out.get("zones"), dict):
        out["zones"] = {zone: resolve(sink) for zone, sink in out["zones"].items()}
    return out


def load_config(path: str | Path) -> GatewayConfig:
    """Load and validate a gateway config file.

    Synchronous (reads files): call it before the event loop starts, or in a thread.

    Args:
        path: the YAML file.

    Returns:
        The validated, frozen GatewayConfig; relative paths resolved against ``path``'s folder.

    Raises:
        ConfigError: every problem found, each as ``file:key: reason``.
    """
    path = Path(path)
    file = str(path)
    issues: list[ConfigIssue] = []
    raw = _read_yaml(path, issues)
    if issues:
        raise ConfigError(issues)
    if not isinstance(raw, dict):
        raise ConfigError([ConfigIssue(file, "", "the top level must be a mapping of sections")])
    raw = _merge_residency(raw, path, issues)
    raw = _merge_tenants_file(raw, path, issues)
    if issues:
        raise ConfigError(issues)
    gw = raw.get("gateway")
    if isinstance(gw, dict) and isinstance(gw.get("geodb"), str):
        raw = {**raw, "gateway": {**gw, "geodb": str((path.parent / gw["geodb"]).resolve())}}
    gw = raw.get("gateway")
    if isinstance(gw, dict) and isinstance(gw.get("tls"), dict):
        tls = dict(gw["tls"])
        for k in ("cert", "key"):
            if isinstance(tls.get(k), str):
                tls[k] = str((path.parent / tls[k]).resolve())
        raw = {**raw, "gateway": {**gw, "tls": tls}}
    if isinstance(raw.get("access_log"), dict):
        raw = {**raw, "access_log": _resolve_sinks(raw["access_log"], path.parent)}
    try:
        cfg = GatewayConfig.model_validate({**raw, "source": path})
    except ValidationError as exc:
        issues.extend(_issues_from(exc, file))
        raise ConfigError(issues) from None
    issues.extend(_cross_checks(cfg, file))
    if issues:
        raise ConfigError(issues)
    return cfg
