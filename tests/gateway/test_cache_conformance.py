"""The ``http`` cache policy against the required tests of the http-tests/cache-tests suite.

https://github.com/http-tests/cache-tests runs a scripted origin behind the cache under test
and checks what reaches the client. Each case here restates one of the suite's tests (its id
is the parametrize id) in our own terms, against a real gateway (``gw`` from test_cache) in
front of an origin on loopback that plays the suite's server:

* every answer carries ``Server-Request-Count`` (how many requests of this test the origin saw)
  and ``Server-Now``, so a stored answer is recognised by a count below the request's number;
* a step expecting validation answers 304 only when the cache sent the previous step's
  validator (the suite answers 999 otherwise);
* integer date values are seconds from the origin's "now".

The suite pauses 3 s between some steps; here the gateway's wall clock (``gateway.cache``'s
``time``) and the origin's are one fake clock moved by 3 s instead. The client sends the
same ``Cache-Control: nothing-to-see-here`` and ``Pragma: foo`` as the suite's non-browser
runner. Only tests that apply to a shared cache are here (no ``browser_only``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

import gateway.cache
from gateway.httpcache import format_http_date, parse_http_date
from tests.gateway.test_cache import gw

__all__ = ["gw"]

PAUSE = 3.0  # the suite's pause_after
DATE_FIELDS = frozenset({"date", "expires", "last-modified", "if-modified-since"})
Value = str | int  # int: an HTTP-date that many seconds from the origin's now


@dataclass
class Step:
    """One request of a test and the origin's scripted answer to it (the suite's fields)."""

    res: Sequence[tuple[str, Value]] = ()  # response_headers
    req: Sequence[tuple[str, Value]] = ()  # request_headers
    status: int = 200  # response_status
    method: str = "GET"
    body: str | None = None  # response_body; None: the test id
    pause: bool = False  # pause_after
    expect: str | None = None  # cached, not_cached, etag_validated, lm_validated
    expect_status: int | None = None
    expect_headers: Sequence[tuple[str, Value]] = ()
    expect_missing: Sequence[str] = ()
    expect_request_headers: Sequence[tuple[str, str]] = ()
    age_above: int | None = None
    filename: str = ""
    query: str = ""
    magic_ims: bool = False  # If-Modified-Since relative to the previous answer's Server-Now
    magic_locations: bool = False  # Location / Content-Location made absolute paths
    disconnect: bool = False
    check_body: bool = True


class Clock:
    """Wall-clock epoch seconds that a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset


@dataclass
class Seen:
    number: int
    method: str
    headers: CIMultiDict[str]


@dataclass
class SuiteOrigin:
    """The suite's server: answers request n of a test with step n's script."""

    clock: Clock
    steps: dict[str, list[Step]] = field(default_factory=dict)
    seen: dict[str, list[Seen]] = field(default_factory=dict)
    validators: dict[str, dict[str, str]] = field(default_factory=dict)  # last ones sent

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        parts = request.path.split("/")
        test_id, base = parts[2], "/".join(parts[:3])
        seen = self.seen.setdefault(test_id, [])
        number = len(seen) + 1
        client_number = int(request.headers.get("Req-Num", "0"))
        steps = self.steps[test_id]
        step = steps[(client_number or number) - 1]
        seen.append(Seen(client_number, request.method, CIMultiDict(request.headers)))
        now = self.clock.time()
        status = step.status
        sent = self.validators.setdefault(test_id, {})
        if step.expect in ("etag_validated", "lm_validated"):
            lm, etag = sent.get("last-modified"), sent.get("etag")
            ims = request.headers.get("If-Modified-Since")
            inm = request.headers.get("If-None-Match")
            status = 304 if (lm and ims == lm) or (etag and inm == etag) else 999
        sent.clear()
        headers: CIMultiDict[str] = CIMultiDict()
        headers["Server-Base-Url"] = base
        headers["Server-Request-Count"] = str(number)
        headers["Client-Request-Count"] = str(client_number)
        headers["Server-Now"] = repr(now)
        for name, value in step.res:
            text = _date(value, now) if name.lower() in DATE_FIELDS else str(value)
            if step.magic_locations and name.lower() in ("location", "content-location"):
                text = f"{base}/{text}" if text else base
            headers.add(name, text)
            if name.lower() in ("last-modified", "etag"):
                sent[name.lower()] = text
        headers.setdefault("Content-Type", "text/plain")
        headers["Request-Numbers"] = " ".join(str(s.number) for s in seen)
        if step.disconnect:
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        body = b"" if status in (204, 304) else (step.body or test_id).encode()
        return web.Response(status=status, body=body, headers=headers)


def _date(value: Value, now: float) -> str:
    return format_http_date(now + value) if isinstance(value, int) else value


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(gateway.cache, "time", SimpleNamespace(time=c.time))
    return c


@pytest.fixture
async def origin(aiohttp_raw_server: Any, clock: Clock) -> tuple[SuiteOrigin, Any]:
    o = SuiteOrigin(clock)
    server = await aiohttp_raw_server(o.handle)
    return o, server


async def run(base: str, o: SuiteOrigin, test_id: str, steps: Sequence[Step]) -> None:
    """Play ``steps`` through the gateway and check every answer as the suite does."""
    o.steps[test_id] = list(steps)
    previous: dict[str, str] = {}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as s:
        for number, step in enumerate(steps, 1):
            headers: list[tuple[str, str]] = [
                ("Pragma", "foo"),
                ("Cache-Control", "nothing-to-see-here"),
            ]
            for name, value in step.req:
                if step.magic_ims and name.lower() == "if-modified-since":
                    assert isinstance(value, int)
                    value = format_http_date(float(previous["Server-Now"]) + value)
                headers.append((name, str(value)))
            headers += [("Test-ID", test_id), ("Req-Num", str(number))]
            path = f"/test/{test_id}" + (f"/{step.filename}" if step.filename else "")
            url = f"{base}{path}" + (f"?{step.query}" if step.query else "")
            data = b"abc" if step.method not in ("GET", "HEAD") else None
            async with s.request(step.method, url, headers=headers, data=data) as r:
                body = await r.read()
                got = r.headers
                status = r.status
            where = f"{test_id} response {number}"
            served_by = int(got.get("Server-Request-Count", "0"))
            if step.expect == "cached":
                assert 0 < served_by < number or status == 304, f"{where} not from cache"
            elif step.expect == "not_cached":
                assert served_by == number, f"{where} came from the cache"
            expected_status = step.expect_status
            if expected_status is None and not step.disconnect:
                expected_status = step.status if step.status not in (304,) else 200
            if expected_status is not None:
                assert status == expected_status, f"{where}: status {status}"
            for name, value in step.expect_headers:
                if isinstance(value, int):
                    value = format_http_date(float(got["Server-Now"]) + value)
                assert got.get(name) == value, f"{where}: {name} is {got.get(name)!r}"
            for name in step.expect_missing:
                assert name not in got, f"{where}: unexpected {name}: {got[name]!r}"
            if step.age_above is not None:
                assert int(got["Age"]) > step.age_above, f"{where}: Age {got.get('Age')}"
            has_body = status not in (204, 304) and status < 500 and step.method != "HEAD"
            if step.check_body and has_body and not step.disconnect:
                assert body.decode() == (step.body or test_id), f"{where}: body {body!r}"
            previous = dict(got)
            if step.pause:
                o.clock.offset += PAUSE
    # what the origin saw: validators for the validated steps, expected request fields
    seen = iter(o.seen.get(test_id, []))
    for number, step in enumerate(steps, 1):
        if step.expect == "cached":
            continue
        request = next(seen, None)
        where = f"{test_id} request {number}"
        if step.expect in ("etag_validated", "lm_validated"):
            field_name = "If-None-Match" if step.expect == "etag_validated" else "If-Modified-Since"
            assert request is not None, f"{where}: not sent"
            assert field_name in request.headers, f"{where}: not conditional"
        for name, value in step.expect_request_headers:
            assert request is not None, f"{where}: not sent"
            assert request.headers.get(name) == value, where


# --- the suite's tests, by file ----------------------------------------------------------

CASES: dict[str, list[Step]] = {}


def case(test_id: str, *steps: Step) -> None:
    CASES[test_id] = list(steps)


def setup(*res: tuple[str, Value], **kw: Any) -> Step:
    """A setup step: the first answer, usually followed by the suite's 3 s pause."""
    kw.setdefault("pause", True)
    return Step(res=res, **kw)


FRESH = (("Cache-Control", "max-age=100000"), ("Date", 0))  # templates.fresh
STALE = (("Expires", -5000), ("Last-Modified", -100000), ("Date", 0))  # templates.stale
BECOME_STALE = (("Cache-Control", "max-age=2"), ("Date", 0), ("Template-A", "1"))
CACHED, NOT_CACHED = Step(expect="cached"), Step(expect="not_cached")

# cc-freshness.mjs
case("freshness-max-age-stale", setup(*BECOME_STALE), NOT_CACHED)
case("freshness-max-age-0", setup(("Cache-Control", "max-age=0")), NOT_CACHED)
case(
    "freshness-max-age-age",
    setup(("Date", 0), ("Cache-Control", "max-age=3600"), ("Age", "7200")),
    NOT_CACHED,
)
case(
    "freshness-max-age-0-expires",
    setup(("Expires", 3600), ("Cache-Control", "max-age=0"), ("Date", 0)),
    NOT_CACHED,
)
case("freshness-max-age-negative", setup(("Cache-Control", "max-age=-3600")), NOT_CACHED)
case("freshness-s-maxage-shared", setup(("Cache-Control", "s-maxage=3600")), CACHED)
case(
    "freshness-max-age-s-maxage-shared-longer",
    setup(("Cache-Control", "max-age=3600, s-maxage=1")),
    NOT_CACHED,
)
case(
    "freshness-max-age-s-maxage-shared-longer-reversed",
    setup(("Cache-Control", "s-maxage=1, max-age=3600")),
    NOT_CACHED,
)
case(
    "freshness-max-age-s-maxage-shared-longer-multiple",
    setup(("Cache-Control", "max-age=3600"), ("Cache-Control", "s-maxage=1")),
    NOT_CACHED,
)

# cc-parse.mjs
case(
    "freshness-max-age-ignore-quoted",
    setup(("Cache-Control", 'extension="max-age=3600", max-age=1')),
    NOT_CACHED,
)
case(
    "freshness-max-age-ignore-quoted-rev",
    setup(("Cache-Control", 'max-age=1, extension="max-age=3600"')),
    NOT_CACHED,
)
case("freshness-max-age-leading-zero", setup(("Cache-Control", "max-age=003600")), CACHED)
case("freshness-max-age-single-quoted", setup(("Cache-Control", "max-age='3600'")), NOT_CACHED)

# age-parse.mjs: Date now, max-age=3600 (10000 for dup-old), then the Age lines given
AGE_CASES = {
    "age-parse-nonnumeric": (["abc"], True),
    "age-parse-negative": (["-7200"], True),
    "age-parse-float": (["7200.0"], True),
    "age-parse-large-minus-one": (["2147483647"], False),
    "age-parse-large": (["2147483648"], False),
    "age-parse-larger": (["2147483649"], False),
    "age-parse-suffix": (["7200, 0"], False),
    "age-parse-prefix": (["0, 7200"], True),
    "age-parse-suffix-twoline": (["7200", "0"], False),
    "age-parse-prefix-twoline": (["0", "7200"], True),
    "age-parse-dup-0": (["0, 0"], True),
    "age-parse-dup-0-twoline": (["0", "0"], True),
    "age-parse-dup-old": (["3600", "3600"], True),
}
for _id, (_ages, _fresh) in AGE_CASES.items():
    _max_age = "max-age=10000" if _id == "age-parse-dup-old" else "max-age=3600"
    case(
        _id,
        setup(("Date", 0), ("Cache-Control", _max_age), *(("Age", a) for a in _ages)),
        CACHED if _fresh else NOT_CACHED,
    )

# expires-freshness.mjs
case("freshness-expires-past", setup(("Expires", -30 * 86400), ("Date", 0)), NOT_CACHED)
case("freshness-expires-present", setup(("Expires", 0), ("Date", 0), pause=False), NOT_CACHED)
case("freshness-expires-old-date", setup(("Expires", 300), ("Date", 400)), NOT_CACHED)
case("freshness-expires-invalid", setup(("Expires", "0"), ("Date", 0)), NOT_CACHED)
case(
    "freshness-expires-age-slow-date",
    setup(("Date", -10), ("Expires", 10), ("Age", "25"), pause=False),
    NOT_CACHED,
)
case(
    "freshness-expires-age-fast-date",
    setup(("Date", 10), ("Expires", 20), ("Age", "15"), pause=False),
    NOT_CACHED,
)
case("freshness-expires-invalid-date", setup(("Date", "foo"), ("Expires", 10), pause=False), CACHED)

# expires-parse.mjs: invalid dates are "already expired" (RFC 9111 §5.3)
for _id, _value in {
    "freshness-expires-invalid-utc": "Thu, 18 Aug 2050 02:01:18 UTC",
    "freshness-expires-invalid-aest": "Thu, 18 Aug 2050 02:01:18 AEST",
    "freshness-expires-invalid-2-digit-year": "Thu, 18 Aug 50 02:01:18 GMT",
    "freshness-expires-invalid-no-comma": "Thu 18 Aug 2050 02:01:18 GMT",
    "freshness-expires-invalid-multiple-spaces": "Thu, 18  Aug  2050 02:01:18 GMT",
    "freshness-expires-invalid-date-dashes": "Thu, 18-Aug-2050 02:01:18 GMT",
    "freshness-expires-invalid-time-periods": "Thu, 18 Aug 2050 02.01.18 GMT",
    "freshness-expires-invalid-1-digit-hour": "Thu, 18 Aug 2050 2:01:18 GMT",
}.items():
    case(_id, setup(("Expires", _value), ("Date", 0)), NOT_CACHED)
case(
    "freshness-expires-invalid-multiple-lines",
    setup(
        ("Expires", "Thu, 18 Aug 2050 2:01:18 GMT"),
        ("Expires", "Thu, 18 Aug 2050 2:01:19 GMT"),
        ("Date", 0),
        pause=False,
    ),
    NOT_CACHED,
)
# optimal, not met: §4.2 says a cache SHOULD match dates case-insensitively, but
# parse_http_date is strict (RFC 9110 §5.6.7; test_httpcache pins it). Stored, not reused.
for _id, _value in {
    "freshness-expires-wrong-case-weekday": "THU, 18 Aug 2050 02:01:18 GMT",
    "freshness-expires-wrong-case-month": "Thu, 18 AUG 2050 02:01:18 GMT",
    "freshness-expires-wrong-case-tz": "Thu, 18 Aug 2050 02:01:18 gMT",
}.items():
    case(_id, setup(("Expires", _value), ("Date", 0)), NOT_CACHED)

# cc-response.mjs
case(
    "cc-resp-private-shared",
    setup(("Cache-Control", "private, max-age=3600"), pause=False),
    NOT_CACHED,
)
case("cc-resp-no-store", setup(("Cache-Control", "no-store"), pause=False), NOT_CACHED)
case(
    "cc-resp-no-store-case-insensitive",
    setup(("Cache-Control", "No-StOrE"), pause=False),
    NOT_CACHED,
)
case(
    "cc-resp-no-store-fresh",
    setup(("Cache-Control", "max-age=10000, no-store"), ("Expires", 10000), ("Date", 0)),
    NOT_CACHED,
)
for _id, _cc in {
    "cc-resp-no-store-old-new": "no-store",
    "cc-resp-no-store-old-max-age": "no-store, max-age=0",
}.items():
    case(
        _id,
        setup(("Cache-Control", "max-age=10000"), ("Expires", 10000), ("Date", 0), ("A", "1")),
        setup(("Cache-Control", _cc), ("Date", 0), ("A", "2")),
        Step(expect="cached", expect_headers=[("A", "1")]),
    )
for _id, _cc in {
    "cc-resp-no-cache": "max-age=10000, no-cache",
    "cc-resp-no-cache-case-insensitive": "max-age=10000, No-CaChE",
}.items():
    case(
        _id,
        setup(("Cache-Control", _cc), ("Expires", 10000), ("Date", 0), pause=False),
        NOT_CACHED,
    )
_MUST_REVALIDATE = (("Cache-Control", "max-age=2, must-revalidate"), ("ETag", '"abcd"'))
case(
    "cc-resp-must-revalidate-stale",
    setup(*_MUST_REVALIDATE, pause=False),
    Step(res=_MUST_REVALIDATE, expect="cached", pause=True),
    Step(expect="etag_validated"),
)

# heuristic-freshness.mjs: statuses that are not heuristically cacheable
for _code in (201, 202, 403, 502, 503, 504, 599):
    case(
        f"heuristic-{_code}-not_cached",
        setup(("Last-Modified", -86400), ("Date", 0), status=_code, body="x", pause=False),
        Step(expect="not_cached", status=_code, body="x"),
    )

# status.mjs: a stale answer of any status is not reused
for _code in (200, 203, 204, 299, 301, 302, 303, 307, 308, 400, 404, 410, 499, 500, 502, 503):
    _body = "" if _code == 204 else f"status {_code}"
    case(
        f"status-{_code}-stale",
        setup(*STALE, status=_code, body=_body),
        Step(expect="not_cached", status=_code, body=_body),
    )
case(
    "status-599-must-understand",
    setup(("Cache-Control", "max-age=3600, no-store, must-understand"), status=599, pause=False),
    Step(expect="not_cached"),
)

# vary.mjs, vary-parse.mjs
_VARY = (("Cache-Control", "max-age=5000"), ("Last-Modified", -3000), ("Date", 0))


def vary_setup(vary: str, req: Sequence[tuple[str, Value]]) -> Step:
    return Step(res=(*_VARY, ("Vary", vary)), req=req)


case(
    "vary-no-match",
    vary_setup("Foo", [("Foo", "1")]),
    Step(req=[("Foo", "2")], expect="not_cached"),
)
case("vary-omit-stored", vary_setup("Foo", []), Step(req=[("Foo", "1")], expect="not_cached"))
case("vary-omit", vary_setup("Foo", [("Foo", "1")]), NOT_CACHED)
_FOO_BAR = [("Foo", "1"), ("Bar", "abc")]
case(
    "vary-2-no-match",
    vary_setup("Foo, Bar", _FOO_BAR),
    Step(req=[("Foo", "2"), ("Bar", "abc")], expect="not_cached"),
)
case("vary-2-match-omit", vary_setup("Foo, Bar", _FOO_BAR), NOT_CACHED)
_FOO_BAR_BAZ = [("Foo", "1"), ("Bar", "abc"), ("Baz", "789")]
case(
    "vary-3-no-match",
    vary_setup("Foo, Bar, Baz", _FOO_BAR_BAZ),
    Step(req=[("Foo", "2"), ("Bar", "abc"), ("Baz", "789")], expect="not_cached"),
)
case(
    "vary-3-order",
    vary_setup("Foo, Bar, Baz", _FOO_BAR_BAZ),
    Step(req=[("Foo", "1"), ("Baz", "789"), ("Bar", "abcde")], expect="not_cached"),
)
_FOO_BAZ = [("Foo", "1"), ("Baz", "789")]
for _id, _lines in {
    "vary-star": ["*"],
    "vary-syntax-star": ["*"],
    "vary-syntax-star-star": ["*, *"],
    "vary-syntax-star-star-lines": ["*", "*"],
    "vary-syntax-empty-star": [", *"],
    "vary-syntax-empty-star-lines": ["", "*"],
    "vary-syntax-star-foo": ["*, Foo"],
    "vary-syntax-foo-star": ["Foo, *"],
}.items():
    case(
        _id,
        Step(res=(*_VARY, *(("Vary", v) for v in _lines)), req=_FOO_BAZ),
        Step(req=_FOO_BAZ, expect="not_cached"),
    )

# conditional-etag.mjs: a fresh stored answer answers the client's own validation (§4.3.2)
case(
    "conditional-304-etag",
    setup(*FRESH, ("ETag", '"abcdef"')),
    Step(
        req=[("If-None-Match", '"abcdef"')],
        expect="cached",
        expect_status=304,
        expect_headers=[("ETag", '"abcdef"')],
    ),
)
case(
    "conditional-etag-precedence",
    setup(*FRESH, ("Last-Modified", -5000), ("ETag", '"abcdef"')),
    Step(
        req=[("If-None-Match", '"abcdef"'), ("If-Modified-Since", -1)],
        magic_ims=True,
        expect="cached",
        expect_status=304,
    ),
)
case(
    "conditional-etag-vary-headers",
    Step(
        req=[("Abc", "123")],
        res=[("Expires", 1), ("ETag", '"abcdef"'), ("Date", 0), ("Vary", "Abc")],
        pause=True,
    ),
    Step(
        req=[("Abc", "123")],
        expect="etag_validated",
        expect_request_headers=[("Abc", "123")],
    ),
)
# optimal ones that the same code answers
case(
    "conditional-etag-strong-respond-multiple-second",
    setup(*FRESH, ("ETag", '"abcdef"')),
    Step(req=[("If-None-Match", '"1234", "abcdef", "5678"')], expect="cached", expect_status=304),
)
case(
    "conditional-etag-weak-respond",
    setup(*FRESH, ("ETag", 'W/"abcdef"')),
    Step(req=[("If-None-Match", 'W/"abcdef"')], expect="cached", expect_status=304),
)
case(
    "conditional-lm-fresh-earlier",
    setup(("Cache-Control", "max-age=100000"), ("Last-Modified", -3000), ("Date", 0)),
    Step(req=[("If-Modified-Since", -2000)], magic_ims=True, expect="cached", expect_status=304),
)
case(
    "conditional-lm-stale",
    setup(("Cache-Control", "max-age=2"), ("Last-Modified", -3000), ("Date", 0)),
    Step(
        req=[("If-Modified-Since", -3000)],
        magic_ims=True,
        expect="lm_validated",
        expect_status=304,
    ),
)

# headers.mjs
case(
    "headers-omit-headers-listed-in-Connection",
    setup(*FRESH, ("Connection", "a, b"), ("a", "1"), ("b", "2"), ("c", "3")),
    Step(expect="cached", expect_headers=[("c", "3")], expect_missing=["a", "b"]),
)
STORED_FIELDS = {
    "Test-Header": "tHVaX3Wt",
    "X-Test-Header": "abxGBk",
    "Content-Foo": "cfoo",
    "X-Content-Foo": "xcfoo",
    "Content-Encoding": "qxzz",
    "Content-Location": "/bar",
    "Content-MD5": "N7UdGUp1E+RbVvZSTy1R8g==",
    "Content-Range": "crange",
    "Content-Security-Policy": "default-src 'self' cdn.example.com",
    "Content-Type": "text/plain;charset=utf-8",
    "Clear-Site-Data": "cookies",
    "ETag": '"ghijkl"',
    "Expires": "Mon, 11 Jan 2038 11:11:11 GMT",
    "Public-Key-Pins": "pkp",
    "Set-Cookie": "a=c",
    "Set-Cookie2": "a=c",
    "X-Frame-Options": "sameorigin",
    "X-XSS-Protection": "1; mode=block",
}
for _name, _value in STORED_FIELDS.items():
    case(
        f"headers-store-{_name}",
        setup(("Date", 0), (_name, _value), ("Cache-Control", "max-age=3600")),
        Step(expect="cached", expect_headers=[(_name, _value)]),
    )
case(
    "headers-store-Cache-Control",
    setup(("Date", 0), ("Cache-Control", "max-age=3600")),
    Step(expect="cached", expect_headers=[("Cache-Control", "max-age=3600")]),
)
case(
    "headers-store-Content-Length",
    setup(
        ("Date", 0), ("Content-Length", "10"), ("Cache-Control", "max-age=3600"), body="0123456789"
    ),
    Step(expect="cached", expect_headers=[("Content-Length", "10")], body="0123456789"),
)
for _name in (
    "Keep-Alive",
    "Proxy-Authenticate",
    "Proxy-Authentication-Info",
    "Proxy-Authorization",
    "Proxy-Connection",
    "TE",
    "Upgrade",
):
    case(
        f"headers-store-{_name}",
        setup(("Date", 0), (_name, "hop"), ("Cache-Control", "max-age=3600")),
        Step(expect="cached", expect_missing=[_name]),
    )

# update304.mjs: fields of a 304 replace the stored ones, except Content-Length (§3.2)
_LM1 = "Wed, 01 Jan 2020 00:00:00 GMT"
case(
    "304-lm-use-stored-Test-Header",
    setup(
        ("Cache-Control", "max-age=2"), ("Last-Modified", _LM1), ("Date", 0), ("Test-Header", "A")
    ),
    Step(
        res=[("Last-Modified", _LM1), ("Date", 0)],
        expect="lm_validated",
        expect_headers=[("Test-Header", "A")],
    ),
)


def update304(name: str, a: str, b: str, expected: str, body: str | None = None) -> list[Step]:
    def answer(value: str, validator: bool = True) -> list[tuple[str, Value]]:
        out: list[tuple[str, Value]] = [("Date", 0), (name, value)]
        if name != "Cache-Control":
            out.append(("Cache-Control", "max-age=2"))
        if validator:
            out.append(("ETag", '"etag-1"'))
        return out

    return [
        Step(res=answer(a), pause=True, body=body),
        Step(res=answer(b), expect="etag_validated", expect_headers=[(name, expected)], body=body),
        Step(
            res=answer(expected, False),
            expect="cached",
            expect_headers=[(name, expected)],
            body=body,
        ),
    ]


for _name in ("Test-Header", "X-Test-Header", "Content-Foo", "X-Content-Foo"):
    case(f"304-etag-update-response-{_name}", *update304(_name, "value-A", "value-B", "value-B"))
case(
    "304-etag-update-response-Cache-Control",
    *update304("Cache-Control", "max-age=1", "max-age=3600", "max-age=3600"),
)
case(
    "304-etag-update-response-Content-Length",
    *update304("Content-Length", "5", "10", "5", body="01234"),
)

# invalidation.mjs
for _method in ("POST", "PUT", "DELETE", "M-SEARCH"):
    case(f"invalidate-{_method}", setup(*FRESH), Step(method=_method), NOT_CACHED)
    case(
        f"invalidate-{_method}-failed",
        setup(*FRESH),
        Step(method=_method, status=500),
        CACHED,
    )
    case(
        f"invalidate-{_method}-location",
        setup(*FRESH, filename="location_target"),
        Step(
            method=_method,
            res=[("Location", "location_target"), ("Content-Location", "content_location_target")],
            magic_locations=True,
        ),
        Step(expect="not_cached", filename="location_target", res=FRESH),
    )
    case(
        f"invalidate-{_method}-cl",
        setup(*FRESH, filename="content_location_target"),
        Step(
            method=_method,
            res=[("Location", "location_target"), ("Content-Location", "content_location_target")],
            magic_locations=True,
        ),
        Step(expect="not_cached", filename="content_location_target", res=FRESH),
    )

# partial.mjs: a stored complete answer serves a single byte range (RFC 9110 §14)
_RANGE_SETUP = setup(("Cache-Control", "max-age=3600"), ("A", "1"), body="01234567890", pause=False)
for _id, _range, _text in (
    ("partial-store-complete-reuse-partial", "bytes=0-1", "01"),
    ("partial-store-complete-reuse-partial-no-last", "bytes=1-", "1234567890"),
    ("partial-store-complete-reuse-partial-suffix", "bytes=-1", "0"),
    ("partial-use-stored-headers", "bytes=0-1", "01"),
):
    case(
        _id,
        _RANGE_SETUP,
        Step(
            req=[("Range", _range)],
            expect="cached",
            expect_status=206,
            body=_text,
            expect_headers=[("A", "1")],
        ),
    )

# stale.mjs: stale answers are not served when the origin cannot be reached, if prohibited
_STALE_SWR = (("Cache-Control", "max-age=1, stale-while-revalidate=4"), ("ETag", '"abc"'))
case(
    "stale-while-revalidate-window",
    setup(*_STALE_SWR),
    Step(
        res=[("Cache-Control", "no-cache"), ("ETag", '"def"')],
        expect="cached",
        pause=True,
    ),
    Step(expect_headers=[("Client-Request-Count", "3")]),
)
# ... and are served when it may (RFC 9111 §4.2.4, a disconnected cache; the route's
# stale_if_disconnected, 60 s by default; RFC 5861 stale-if-error)
case("stale-close", setup(*BECOME_STALE), Step(disconnect=True, expect="cached"))
case(
    "stale-sie-close",
    setup(("Cache-Control", "max-age=2, stale-if-error=60")),
    Step(disconnect=True, expect="cached"),
)
for _cc in ("must-revalidate", "proxy-revalidate", "no-cache", "s-maxage=2"):
    case(
        f"stale-close-{_cc}",
        setup(("Cache-Control", f"max-age=2, {_cc}")),
        Step(disconnect=True, check_body=False, expect_missing=["Server-Request-Count"]),
    )

# other.mjs, authorization.mjs
case("other-age-gen", setup(*FRESH), Step(expect="cached", age_above=2))
case(
    "other-age-update-expires",
    setup(("Expires", 30 * 86400), ("Date", 0), ("Age", "30")),
    Step(expect="cached", age_above=32),
)
case("other-age-update-max-age", setup(*FRESH, ("Age", "30")), Step(expect="cached", age_above=32))
case("other-date-update", setup(*FRESH), Step(expect="cached", expect_headers=[("Date", 0)]))
case(
    "other-date-update-expires",
    setup(("Expires", 30 * 86400), ("Date", 0)),
    Step(expect="cached", expect_headers=[("Date", 0)]),
)
case(
    "query-args-different",
    setup(*FRESH, query="test=one"),
    Step(expect="not_cached", query="test=two"),
)
case(
    "other-authorization",
    setup(
        *FRESH, req=[("Authorization", "FOO")], expect_request_headers=[("Authorization", "FOO")]
    ),
    NOT_CACHED,
)


@pytest.mark.parametrize("test_id", list(CASES))
async def test_cache_tests_suite(test_id: str, gw: str, origin: tuple[SuiteOrigin, Any]) -> None:
    o, _ = origin
    await run(gw, o, test_id, CASES[test_id])


def test_every_case_dates_parse() -> None:
    """The fixed dates above are valid IMF-fixdates (the invalid ones are meant to be)."""
    assert parse_http_date(_LM1) is not None
    assert parse_http_date(STORED_FIELDS["Expires"]) is not None
