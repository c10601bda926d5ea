"""Hop-by-hop removal and forwarding header construction."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.headers import connection_listed, forwarded_element, strip_hop_by_hop, via_value


def test_strips_hop_by_hop_and_connection_listed() -> None:
    received = CIMultiDictProxy(
        CIMultiDict(
            [
                ("Connection", "keep-alive, X-Secret-Hop"),
                ("Connection", "Another"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Transfer-Encoding", "chunked"),
                ("Upgrade", "websocket"),
                ("Proxy-Authorization", "Basic x"),
                ("x-secret-hop", "1"),
                ("ANOTHER", "2"),
                ("X-Keep", "yes"),
                ("Authorization", "Bearer k"),
            ]
        )
    )
    out = strip_hop_by_hop(received, ("X-Residency-Zone",))
    assert dict(out) == {"X-Keep": "yes", "Authorization": "Bearer k"}
    assert "Connection" in received  # the original is untouched


def test_connection_listed_ignores_close_and_keep_alive() -> None:
    headers = CIMultiDict([("Connection", "close, Foo ,,bar")])
    assert connection_listed(headers) == ["foo", "bar"]


def test_forwarded_element_quotes_ipv6_and_ports() -> None:
    assert forwarded_element("203.0.113.7", proto="http", host="gw") == (
        "for=203.0.113.7;proto=http;host=gw"
    )
    assert forwarded_element("2001:db8::1", proto="https", host="gw:8080") == (
        'for="[2001:db8::1]";proto=https;host="gw:8080"'
    )
    assert forwarded_element(None, proto="http", host=None) == "for=unknown;proto=http"


def test_via() -> None:
    assert via_value((1, 1), "geogate") == "1.1 geogate"
    assert via_value((1, 0), "geogate") == "1.0 geogate"
