"""RFC 9111 shared-cache decisions with plain values: storing, freshness, age, reuse, 304s,
invalidation and Cache-Status. Times are wall-clock epoch seconds around ``T0``."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from multidict import CIMultiDict

from gateway.httpcache import (
    DELTA_MAX,
    CacheControl,
    Decision,
    Fields,
    Outcome,
    StoredResponse,
    cache_status,
    current_age,
    format_http_date,
    freshness_lifetime,
    invalidates,
    is_storable,
    lookup_decision,
    normalise_field_value,
    parse_cache_control,
    parse_http_date,
    request_cache_control,
    stale_if_error_allows,
    storable_headers,
    update_from_304,
    vary_names,
)

T0 = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
Pairs = list[tuple[str, str]]


def date(t: float) -> str:
    return format_http_date(t)


def cc(value: str) -> Pairs:
    return [("Cache-Control", value)]


def store(
    headers: Pairs,
    *,
    status: int = 200,
    request: Pairs | None = None,
    at: float = T0,
    method: str = "GET",
    shared: bool = True,
) -> StoredResponse:
    """A response received at ``at`` (sent at the same instant), stored as the stage would."""
    return StoredResponse.capture(
        method,
        status,
        request or [],
        headers,
        body_length=10,
        request_time=at,
        response_time=at,
        shared=shared,
    )


def test_modules_do_no_io() -> None:
    probe = (
        "import sys; sys.modules['redis'] = None; import gateway.httpcache, gateway.cachekey; "
        "loaded = {'aiohttp', 'redis', 'asyncio', 'maxminddb'} & "
        "{k for k, v in sys.modules.items() if v is not None}; assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)


# --- Cache-Control parsing (§5.2, §4.2.1) --------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["max-age=60"], CacheControl(max_age=60)),
        (["MAX-AGE=60, Public"], CacheControl(max_age=60, public=True)),  # names any case
        (['max-age="60"'], CacheControl(max_age=60)),  # quoted-string form accepted
        (["max-age=abc"], CacheControl(max_age=0)),  # invalid -> stale (§4.2.1)
        (["max-age=-1"], CacheControl(max_age=0)),
        (["max-age=1.5"], CacheControl(max_age=0)),
        (["max-age=60, max-age=60"], CacheControl(max_age=60)),  # same duplicate: fine
        (["max-age=60", "max-age=30"], CacheControl(max_age=0)),  # conflicting -> stale
        (["s-maxage=99999999999999"], CacheControl(s_maxage=DELTA_MAX)),  # §1.2.2 cap
        (
            ['no-cache="Set-Cookie, X-Foo", max-age=5'],
            CacheControl(max_age=5, no_cache_fields=frozenset({"set-cookie", "x-foo"})),
        ),
        (['private, no-cache=""'], CacheControl(private=True, no_cache=True)),
        (
            ['private="X-User"', "private"],
            CacheControl(private=True, private_fields=frozenset({"x-user"})),
        ),
        (["max-stale"], CacheControl(max_stale=math.inf)),
        (["max-stale=10, max-stale"], CacheControl(max_stale=10)),  # most restrictive
        (["max-stale=ten"], CacheControl()),  # invalid: no stale allowance
        (["min-fresh=5, min-fresh=10"], CacheControl(min_fresh=10)),
        (
            ["stale-while-revalidate=30, stale-if-error=60, stale-if-error=90"],
            CacheControl(stale_while_revalidate=30, stale_if_error=60),
        ),
        (["  ,, public ,,must-revalidate ,"], CacheControl(public=True, must_revalidate=True)),
        (['community="UCI", max-age=5'], CacheControl(max_age=5)),  # unknown: ignored (§5.2.3)
        (['ext="a,b\\"c", max-age=7'], CacheControl(max_age=7)),  # commas, escapes in quotes
        (["=junk, no-store"], CacheControl(no_store=True)),
        (['no-cache="Set-Cookie, max-age=5'], CacheControl(no_cache=True, max_age=5)),
        (
            ["proxy-revalidate, must-understand"],
            CacheControl(proxy_revalidate=True, must_understand=True),
        ),
        (["only-if-cached"], CacheControl(only_if_cached=True)),
        ([], CacheControl()),
    ],
)
def test_parse_cache_control(lines: list[str], expected: CacheControl) -> None:
    assert parse_cache_control(lines) == expected


def test_pragma_no_cache_counts_only_without_cache_control() -> None:
    """§5.4: Pragma: no-cache means Cache-Control: no-cache only when that field is absent."""
    assert request_cache_control([("Pragma", "no-cache")]).no_cache
    assert not request_cache_control(
        [("Pragma", "no-cache"), ("Cache-Control", "max-age=5")]
    ).no_cache
    assert request_cache_control(CIMultiDict(pragma="foo, No-Cache")).no_cache


# --- HTTP-date (RFC 9110 §5.6.7) -----------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"],
)
def test_http_date_formats_from_rfc_9110(value: str) -> None:
    assert parse_http_date(value) == 784111777.0


@pytest.mark.parametrize(
    "value",
    [
        "0",
        "-1",
        "",
        "Sun, 06 Nov 1994 08:49:37 PST",
        "Sun, 31 Feb 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 25:49:37 GMT",
        "sun, 06 nov 1994 08:49:37 gmt",
    ],
)
def test_invalid_http_dates(value: str) -> None:
    assert parse_http_date(value) is None


def test_format_http_date_round_trips() -> None:
    assert date(784111777) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert parse_http_date(date(T0)) == T0


# --- Storability (§3) ----------------------------------------------------------------------

AUTH = [("Authorization", "Bearer k")]


@pytest.mark.parametrize(
    ("method", "status", "req", "response", "shared", "expected"),
    [
        pytest.param("GET", 200, [], [], True, True, id="200-heuristic"),
        pytest.param("HEAD", 200, [], [], True, True, id="head"),
        pytest.param("POST", 200, [], cc("max-age=60"), True, False, id="post"),
        pytest.param("GET", 206, [], cc("max-age=60"), True, False, id="206-partial"),
        pytest.param("GET", 304, [], cc("max-age=60"), True, False, id="304"),
        pytest.param("GET", 299, [], cc("max-age=60"), True, False, id="299-unknown"),
        pytest.param("GET", 302, [], [], True, False, id="302-no-freshness"),
        pytest.param("GET", 302, [], cc("max-age=60"), True, True, id="302-max-age"),
        pytest.param("GET", 201, [], [], True, False, id="201-not-heuristic"),
        pytest.param("GET", 201, [], [("Expires", date(T0 + 60))], True, True, id="201-expires"),
        pytest.param("GET", 201, [], cc("public"), True, True, id="201-public"),
        pytest.param("GET", 404, [], [], True, True, id="404-heuristic"),
        pytest.param("GET", 410, [], [], True, True, id="410-heuristic"),
        pytest.param("GET", 500, [], [], True, False, id="500"),
        pytest.param("GET", 503, [], cc("max-age=5"), True, True, id="503-max-age"),
        pytest.param("GET", 200, [], cc("no-store"), True, False, id="no-store"),
        pytest.param("GET", 200, cc("no-store"), [], True, False, id="req-no-store"),
        pytest.param(
            "GET",
            200,
            [],
            cc("no-store, must-understand"),
            True,
            True,
            id="must-understand-overrides-no-store",
        ),
        pytest.param("GET", 200, [], [("cache-control", "Private")], True, False, id="private"),
        pytest.param("GET", 200, [], cc("private"), False, True, id="private-own"),
        pytest.param(
            "GET", 200, [], cc('private="Set-Cookie"'), True, True, id="private-qualified"
        ),
        pytest.param("GET", 200, AUTH, [], True, False, id="auth"),
        pytest.param("GET", 200, AUTH, cc("max-age=60"), True, False, id="auth-max-age"),
        pytest.param("GET", 200, AUTH, cc("public"), True, True, id="auth-public"),
        pytest.param("GET", 200, AUTH, cc("s-maxage=5"), True, True, id="auth-s-maxage"),
        pytest.param(
            "GET", 200, AUTH, cc("must-revalidate"), True, True, id="auth-must-revalidate"
        ),
        pytest.param("GET", 200, AUTH, [], False, True, id="auth-private-cache"),
        pytest.param("GET", 302, [], cc("s-maxage=5"), True, True, id="s-maxage"),
        pytest.param("GET", 302, [], cc("s-maxage=5"), False, False, id="s-maxage-own"),
        pytest.param("GET", 200, [], [("Vary", "Accept-Encoding")], True, True, id="vary"),
        pytest.param(
            "GET", 200, [], [("Vary", "Accept"), ("Vary", "*")], True, False, id="vary-star"
        ),
    ],
)
def test_storability(
    method: str, status: int, req: Pairs, response: Pairs, shared: bool, expected: bool
) -> None:
    assert is_storable(method, status, req, response, shared=shared) is expected


def test_storability_with_multidict_views() -> None:
    assert is_storable("GET", 200, CIMultiDict(), CIMultiDict({"cache-control": "max-age=5"}))
    assert not is_storable("GET", 200, CIMultiDict(AUTH), CIMultiDict())


def test_storable_headers_drop_hop_by_hop_and_named_fields() -> None:
    response = CIMultiDict(
        [
            ("Content-Type", "text/plain"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("Proxy-Authenticate", "x"),
            ("Cache-Control", 'max-age=5, no-cache="Set-Cookie", private="X-User"'),
            ("Set-Cookie", "a=1"),
            ("X-User", "ann"),
            ("Link", "</a>"),
            ("Link", "</b>"),
        ]
    )
    kept = [
        ("Content-Type", "text/plain"),
        ("Cache-Control", 'max-age=5, no-cache="Set-Cookie", private="X-User"'),
    ]
    assert storable_headers(response) == [*kept, ("Link", "</a>"), ("Link", "</b>")]
    # private="..." binds shared caches only (§5.2.2.7)
    assert ("X-User", "ann") in storable_headers(response, shared=False)


# --- Freshness lifetime (§4.2.1, §4.2.2, §5.3) -------------------------------------------------

D = [("Date", date(T0))]


@pytest.mark.parametrize(
    ("status", "headers", "shared", "expected"),
    [
        pytest.param(
            200,
            [*D, ("Cache-Control", "max-age=20, s-maxage=10"), ("Expires", date(T0 + 30))],
            True,
            10,
            id="s-maxage-first",
        ),
        pytest.param(
            200,
            [*D, ("Cache-Control", "max-age=20, s-maxage=10"), ("Expires", date(T0 + 30))],
            False,
            20,
            id="private-cache-ignores-s-maxage",
        ),
        pytest.param(
            200,
            [*D, ("Cache-Control", "max-age=20"), ("Expires", date(T0 + 30))],
            True,
            20,
            id="max-age-beats-expires",
        ),
        pytest.param(
            200,
            [*D, ("Cache-Control", "max-age=x"), ("Expires", date(T0 + 30))],
            True,
            0,
            id="invalid-max-age-stale",
        ),
        pytest.param(200, [*D, ("Expires", date(T0 + 30))], True, 30, id="expires-minus-date"),
        pytest.param(200, [("Expires", date(T0 + 45))], True, 45, id="expires-without-date"),
        pytest.param(200, [*D, ("Expires", date(T0 - 30))], True, 0, id="expires-past"),
        pytest.param(200, [*D, ("Expires", "0")], True, 0, id="expires-0"),
        pytest.param(200, [*D, ("Expires", "tomorrow")], True, 0, id="expires-invalid"),
        pytest.param(
            200,
            [*D, ("Expires", date(T0 + 30)), ("Expires", date(T0 + 90))],
            True,
            0,
            id="expires-conflict",
        ),
        pytest.param(
            200,
            [*D, ("Expires", date(T0 + 30)), ("Expires", date(T0 + 30))],
            True,
            30,
            id="expires-same-twice",
        ),
        pytest.param(200, [*D, ("Last-Modified", date(T0 - 1000))], True, 100, id="heuristic-10pc"),
        pytest.param(404, [*D, ("Last-Modified", date(T0 - 1000))], True, 100, id="heuristic-404"),
        pytest.param(
            200, [*D, ("Last-Modified", date(T0 - 10**8))], True, 86400, id="heuristic-cap"
        ),
        pytest.param(201, [*D, ("Last-Modified", date(T0 - 1000))], True, 0, id="201-no-heuristic"),
        pytest.param(
            201,
            [*D, ("Last-Modified", date(T0 - 1000)), ("Cache-Control", "public")],
            True,
            100,
            id="201-public-heuristic",
        ),
        pytest.param(
            200, [*D, ("Last-Modified", date(T0 + 1000))], True, 0, id="modified-in-future"
        ),
        pytest.param(200, [*D], True, 0, id="nothing"),
        pytest.param(
            200,
            [*D, ("Last-Modified", date(T0 - 1000)), ("Expires", date(T0 + 5))],
            True,
            5,
            id="explicit-beats-heuristic",
        ),
    ],
)
def test_freshness_lifetime(status: int, headers: Pairs, shared: bool, expected: float) -> None:
    assert freshness_lifetime(status, headers, response_time=T0, shared=shared) == expected


def test_heuristic_fraction_and_cap_are_parameters() -> None:
    headers = [*D, ("Last-Modified", date(T0 - 1000))]
    assert freshness_lifetime(200, headers, response_time=T0, heuristic_fraction=0.5) == 500
    assert freshness_lifetime(200, headers, response_time=T0, heuristic_max=60) == 60


# --- Age (§4.2.3) ------------------------------------------------------------------------------


def test_age_worked_example() -> None:
    """Request sent at T0, answer 2 s later; the origin's Date says T0 - 3 (its clock is behind,
    or the answer sat somewhere), and an upstream cache says Age: 10. Then:

    apparent_age = max(0, (T0 + 2) - (T0 - 3)) = 5; response_delay = 2;
    corrected_age_value = 10 + 2 = 12; corrected_initial_age = max(5, 12) = 12;
    30 s later resident_time = 30 and current_age = 42.
    """
    age = current_age(date=T0 - 3, age_value=10, request_time=T0, response_time=T0 + 2, now=T0 + 32)
    assert age == 42
    stored = StoredResponse(
        status=200,
        headers=(("Date", date(T0 - 3)), ("Age", "10"), ("Cache-Control", "max-age=60")),
        body_length=0,
        request_time=T0,
        response_time=T0 + 2,
    )
    assert stored.initial_age == 12
    assert stored.current_age(T0 + 32) == 42
    assert stored.ttl(T0 + 32) == 18


@pytest.mark.parametrize(
    ("date_value", "age_value", "expected"),
    [
        pytest.param(T0 - 20, 0, 20, id="apparent-age-wins"),
        pytest.param(T0 + 50, 0, 1, id="date-in-future: delay only"),
        pytest.param(T0 - 20, 30, 31, id="age-header-wins"),
    ],
)
def test_corrected_initial_age(date_value: float, age_value: float, expected: float) -> None:
    got = current_age(
        date=date_value, age_value=age_value, request_time=T0 - 1, response_time=T0, now=T0
    )
    assert got == expected


def test_invalid_age_header_counts_as_zero_and_missing_date_is_added() -> None:
    stored = store([("Age", "ten"), ("Cache-Control", "max-age=60")], at=T0)
    assert stored.initial_age == 0
    assert ("Date", date(T0)) in stored.headers  # RFC 9110 §6.6.1
    assert stored.current_age(T0 - 5) == 0  # a clock step back does not make it younger


# --- Reuse (§4, §5.2.1) ------------------------------------------------------------------------

ETAG = [("Date", date(T0)), ("ETag", '"v1"')]


def lookup(
    stored: StoredResponse | None, request: Pairs, at: float, method: str = "GET"
) -> Decision:
    return lookup_decision(method, request, stored, at)


FRESH, STALE_OK, SWR = Outcome.FRESH, Outcome.STALE_ALLOWED, Outcome.STALE_WHILE_REVALIDATE
REVALIDATE, ONLY = Outcome.REVALIDATE, Outcome.ONLY_IF_CACHED
SWR60 = "max-age=100, stale-while-revalidate=60"


@pytest.mark.parametrize(
    ("response", "req", "later", "outcome", "fwd"),
    [
        pytest.param("max-age=100", "", 10, FRESH, None, id="fresh"),
        pytest.param("max-age=100", "", 100, REVALIDATE, "stale", id="age==lifetime: stale"),
        pytest.param("max-age=100", "", 150, REVALIDATE, "stale", id="stale"),
        pytest.param("max-age=100", "max-age=0", 10, REVALIDATE, "request", id="req-max-age-0"),
        pytest.param("max-age=100", "no-cache", 10, REVALIDATE, "request", id="req-no-cache"),
        pytest.param("max-age=100", "max-age=5", 10, REVALIDATE, "request", id="req-max-age"),
        pytest.param("max-age=100", "max-age=20", 10, FRESH, None, id="req-max-age-ok"),
        pytest.param("max-age=100", "min-fresh=95", 10, REVALIDATE, "request", id="min-fresh"),
        pytest.param("max-age=100", "min-fresh=80", 10, FRESH, None, id="min-fresh-met"),
        pytest.param("max-age=100", "max-stale", 10**6, STALE_OK, None, id="max-stale"),
        pytest.param("max-age=100", "max-stale=60", 150, STALE_OK, None, id="max-stale-60"),
        pytest.param("max-age=100", "max-stale=10", 150, REVALIDATE, "stale", id="max-stale-10"),
        pytest.param("max-age=100, must-revalidate", "max-stale", 150, REVALIDATE, "stale",
                     id="must-revalidate-blocks-max-stale"),
        pytest.param("max-age=100, proxy-revalidate", "max-stale", 150, REVALIDATE, "stale",
                     id="proxy-revalidate-blocks-max-stale"),
        pytest.param("s-maxage=100", "max-stale", 150, REVALIDATE, "stale",
                     id="s-maxage-implies-proxy-revalidate"),
        pytest.param("max-age=100, no-cache", "", 10, REVALIDATE, "stale", id="res-no-cache"),
        pytest.param('max-age=100, no-cache="Set-Cookie"', "", 10, FRESH, None,
                     id="qualified-no-cache-reusable"),
        pytest.param(SWR60, "", 150, SWR, None, id="swr-within"),
        pytest.param(SWR60, "", 170, REVALIDATE, "stale", id="swr-exceeded"),
        pytest.param(f"{SWR60}, must-revalidate", "", 150, REVALIDATE, "stale", id="swr-must-rev"),
        pytest.param(SWR60, "max-age=0", 150, REVALIDATE, "stale", id="swr-req-max-age"),
        pytest.param("max-age=100", "only-if-cached", 10, FRESH, None, id="only-if-cached-fresh"),
        pytest.param("max-age=100", "only-if-cached", 150, ONLY, "stale", id="oic-stale"),
        pytest.param("max-age=100", "only-if-cached, max-stale", 150, STALE_OK, None,
                     id="only-if-cached-max-stale"),
        pytest.param(SWR60, "only-if-cached", 150, SWR, None, id="only-if-cached-swr"),
    ],
)  # fmt: skip
def test_lookup(response: str, req: str, later: float, outcome: Outcome, fwd: str | None) -> None:
    decision = lookup(store([*ETAG, *cc(response)]), cc(req) if req else [], T0 + later)
    assert decision.outcome is outcome
    assert decision.fwd == fwd
    if outcome.serves_stored:
        assert decision.age == min(later, DELTA_MAX)
        assert decision.ttl == 100 - later
    if outcome in (Outcome.REVALIDATE, Outcome.STALE_WHILE_REVALIDATE):
        assert decision.conditional == (("If-None-Match", '"v1"'),)
    if outcome is Outcome.ONLY_IF_CACHED:
        assert decision.conditional == ()


def test_pragma_no_cache_revalidates() -> None:
    stored = store([*ETAG, *cc("max-age=100")])
    decision = lookup(stored, [("Pragma", "no-cache")], T0 + 10)
    assert (decision.outcome, decision.fwd) == (REVALIDATE, "request")


def test_lookup_without_stored_response_or_with_unsafe_method() -> None:
    assert lookup(None, [], T0).outcome is Outcome.MUST_FORWARD
    assert lookup(None, [], T0).fwd == "uri-miss"
    only = lookup(None, cc("only-if-cached"), T0)
    assert only.outcome is Outcome.ONLY_IF_CACHED  # the caller answers 504
    assert only.ttl is None
    stored = store([*ETAG, ("Cache-Control", "max-age=100")])
    assert lookup(stored, [], T0, method="POST").fwd == "method"


def test_stale_without_validator_must_forward() -> None:
    decision = lookup(store(cc("max-age=100")), [], T0 + 150)
    assert decision.outcome is Outcome.MUST_FORWARD
    assert (decision.fwd, decision.conditional) == ("stale", ())


def test_conditional_headers_from_etag_and_last_modified() -> None:
    """§4.3.1: entity tag -> If-None-Match (MUST); Last-Modified -> If-Modified-Since."""
    lm = date(T0 - 3600)
    only_lm = store([("Cache-Control", "max-age=1"), ("Last-Modified", lm)])
    assert lookup(only_lm, [], T0 + 5).conditional == (("If-Modified-Since", lm),)
    both = store([("Cache-Control", "max-age=1"), ("ETag", 'W/"x"'), ("Last-Modified", lm)])
    assert lookup(both, [], T0 + 5).conditional == (
        ("If-None-Match", 'W/"x"'),
        ("If-Modified-Since", lm),
    )


def test_proxy_revalidate_binds_shared_caches_only() -> None:
    response = [*ETAG, ("Cache-Control", "max-age=100, proxy-revalidate")]
    request = cc("max-stale")
    assert lookup(store(response, shared=False), request, T0 + 150).outcome is Outcome.STALE_ALLOWED


def test_head_is_answered_by_stored_get_but_not_the_reverse() -> None:
    get = store([*ETAG, ("Cache-Control", "max-age=100")])
    assert lookup(get, [], T0 + 1, method="HEAD").outcome is Outcome.FRESH
    head = store([*ETAG, ("Cache-Control", "max-age=100")], method="HEAD")
    assert lookup(head, [], T0 + 1, method="GET").outcome is Outcome.MUST_FORWARD


# --- Vary (§4.1) -------------------------------------------------------------------------------


def test_vary_names_from_every_line_lower_case_sorted() -> None:
    assert vary_names([("Vary", "Accept-Encoding"), ("vary", "X-Foo, accept-language")]) == (
        "accept-encoding",
        "accept-language",
        "x-foo",
    )
    assert vary_names([("Vary", "Accept, *")]) is None
    assert vary_names([]) == ()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["en-US,  en;q=0.5"], "en-US,en;q=0.5"),
        (["en-US ,en;q=0.5 "], "en-US,en;q=0.5"),
        (["en-US", "en;q=0.5"], "en-US,en;q=0.5"),  # lines combined (RFC 9110 §5.2)
        (["a\t b"], "a b"),
        ([""], ""),
        ([], None),
    ],
)
def test_normalise_field_value(values: list[str], expected: str | None) -> None:
    assert normalise_field_value(values) == expected


VARIED = [
    *ETAG,
    ("Cache-Control", "max-age=100"),
    ("Vary", "Accept-Encoding"),
    ("Vary", "Accept-Language"),
]
FIRST = [("Accept-Encoding", "gzip, br"), ("Accept-Language", "de")]


@pytest.mark.parametrize(
    ("req", "matches"),
    [
        pytest.param(FIRST, True, id="same"),
        pytest.param(
            [("accept-encoding", "gzip,br"), ("ACCEPT-LANGUAGE", "de")], True, id="ws-case"
        ),
        pytest.param(
            [("Accept-Encoding", "gzip"), ("Accept-Encoding", "br"), ("Accept-Language", "de")],
            True,
            id="two-lines",
        ),
        pytest.param(
            [("Accept-Encoding", "br, gzip"), ("Accept-Language", "de")], False, id="order"
        ),
        pytest.param(
            [("Accept-Encoding", "GZIP, br"), ("Accept-Language", "de")], False, id="value-case"
        ),
        pytest.param([("Accept-Encoding", "gzip, br")], False, id="absent"),
        pytest.param([("Accept-Encoding", "gzip, br"), ("Accept-Language", "")], False, id="empty"),
        pytest.param(
            [("Accept-Encoding", "gzip, br"), ("Accept-Language", "fr")], False, id="other"
        ),
    ],
)
def test_vary_matching(req: Pairs, matches: bool) -> None:
    stored = store(VARIED, request=FIRST)
    assert stored.vary == (("accept-encoding", "gzip,br"), ("accept-language", "de"))
    decision = lookup(stored, req, T0 + 1)
    assert decision.outcome is (Outcome.FRESH if matches else Outcome.VARY_MISMATCH)
    assert decision.fwd == (None if matches else "vary-miss")


def test_absent_field_matches_absent() -> None:
    stored = store(VARIED, request=[])
    assert stored.vary_matches(CIMultiDict())
    assert not stored.vary_matches(CIMultiDict({"Accept-Language": "de"}))


def test_vary_star_is_never_stored() -> None:
    with pytest.raises(ValueError, match=r"Vary: \*"):
        store([("Vary", "*")])


# --- stale-if-error (RFC 5861 §4, RFC 9111 §4.2.4) -------------------------------------------


@pytest.mark.parametrize(
    ("response", "req", "later", "allowed"),
    [
        pytest.param("max-age=100, stale-if-error=60", None, 150, True, id="within"),
        pytest.param("max-age=100, stale-if-error=60", None, 170, False, id="beyond"),
        pytest.param(
            "max-age=100, stale-if-error=60", "stale-if-error=10", 150, False, id="req-narrows"
        ),
        pytest.param("max-age=100", "stale-if-error=100", 150, True, id="req-grants"),
        pytest.param("max-age=100", None, 150, False, id="no-window"),
        pytest.param(
            "max-age=100, stale-if-error=60, must-revalidate", None, 150, False, id="must-reval"
        ),
        pytest.param(
            "max-age=100, stale-if-error=60, proxy-revalidate", None, 150, False, id="proxy-reval"
        ),
        pytest.param("s-maxage=100, stale-if-error=60", None, 150, False, id="s-maxage"),
        pytest.param("max-age=100, stale-if-error=60, no-cache", None, 150, False, id="no-cache"),
        pytest.param("max-age=100, stale-if-error=60", "no-cache", 150, False, id="req-no-cache"),
    ],
)
def test_stale_if_error(response: str, req: str | None, later: float, allowed: bool) -> None:
    stored = store([("Cache-Control", response)])
    request_cc = None if req is None else request_cache_control([("Cache-Control", req)])
    assert stale_if_error_allows(stored, T0 + later, request_cc) is allowed


@pytest.mark.parametrize(
    ("response", "req", "later", "window", "allowed"),
    [
        pytest.param("max-age=100", None, 150, 60.0, True, id="within"),
        pytest.param("max-age=100", None, 161, 60.0, False, id="past-window"),
        pytest.param("max-age=100", None, 150, 0.0, False, id="no-window"),
        pytest.param("max-age=100, stale-if-error=90", None, 185, 60.0, True, id="sie-wider"),
        pytest.param("max-age=100", "stale-if-error=10", 150, 60.0, False, id="req-narrows"),
        pytest.param("max-age=100, must-revalidate", None, 150, 60.0, False, id="must-reval"),
        pytest.param("max-age=100, proxy-revalidate", None, 150, 60.0, False, id="proxy-reval"),
        pytest.param("s-maxage=100", None, 150, 60.0, False, id="s-maxage"),
        pytest.param("max-age=100, no-cache", None, 150, 60.0, False, id="no-cache"),
        pytest.param("max-age=100", "no-cache", 150, 60.0, False, id="req-no-cache"),
    ],
)
def test_stale_if_disconnected(
    response: str, req: str | None, later: float, window: float, allowed: bool
) -> None:
    """RFC 9111 §4.2.4: a disconnected cache may serve stale, within the route's bound."""
    stored = store([("Cache-Control", response)])
    request_cc = None if req is None else request_cache_control([("Cache-Control", req)])
    got = stale_if_error_allows(stored, T0 + later, request_cc, disconnected_window=window)
    assert got is allowed


# --- 304 (§4.3.4, §3.2) ------------------------------------------------------------------------


def test_update_from_304_replaces_fields_but_keeps_content_length() -> None:
    stored = [
        ("Content-Length", "10"),
        ("ETag", '"v1"'),
        ("Cache-Control", "max-age=10"),
        ("Date", date(T0)),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-Keep", "yes"),
    ]
    not_modified = CIMultiDict(
        [
            ("Cache-Control", "max-age=60"),
            ("Date", date(T0 + 500)),
            ("Content-Length", "0"),
            ("Connection", "X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Set-Cookie", "c=3"),
        ]
    )
    assert update_from_304(stored, not_modified) == [
        ("Content-Length", "10"),
        ("ETag", '"v1"'),
        ("X-Keep", "yes"),
        ("Cache-Control", "max-age=60"),
        ("Date", date(T0 + 500)),
        ("Set-Cookie", "c=3"),
    ]


def test_freshened_by_304_is_fresh_again() -> None:
    stored = store([*ETAG, ("Cache-Control", "max-age=100")])
    assert lookup(stored, [], T0 + 150).outcome is Outcome.REVALIDATE
    headers = [("ETag", '"v1"'), ("Date", date(T0 + 150)), ("Cache-Control", "max-age=300")]
    fresh = stored.freshened(headers, request_time=T0 + 150, response_time=T0 + 151)
    assert fresh is not None
    assert fresh.lifetime == 300
    decision = lookup(fresh, [], T0 + 160)
    assert (decision.outcome, decision.age) == (Outcome.FRESH, 10)


def test_304_without_date_or_age_starts_afresh() -> None:
    """A stored Date and Age from the first response would make the freshened one old at once."""
    stored = store([("Date", date(T0 - 50)), ("Age", "80"), *cc("max-age=100"), ("ETag", '"v1"')])
    assert stored.current_age(T0) == 80
    fresh = stored.freshened([("ETag", '"v1"')], request_time=T0 + 200, response_time=T0 + 201)
    assert fresh is not None
    assert fresh.current_age(T0 + 211) == 11  # 1 s response delay + 10 s stored
    assert ("Date", date(T0 + 201)) in fresh.headers
    assert not any(n == "Age" for n, _ in fresh.headers)


@pytest.mark.parametrize(
    ("stored_validators", "not_modified", "identified"),
    [
        pytest.param([("ETag", '"v1"')], [("ETag", '"v1"')], True, id="same-strong"),
        pytest.param([("ETag", '"v1"')], [("ETag", '"v2"')], False, id="other-strong"),
        pytest.param([("ETag", 'W/"v1"')], [("ETag", '"v1"')], False, id="strong-vs-weak"),
        pytest.param([("ETag", '"v1"')], [("ETag", 'W/"v1"')], True, id="weak-matches"),
        pytest.param(
            [("Last-Modified", date(T0))], [("Last-Modified", date(T0))], True, id="same-lm"
        ),
        pytest.param(
            [("Last-Modified", date(T0))], [("Last-Modified", date(T0 - 9))], False, id="lm"
        ),
        pytest.param([("ETag", '"v1"')], [("Date", date(T0))], True, id="no-validator-in-304"),
    ],
)
def test_304_must_identify_the_stored_response(
    stored_validators: Pairs, not_modified: Pairs, identified: bool
) -> None:
    stored = store([("Cache-Control", "max-age=1"), *stored_validators])
    got = stored.freshened(not_modified, request_time=T0 + 9, response_time=T0 + 9)
    assert (got is not None) is identified


# --- Invalidation (§4.4) -----------------------------------------------------------------------

URL = "https://api.example.com/items?page=2"


@pytest.mark.parametrize(
    ("method", "status", "headers", "expected"),
    [
        pytest.param(
            "POST", 201, [("Location", "/items/7")], ["/items?page=2", "/items/7"], id="post"
        ),
        pytest.param(
            "PUT",
            200,
            [("Content-Location", "https://API.example.com:443/items/7")],
            ["/items?page=2", "/items/7"],
            id="put-absolute-same-origin",
        ),
        pytest.param("DELETE", 204, [], ["/items?page=2"], id="delete"),
        pytest.param(
            "PATCH", 302, [("Location", "7?x=1")], ["/items?page=2", "/7?x=1"], id="relative"
        ),
        pytest.param(
            "POST",
            201,
            [("Location", "https://evil.example/items")],
            ["/items?page=2"],
            id="other-host",
        ),
        pytest.param(
            "POST",
            201,
            [("Location", "http://api.example.com/items/7")],
            ["/items?page=2"],
            id="other-scheme",
        ),
        pytest.param(
            "POST",
            201,
            [("Location", "https://api.example.com:8443/x")],
            ["/items?page=2"],
            id="other-port",
        ),
        pytest.param(
            "POST",
            201,
            [("Location", "https://api.example.com:bad/x")],
            ["/items?page=2"],
            id="invalid-port",
        ),
        pytest.param("POST", 200, [("Location", "/items?page=2")], ["/items?page=2"], id="dedup"),
        pytest.param("POST", 404, [("Location", "/items/7")], [], id="error-status"),
        pytest.param("POST", 500, [], [], id="server-error"),
        pytest.param("GET", 200, [("Location", "/items/7")], [], id="safe-get"),
        pytest.param("OPTIONS", 200, [], [], id="safe-options"),
        pytest.param("PROPFIND", 207, [], ["/items?page=2"], id="unknown-method-is-unsafe"),
    ],
)
def test_invalidates(method: str, status: int, headers: Pairs, expected: list[str]) -> None:
    assert invalidates(method, status, URL, headers) == expected


def test_invalidates_root() -> None:
    assert invalidates("POST", 200, "http://h", []) == ["/"]


# --- Cache-Status (RFC 9211) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(result="hit", ttl=42.9), "geogate; hit; ttl=42"),
        (dict(result="hit", ttl=-0.5), "geogate; hit; ttl=-1"),  # stale, served
        (dict(result="fwd", fwd="uri-miss", stored=True), "geogate; fwd=uri-miss; stored"),
        (
            dict(result="fwd", fwd="stale", fwd_status=304, ttl=300),
            "geogate; fwd=stale; fwd-status=304; ttl=300",
        ),
        (dict(result="fwd", fwd="vary-miss", stored=False), "geogate; fwd=vary-miss"),
        (dict(result="fwd", fwd="request"), "geogate; fwd=request"),
        (dict(result="fwd", fwd="uri-miss", collapsed=True), "geogate; fwd=uri-miss; collapsed"),
        (
            dict(result="fwd", fwd="bypass", detail="temperature"),
            "geogate; fwd=bypass; detail=temperature",
        ),
        (dict(result="hit", detail="stale if error"), 'geogate; hit; detail="stale if error"'),
        (dict(result="hit", key='a"b\\c'), 'geogate; hit; key="a\\"b\\\\c"'),
        (dict(result="hit", cache_name="edge eu"), '"edge eu"; hit'),
    ],
)
def test_cache_status(kwargs: dict[str, object], expected: str) -> None:
    assert cache_status(**kwargs) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(result="miss"),
        dict(result="hit", fwd="stale"),
        dict(result="fwd"),
        dict(result="fwd", fwd="nope"),
        dict(result="hit", key="schlüssel"),
    ],
)
def test_cache_status_rejects(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        cache_status(**kwargs)  # type: ignore[arg-type]


def test_fields_view_is_case_insensitive() -> None:
    fields = Fields([("A", "1"), ("a", "2"), ("B", "3")])
    assert fields.getall("a", []) == ["1", "2"]
    assert fields.getall("c", []) == []
    assert list(fields.items()) == [("A", "1"), ("a", "2"), ("B", "3")]
