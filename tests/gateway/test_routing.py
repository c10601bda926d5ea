"""Route table: longest prefix, host-specific routes, methods."""

from __future__ import annotations

from gateway.config import LimitsConfig, RouteConfig
from gateway.routing import RouteTable


def table() -> RouteTable:
    return RouteTable(
        [
            RouteConfig(prefix="/"),
            RouteConfig(prefix="/v1/"),
            RouteConfig(prefix="/v1/", host="api.example.com", max_body_bytes=1024),
            RouteConfig(prefix="/admin/", host="ops.example.com", methods=("GET",)),
        ],
        LimitsConfig(),
    )


def test_longest_prefix_wins() -> None:
    t = table()
    assert t.match("gw", "/v1/chat/completions").index == 1
    assert t.match("gw", "/v1").index == 0  # "/v1/" does not match "/v1"
    assert t.match("gw", "/health").index == 0


def test_host_specific_route_beats_hostless_one() -> None:
    t = table()
    route = t.match("API.example.com:8080", "/v1/x")
    assert route.index == 2
    assert route.max_body_bytes == 1024
    assert t.match("api.example.com", "/other").index == 0


def test_no_route() -> None:
    t = RouteTable([RouteConfig(prefix="/v1/")], LimitsConfig())
    assert t.match("gw", "/admin") is None


def test_methods_default_and_explicit() -> None:
    t = table()
    assert "POST" in t.match("gw", "/").methods
    assert "CONNECT" not in t.match("gw", "/").methods
    assert "TRACE" not in t.match("gw", "/").methods  # RFC 9110 §9.3.8: would echo credentials
    assert "M-SEARCH" in t.match("gw", "/").methods  # extension methods are proxied
    assert t.match("ops.example.com", "/admin/x").methods == frozenset({"GET"})
