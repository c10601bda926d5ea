"""Hop-by-hop removal and forwarding header construction."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.headers import (
    connection_listed,
    encode_head,
    forwarded_element,
    strip_hop_by_hop,
    via_value,
    without_field,
)


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


def test_encode_head_joins_start_line_fields_and_extra_lines() -> None:
    fields = [("A", "1"), ("a", "2"), ("B", "caf\udcc3\udca9")]  # a non-UTF-8 value as decoded
    assert encode_head("GET / HTTP/1.1", fields, 3, ["Content-Length: 0\r\n"]) == (
        b"GET / HTTP/1.1\r\nA: 1\r\na: 2\r\nB: caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n"
    )
    assert encode_head("HTTP/1.1 204 No Content", [], 0) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert without_field(fields, "a") == [("B", "caf\udcc3\udca9")]


@pytest.mark.parametrize(
    ("start", "fields"),
    [("GET / HTTP/1.1", [("X", "a\r\nSet-Cookie: b")]), ("GET / HTTP/1.1", [("X", "a\nb")]),
     ("GET / HTTP/1.1", [("X\r", "a")]), ("GET /\r\nX: y HTTP/1.1", []),
     ("GET / HTTP/1.1", [("X", "a\r")])],
)  # fmt: skip
def test_encode_head_refuses_cr_or_lf_inside_a_line(
    start: str, fields: list[tuple[str, str]]
) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        encode_head(start, fields, len(fields))
