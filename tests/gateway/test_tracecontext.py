"""W3C Trace Context: parsing rules, and what a real upstream receives through the gateway.

Cases follow the W3C Trace Context Level 1 Recommendation and its test suite
(https://github.com/w3c/trace-context/tree/main/test): invalid traceparent -> restart the
trace and drop tracestate; tracestate over 32 members -> dropped; duplicated traceparent ->
restart.
"""

from __future__ import annotations

import re

import aiohttp
import pytest

from gateway.tracecontext import (
    MAX_TRACESTATE_CHARS,
    TraceContext,
    parse_traceparent,
    parse_tracestate,
)
from tests.gateway.test_proxy import US, Upstream, client, gw, make_gateway, upstreams

__all__ = ["client", "gw", "make_gateway", "upstreams"]  # fixtures, shared with test_proxy

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{PARENT_ID}-01"
TRACEPARENT_RE = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (VALID, (TRACE_ID, PARENT_ID, "01")),
        (f"00-{TRACE_ID}-{PARENT_ID}-00", (TRACE_ID, PARENT_ID, "00")),
        (f"00-{TRACE_ID}-{PARENT_ID}-03", (TRACE_ID, PARENT_ID, "03")),  # unknown bits kept
        (f" {VALID}\t", (TRACE_ID, PARENT_ID, "01")),  # OWS is not part of the value
        # a future version is read as 00 when it looks like one; only "sampled" is kept
        (f"cc-{TRACE_ID}-{PARENT_ID}-09", (TRACE_ID, PARENT_ID, "01")),
        (f"cc-{TRACE_ID}-{PARENT_ID}-02-what-the-future-brings", (TRACE_ID, PARENT_ID, "00")),
        (f"cc-{TRACE_ID}-{PARENT_ID}-01x", None),  # after 55 characters only "-" may follow
        (f"ff-{TRACE_ID}-{PARENT_ID}-01", None),  # version ff is invalid
        (f"00-{TRACE_ID}-{PARENT_ID}-01-extra", None),  # version 00 is exactly 55 characters
        (f"00-{TRACE_ID.upper()}-{PARENT_ID}-01", None),  # lowercase hex only
        (f"00-{TRACE_ID}-{PARENT_ID.upper()}-01", None),
        (f"00-{'0' * 32}-{PARENT_ID}-01", None),  # all-zero trace-id
        (f"00-{TRACE_ID}-{'0' * 16}-01", None),  # all-zero parent-id
        (f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01", None),
        (f"00-{TRACE_ID}-{PARENT_ID}-1", None),
        (f"00-{TRACE_ID}-{PARENT_ID[:-1]}g-01", None),
        (f"00_{TRACE_ID}_{PARENT_ID}_01", None),
        ("", None),
    ],
)
def test_parse_traceparent(value: str, expected: tuple[str, str, str] | None) -> None:
    assert parse_traceparent(value) == expected


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"], "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        (["rojo=1", "congo=2"], "rojo=1,congo=2"),  # several lines are one list
        (["rojo=1 , ,congo=2"], "rojo=1 , ,congo=2"),  # empty members allowed, kept as sent
        (["tenant@vendor=x", "a-b_c*d/e=v"], "tenant@vendor=x,a-b_c*d/e=v"),
        ([",".join(f"k{i}=v" for i in range(32))], ",".join(f"k{i}=v" for i in range(32))),
        ([",".join(f"k{i}=v" for i in range(33))], None),  # more than 32 members
        (["k=" + "v" * (MAX_TRACESTATE_CHARS - 1)], None),  # too long
        (["Rojo=1"], None),  # keys are lowercase
        (["rojo=1,rojo=2"], None),  # repeated key
        (["rojo"], None),  # not key=value
        (["rojo=a=b"], None),  # "=" is not a value character
        (["rojo=" + "v" * 257], None),  # values are at most 256 characters
        ([], None),
    ],
)
def test_parse_tracestate(lines: list[str], expected: str | None) -> None:
    assert parse_tracestate(lines) == expected


def test_a_valid_traceparent_is_continued_with_a_new_span() -> None:
    trace = TraceContext.from_headers([VALID], ["congo=t61rcWkgMzE"])
    assert (trace.trace_id, trace.parent_id, trace.flags) == (TRACE_ID, PARENT_ID, "01")
    assert trace.tracestate == "congo=t61rcWkgMzE"
    assert trace.span_id not in (PARENT_ID, "0" * 16)
    assert trace.traceparent() == f"00-{TRACE_ID}-{trace.span_id}-01"
    assert TraceContext.from_headers([VALID]).span_id != trace.span_id  # one span per request


@pytest.mark.parametrize(
    "traceparent",
    [[], [f"00-{'0' * 32}-{PARENT_ID}-01"], [VALID, VALID]],  # absent, invalid, duplicated
)
def test_without_a_valid_traceparent_a_trace_begins_and_tracestate_is_dropped(
    traceparent: list[str],
) -> None:
    trace = TraceContext.from_headers(traceparent, ["congo=t61rcWkgMzE"])
    assert trace.trace_id not in (TRACE_ID, "0" * 32)
    assert trace.parent_id is None
    assert trace.tracestate is None
    assert trace.flags == "00"  # the gateway records nothing itself: not "sampled"
    assert TRACEPARENT_RE.match(trace.traceparent())
    assert parse_traceparent(trace.traceparent()) is not None


# --- through a real gateway --------------------------------------------------------------


async def test_upstream_gets_the_callers_trace_with_the_gateways_span(
    gw: str, client: aiohttp.ClientSession, upstreams: dict[str, Upstream]
) -> None:
    headers = {
        "traceparent": VALID,
        "tracestate": "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
        "X-Request-Id": "req-42",
        "X-Forwarded-For": US,
    }
    async with client.get(f"{gw}/echo", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-Id"] == "req-42"
    [seen] = upstreams["us-east-1"].received
    sent = seen["headers"]
    assert sent.getall("traceparent") == [sent["traceparent"]]
    version, trace_id, parent_id, flags = sent["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert parent_id != PARENT_ID  # the gateway's own span is the parent now
    assert re.fullmatch(r"[0-9a-f]{16}", parent_id)
    assert sent.getall("tracestate") == ["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"]
    assert sent["X-Request-Id"] == "req-42"


@pytest.mark.parametrize(
    "client_headers",
    [{}, {"traceparent": f"00-{TRACE_ID.upper()}-{PARENT_ID}-01", "tracestate": "congo=1"},
     {"traceparent": VALID, "tracestate": ",".join(f"k{i}=v" for i in range(33))}],
    ids=["absent", "invalid", "tracestate-too-long"],
)  # fmt: skip
async def test_upstream_gets_a_valid_traceparent_and_only_a_valid_tracestate(
    gw: str,
    client: aiohttp.ClientSession,
    upstreams: dict[str, Upstream],
    client_headers: dict[str, str],
) -> None:
    async with client.get(f"{gw}/echo", headers={**client_headers, "X-Forwarded-For": US}) as r:
        assert r.status == 200
        request_id = r.headers["X-Request-Id"]
    [seen] = upstreams["us-east-1"].received
    sent = seen["headers"]
    assert TRACEPARENT_RE.match(sent["traceparent"])
    assert parse_traceparent(sent["traceparent"]) is not None
    continued = client_headers.get("traceparent") == VALID
    assert (sent["traceparent"].split("-")[1] == TRACE_ID) is continued
    assert "tracestate" not in sent
    assert sent["X-Request-Id"] == request_id
