"""Access log: the fields of a line, the residency rule of sinks, and what never appears.

The integration tests run the real gateway (test_proxy's ``make_gateway``, own region
us-east-1, which serves zones us and global) with file sinks, send requests as clients in
different zones, stop the gateway (which flushes the log) and read the files back.
"""

from __future__ import annotations

import hashlib
import re
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.accesslog import AccessLog, hash_tenant, rfc3339, truncate_address
from gateway.config import AccessLogConfig, ConfigError, load_config
from gateway.tenants import hash_key
from tests.gateway.test_proxy import (
    CN,
    GB,
    SERVERS,
    US,
    GatewayFactory,
    Upstream,
    make_gateway,
    upstreams,
)

__all__ = ["make_gateway", "upstreams"]  # fixtures, shared with test_proxy

KEY_A, KEY_B = "gg_log-test-key-a", "gg_log-test-key-b"
FIELDS = {
    "ts", "request_id", "tenant", "zone", "region", "endpoint", "method", "route", "path",
    "status", "bytes_in", "bytes_out", "total_ms", "upstream_ms", "first_byte_ms", "cache",
    "ratelimit", "retries", "client", "country", "trace_id",
}  # fmt: skip
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def _sha16(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    ("address", "truncated"),
    [("203.0.113.77", "203.0.113.0"), ("81.2.69.142", "81.2.69.0"),
     ("2001:db8:1:2:3:4:5:6", "2001:db8:1::"), ("2a02:cf40:abcd:ffff::1", "2a02:cf40:abcd::"),
     ("::ffff:81.2.69.142", "81.2.69.0")],
)  # fmt: skip
def test_truncate_address(address: str, truncated: str) -> None:
    assert truncate_address(ip_address(address)) == truncated


def test_hash_tenant_and_timestamp() -> None:
    assert hash_tenant("acme") == _sha16("acme")
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", hash_tenant("acme"))
    assert rfc3339(0.5) == "1970-01-01T00:00:00.500Z"
    assert rfc3339(1714564800.123456) == "2024-05-01T12:00:00.123Z"


async def test_sinks_follow_the_zone_rule(tmp_path: Path) -> None:
    eu, default = str(tmp_path / "eu.log"), str(tmp_path / "default.log")
    config = AccessLogConfig(default=default, zones={"eu": eu, "cn": "off"})
    log = await AccessLog.open(config, own_zones={"us", "global"})
    assert log is not None
    try:
        assert log.sink_for("eu") == (eu, False)  # its own sink: the line as it is
        assert log.sink_for("us") == (default, False)  # our region serves us
        assert log.sink_for("global") == (default, False)
        assert log.sink_for("ap") == (default, True)  # not ours, no sink of its own
        assert log.sink_for(None) == (default, True)  # zone unknown: fail closed
        assert log.sink_for("cn") == (None, False)  # dropped
    finally:
        await log.close()


async def test_nothing_is_opened_when_the_log_is_off(tmp_path: Path) -> None:
    assert await AccessLog.open(AccessLogConfig(enabled=False), own_zones=set()) is None
    assert await AccessLog.open(AccessLogConfig(default="off"), own_zones=set()) is None
    missing_dir = AccessLogConfig(default=str(tmp_path / "no" / "such" / "dir.log"))
    with pytest.raises(FileNotFoundError):
        await AccessLog.open(missing_dir, own_zones=set())


def test_config_resolves_paths_and_checks_zones(tmp_path: Path) -> None:
    from tests.gateway.test_proxy import COUNTRY_TEST_DB

    base = (
        f"gateway: {{region: r1, geodb: {COUNTRY_TEST_DB}}}\n"
        "residency: {default_zone: g, zones: {g: {}, eu: {countries: [DE]}}}\n"
        "regions: {r1: {zones: [g], endpoints: ['http://127.0.0.1:1']}}\n"
        "routes: [{prefix: /}]\n"
    )
    path = tmp_path / "gw.yaml"
    path.write_text(base)
    assert load_config(path).access_log.enabled is False  # absent: off
    path.write_text(base + "access_log: {default: logs/a.log, zones: {eu: stderr}}\n")
    cfg = load_config(path).access_log
    assert cfg.enabled is True
    assert cfg.default == str(tmp_path / "logs" / "a.log")
    assert cfg.zones == {"eu": "stderr"}
    path.write_text(base + "access_log: {zones: {mars: stdout}}\n")
    with pytest.raises(ConfigError, match=r"access_log\.zones\.mars: zone 'mars' is not defined"):
        load_config(path)


# --- through a real gateway --------------------------------------------------------------


@pytest.fixture
async def logged(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], tmp_path: Path
) -> tuple[str, Path, Path]:
    us_log, default_log = tmp_path / "access-us.log", tmp_path / "access-default.log"
    base = await make_gateway(
        {r: [u.url] for r, u in upstreams.items()},
        route_extra={"auth": "optional"},
        extra={
            "tenants": [
                {"id": "tenant-a", "keys": [hash_key(KEY_A)]},
                {"id": "tenant-b", "keys": [hash_key(KEY_B)], "residency": "eu"},
            ],
            "access_log": {"default": str(default_log), "zones": {"us": str(us_log)}},
        },
    )
    return base, us_log, default_log


def _pick(line: dict[str, Any], *fields: str) -> tuple[Any, ...]:
    return tuple(line[f] for f in fields)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def test_one_line_per_request_in_the_sink_its_zone_allows(
    logged: tuple[str, Path, Path],
) -> None:
    base, us_log, default_log = logged
    secret_body = b'{"prompt": "my-secret-prompt"}'
    ids: dict[str, str] = {}
    async with aiohttp.ClientSession() as session:
        requests = [
            ("us", f"{base}/echo?api_key=query-secret",
             {"Authorization": f"Bearer {KEY_A}", "X-Forwarded-For": US,
              "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}),
            ("eu-pinned", f"{base}/echo", {"X-API-Key": KEY_B, "X-Forwarded-For": US}),
            ("eu", f"{base}/echo", {"X-Forwarded-For": GB}),
            ("global", f"{base}/echo", {"X-Forwarded-For": "10.1.2.3"}),
            ("cn", f"{base}/echo", {"X-Forwarded-For": CN}),  # no region serves cn: 451
            ("unknown-key", f"{base}/echo", {"Authorization": "Bearer not-a-key"}),
        ]  # fmt: skip
        for name, url, headers in requests:
            async with session.post(url, data=secret_body, headers=headers) as resp:
                await resp.read()
                ids[name] = resp.headers["X-Request-Id"]
    await SERVERS[base].stop(0)  # flushes the log: every accepted line is written

    [us] = _lines(us_log)
    by_id = {line["request_id"]: line for line in _lines(default_log)}
    assert set(by_id) == {ids[n] for n in ("eu-pinned", "eu", "global", "cn", "unknown-key")}
    for line in (us, *by_id.values()):
        assert set(line) == FIELDS
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
        assert line["method"] == "POST"
        assert line["path"] == "/echo"  # never the query string
        assert line["bytes_in"] == len(secret_body)
        assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"])

    # zone us has its own sink: the line as it is
    assert us["request_id"] == ids["us"]
    assert (us["tenant"], us["zone"], us["client"], us["country"]) == ("tenant-a", "us", US, "US")
    assert (us["region"], us["status"], us["route"], us["retries"]) == ("us-east-1", 200, "/", 0)
    assert us["endpoint"].startswith("http://127.0.0.1:")
    assert us["trace_id"] == TRACE_ID
    assert us["bytes_out"] > 0
    assert 0 < us["first_byte_ms"] <= us["total_ms"]
    assert 0 < us["upstream_ms"] <= us["total_ms"]
    # eu is not served by our region and has no sink: address truncated, tenant hashed
    pinned, eu = by_id[ids["eu-pinned"]], by_id[ids["eu"]]
    assert _pick(pinned, "zone", "tenant", "client") == ("eu", _sha16("tenant-b"), "216.160.83.0")
    assert _pick(eu, "zone", "tenant", "client", "region") == ("eu", None, "81.2.69.0", "eu-west-1")
    # global is served by our region: the default sink gets the line as it is
    glob = by_id[ids["global"]]
    assert (glob["zone"], glob["client"], glob["country"]) == ("global", "10.1.2.3", None)
    cn = by_id[ids["cn"]]
    assert _pick(cn, "zone", "status", "client", "region") == ("cn", 451, "175.16.199.0", None)
    assert cn["upstream_ms"] is None
    # a 401 comes before the zone is known: fail closed, the peer address truncated
    unknown = by_id[ids["unknown-key"]]
    assert (unknown["zone"], unknown["status"], unknown["client"]) == (None, 401, "127.0.0.0")

    everything = us_log.read_bytes() + default_log.read_bytes()
    for secret in (KEY_A, KEY_B, "not-a-key", "Bearer", "Authorization", "X-API-Key",
                   "my-secret-prompt", "query-secret", "api_key"):  # fmt: skip
        assert secret.encode() not in everything


async def test_cache_and_ratelimit_results_are_logged(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    base = await make_gateway(
        {r: [u.url] for r, u in upstreams.items()},
        route_extra={"auth": "required", "rate_limit": "one"},
        extra={
            "tenants": [{"id": "tenant-a", "keys": [hash_key(KEY_A)]}],
            "rate_limits": {"one": {"requests_per_second": 1, "burst": 1}},
            "access_log": {"default": str(log_path)},
        },
    )
    headers = {"Authorization": f"Bearer {KEY_A}", "X-Forwarded-For": US}
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.get(f"{base}/echo", headers=headers) as resp:
                await resp.read()
    await SERVERS[base].stop(0)
    first, second = _lines(log_path)
    assert (first["status"], first["ratelimit"], first["region"]) == (200, "allowed", "us-east-1")
    assert (second["status"], second["ratelimit"], second["region"]) == (429, "limited", None)
    assert second["upstream_ms"] is None
    assert second["first_byte_ms"] is not None
    assert second["cache"] is None
