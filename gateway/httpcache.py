"""RFC 9111 shared-cache decisions: what to store, when to reuse, what to say about it.

Rule: this module decides from plain values; it never reads a clock, a socket or a store.
Callers pass header views (anything with ``getall(name, default)`` and ``items()``, such as
multidict's ``CIMultiDictProxy``, or a list of ``(name, value)`` pairs), status codes and
times. Every time here is **wall-clock epoch seconds** (``time.time()`` in the caller): the
age arithmetic of §4.2.3 compares them with the origin's ``Date``, so the loop's monotonic
clock would be wrong here, unlike everywhere else in the gateway.

The gateway is a shared cache (RFC 9111 §1): ``s-maxage``, ``proxy-revalidate`` and
``private`` apply. Choices where the RFC leaves room, each documented where it is made:

* ``Vary: *`` is not stored at all (§4.1: it "always fails to match"; storing it buys nothing).
* Conflicting duplicates of ``max-age``/``s-maxage``, or of ``Expires``, make the response
  stale (§4.2.1 allows "first occurrence" or "stale"; stale is the safe one), as does an
  invalid ``max-age`` (§4.2.1 "encouraged to consider ... stale") or ``Expires`` (§5.3).
* 206 is never stored (no partial-content support); 304 only ever updates (§4.3.4).
* A request ``no-cache``, or a stored response's ``no-cache``, leads to a conditional request
  when the stored response has a validator (§5.2.1.4, §5.2.2.4 allow validation), not to an
  unconditional one, hence ``Outcome.REVALIDATE`` rather than ``STALE_REVALIDATE``; a stale
  response the client accepted with ``max-stale`` is ``Outcome.STALE_ALLOWED`` (not FRESH).
* HEAD: a stored GET response answers HEAD; a stored HEAD response never answers GET
  (``gateway.cachekey`` gives both methods one key; see there).
"""

from __future__ import annotations

import calendar
import dataclasses
import enum
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias
from urllib.parse import urljoin, urlsplit

from gateway.headers import HOP_BY_HOP

__all__ = [
    "DELTA_MAX",
    "HEURISTICALLY_CACHEABLE",
    "HEURISTIC_FRACTION",
    "HEURISTIC_MAX",
    "UNDERSTOOD_STATUSES",
    "CacheControl",
    "Decision",
    "Fields",
    "HeaderInput",
    "Headers",
    "Outcome",
    "StoredResponse",
    "byte_range",
    "cache_status",
    "current_age",
    "format_http_date",
    "freshness_lifetime",
    "invalidates",
    "is_storable",
    "lookup_decision",
    "normalise_field_value",
    "not_modified",
    "not_modified_headers",
    "parse_cache_control",
    "parse_http_date",
    "request_cache_control",
    "stale_if_error_allows",
    "storable_headers",
    "update_from_304",
    "vary_names",
    "vary_values",
]

DELTA_MAX = 2**31
"""§1.2.2: a delta-seconds too large to represent is taken as 2^31."""
HEURISTIC_FRACTION = 0.1
"""§4.2.2: heuristic lifetime is this share of ``Date - Last-Modified`` ("typical: 10 %")."""
HEURISTIC_MAX = 24 * 3600.0
"""Cap on a heuristic lifetime, seconds (RFC 7234 flagged heuristics above 24 h)."""

HEURISTICALLY_CACHEABLE = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
"""RFC 9110 §15.1's list, without 206: partial content is never stored here."""
UNDERSTOOD_STATUSES = frozenset(
    {*range(200, 206), 300, 301, 302, 303, 305, 307, 308, *range(400, 418)}
    | {421, 422, 426, 428, 429, 431, 451, *range(500, 506), 511}
)
"""Final statuses whose caching rules we implement (RFC 9110 §15, RFC 6585, RFC 7725);
206 and 304 are left out: never stored (§3 "understands the response status code")."""

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # RFC 9110 §9.2.1
_NOT_STORED = frozenset(n.lower() for n in HOP_BY_HOP) | {"proxy-authentication-info"}
_NOT_UPDATED = _NOT_STORED | {"content-length"}


class Headers(Protocol):
    """A read-only multi-value header view; multidict's ``CIMultiDictProxy`` is one."""

    def getall(self, key: str, default: list[str], /) -> list[str]: ...
    def items(self) -> Iterable[tuple[str, str]]: ...


class Fields:
    """A case-insensitive ``Headers`` view over ``(name, value)`` pairs (stored headers)."""

    __slots__ = ("_pairs",)

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._pairs = tuple(pairs)

    def getall(self, key: str, default: list[str], /) -> list[str]:
        key = key.lower()
        return [v for n, v in self._pairs if n.lower() == key] or default

    def items(self) -> Iterable[tuple[str, str]]:
        return self._pairs


HeaderInput: TypeAlias = Headers | Iterable[tuple[str, str]]
"""What the functions here accept: a ``Headers`` view or ``(name, value)`` pairs."""


def _view(headers: HeaderInput) -> Headers:
    return headers if hasattr(headers, "getall") else Fields(headers)  # type: ignore[return-value]


def _first(headers: Headers, name: str) -> str | None:
    values = headers.getall(name, [])
    return values[0] if values else None


# --- Cache-Control (§5.2) ----------------------------------------------------------------

_DIRECTIVE = re.compile(
    r'[\s,]*(?P<name>[^\s,="]+)[ \t]*(?:=[ \t]*(?:"(?P<q>(?:[^"\\]|\\.)*)"|(?P<t>[^\s,"]*)))?[^,]*'
)
_UNESCAPE = re.compile(r"\\(.)")


@dataclass(frozen=True, slots=True)
class CacheControl:
    """Parsed Cache-Control directives of one message (§5.2); request and response share it.

    Delta-seconds are ints capped at ``DELTA_MAX``; ``max_stale`` is ``math.inf`` for a bare
    ``max-stale``. ``no_cache`` / ``private`` are the unqualified forms; the qualified forms
    (``no-cache="Set-Cookie"``) only list fields, lower-case, in ``*_fields``.
    """

    max_age: int | None = None
    s_maxage: int | None = None
    min_fresh: int | None = None
    max_stale: float | None = None
    stale_while_revalidate: int | None = None
    stale_if_error: int | None = None
    no_cache: bool = False
    no_cache_fields: frozenset[str] = frozenset()
    no_store: bool = False
    private: bool = False
    private_fields: frozenset[str] = frozenset()
    public: bool = False
    must_revalidate: bool = False
    proxy_revalidate: bool = False
    must_understand: bool = False
    only_if_cached: bool = False


def _delta(arg: str | None) -> int | None:
    """§1.2.2 delta-seconds: 1*DIGIT, capped at 2^31; anything else is invalid (None)."""
    if arg is None or not arg.isascii() or not arg.isdigit():
        return None
    return min(int(arg), DELTA_MAX)


def parse_cache_control(values: Iterable[str]) -> CacheControl:
    """Parse Cache-Control field lines (§5.2) into a ``CacheControl``.

    Names compare case-insensitively and arguments may be tokens or quoted strings (§5.2).
    Unknown directives are ignored (§5.2.3). Duplicates and invalid arguments (§4.2.1: "the
    most restrictive directive should be followed"):

    * ``max-age`` / ``s-maxage``: invalid, or two different values -> 0 (stale; §4.2.1).
    * ``max-stale``, ``stale-while-revalidate``, ``stale-if-error``: invalid -> ignored
      (no stale allowance); duplicates -> the smallest. ``min-fresh``: invalid -> ignored,
      duplicates -> the largest.
    * ``no-cache`` / ``private``: unqualified anywhere wins; ``=""`` counts as unqualified.

    Args:
        values: every Cache-Control field line of the message, e.g. ``getall(...)``.
    """
    deltas: dict[str, list[int | None]] = {}
    flags: set[str] = set()
    qualified: dict[str, set[str]] = {"no-cache": set(), "private": set()}
    for value in values:
        pos = 0
        while pos < len(value):
            m = _DIRECTIVE.match(value, pos)
            if m is None:  # junk such as '="x"': skip to the next list member
                nxt = value.find(",", pos)
                if nxt < 0:
                    break
                pos = nxt + 1
                continue
            pos = m.end()
            name = m["name"].lower()
            arg = _UNESCAPE.sub(r"\1", m["q"]) if m["q"] is not None else m["t"]
            if name in ("no-cache", "private") and arg:
                qualified[name].update(f.strip().lower() for f in arg.split(",") if f.strip())
            elif name == "max-stale" and arg is None:
                flags.add("max-stale-any")
            elif name in _DELTA_NAMES:
                deltas.setdefault(name, []).append(_delta(arg))
            else:
                flags.add(name)

    def fresh_delta(name: str) -> int | None:
        got = deltas.get(name)
        if not got:
            return None
        return got[0] if got[0] is not None and len(set(got)) == 1 else 0

    def valid(name: str) -> list[int]:
        return [d for d in deltas.get(name, ()) if d is not None]

    max_stale: float | None = min(valid("max-stale"), default=None)
    if max_stale is None and "max-stale-any" in flags:
        max_stale = math.inf
    return CacheControl(
        max_age=fresh_delta("max-age"),
        s_maxage=fresh_delta("s-maxage"),
        min_fresh=max(valid("min-fresh"), default=None),
        max_stale=max_stale,
        stale_while_revalidate=min(valid("stale-while-revalidate"), default=None),
        stale_if_error=min(valid("stale-if-error"), default=None),
        no_cache="no-cache" in flags,
        no_cache_fields=frozenset(qualified["no-cache"]),
        no_store="no-store" in flags,
        private="private" in flags,
        private_fields=frozenset(qualified["private"]),
        public="public" in flags,
        must_revalidate="must-revalidate" in flags,
        proxy_revalidate="proxy-revalidate" in flags,
        must_understand="must-understand" in flags,
        only_if_cached="only-if-cached" in flags,
    )


_DELTA_NAMES = frozenset(
    {"max-age", "s-maxage", "min-fresh", "max-stale", "stale-while-revalidate", "stale-if-error"}
)


def request_cache_control(headers: HeaderInput) -> CacheControl:
    """A request's directives; ``Pragma: no-cache`` counts as ``no-cache`` when the request
    has no Cache-Control field (§5.4)."""
    h = _view(headers)
    lines = h.getall("Cache-Control", [])
    if lines:
        return parse_cache_control(lines)
    pragmas = h.getall("Pragma", [])
    if not pragmas:
        return _NO_DIRECTIVES  # the common case, answered without building anything
    pragma = ",".join(pragmas).lower()
    no_cache = "no-cache" in (p.strip() for p in pragma.split(","))
    return CacheControl(no_cache=no_cache)


_NO_DIRECTIVES = CacheControl()  # frozen: safe to share


# --- HTTP-date (RFC 9110 §5.6.7) ---------------------------------------------------------

_MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTHS = {m: i for i, m in enumerate(_MONTH_NAMES, 1)}
_MON = "(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_IMF = re.compile(
    rf"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), (\d\d) {_MON} (\d{{4}}) (\d\d):(\d\d):(\d\d) GMT"
)
_RFC850 = re.compile(
    rf"(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day, (\d\d)-{_MON}-(\d\d) (\d\d):(\d\d):(\d\d) GMT"
)
_ASCTIME = re.compile(
    rf"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) {_MON} ([ \d]\d) (\d\d):(\d\d):(\d\d) (\d{{4}})"
)


def parse_http_date(value: str) -> float | None:
    """Epoch seconds of an HTTP-date (IMF-fixdate, RFC 850 or asctime), None if invalid.

    RFC 850's two-digit years: 70-99 are 19xx, 00-69 are 20xx (a fixed pivot, not the
    "50 years in the future" rule of RFC 9110 §5.6.7, which needs a clock).
    """
    value = value.strip()
    if m := _IMF.fullmatch(value):
        day, mon, year, hh, mm, ss = m.groups()
    elif m := _RFC850.fullmatch(value):
        day, mon, yy, hh, mm, ss = m.groups()
        year = str((1900 if int(yy) >= 70 else 2000) + int(yy))
    elif m := _ASCTIME.fullmatch(value):
        mon, day, hh, mm, ss, year = m.groups()
    else:
        return None
    parts = (int(year), _MONTHS[mon], int(day), int(hh), int(mm), int(ss))
    if not (1 <= parts[2] <= calendar.monthrange(parts[0], parts[1])[1]):
        return None
    if parts[3] > 23 or parts[4] > 59 or parts[5] > 60:
        return None
    return float(calendar.timegm((*parts, 0, 0, 0)))


def format_http_date(t: float) -> str:
    """IMF-fixdate for epoch seconds ``t`` (RFC 9110 §5.6.7), e.g. for a missing Date."""
    g = time.gmtime(t)
    day = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[g.tm_wday]
    mon = _MONTH_NAMES[g.tm_mon - 1]
    clock = f"{g.tm_hour:02d}:{g.tm_min:02d}:{g.tm_sec:02d}"
    return f"{day}, {g.tm_mday:02d} {mon} {g.tm_year:04d} {clock} GMT"


# --- Storing (§3) ------------------------------------------------------------------------


def vary_names(response_headers: HeaderInput) -> tuple[str, ...] | None:
    """Field names a response varies on (§4.1): lower-case, sorted, from every Vary line;
    None for ``Vary: *`` (never matches)."""
    names: set[str] = set()
    for line in _view(response_headers).getall("Vary", []):
        for token in line.split(","):
            token = token.strip().lower()
            if token == "*":
                return None
            if token:
                names.add(token)
    return tuple(sorted(names))


_WS = re.compile(r"[ \t\r\n]+")
_COMMA_WS = re.compile(r" ?, ?")


def normalise_field_value(values: Sequence[str]) -> str | None:
    """One request field for Vary matching (§4.1): lines combined, whitespace collapsed and
    dropped around commas; None when absent (absent only matches absent). Case is kept:
    whether a value is case-insensitive depends on the field."""
    if not values:
        return None
    return _COMMA_WS.sub(",", _WS.sub(" ", ",".join(values)).strip())


def vary_values(
    names: Iterable[str], request_headers: HeaderInput
) -> tuple[tuple[str, str | None], ...]:
    """The request's normalised value of each Vary'd field, as ``((name, value), ...)``."""
    h = _view(request_headers)
    return tuple((n, normalise_field_value(h.getall(n, []))) for n in names)


def is_storable(
    method: str,
    status: int,
    request_headers: HeaderInput,
    response_headers: HeaderInput,
    *,
    shared: bool = True,
) -> bool:
    """Whether a cache may store this response (RFC 9111 §3).

    * method GET or HEAD (the route policy decides whether HEAD responses are kept);
    * status final and understood (``UNDERSTOOD_STATUSES``: no 206, no 304);
    * no ``no-store`` in the request (§5.2.1.5) or response (§5.2.2.5) -- unless the response
      also has ``must-understand`` and the status is understood (§5.2.2.3);
    * shared: no unqualified ``private`` (§5.2.2.7); a request with Authorization only when the
      response has ``public``, ``s-maxage`` or ``must-revalidate`` (§3.5);
    * not ``Vary: *`` (our choice: §4.1 says it never matches, so it would never be reused);
    * explicit freshness (Expires, max-age, s-maxage if shared, public, private if not
      shared) or a heuristically cacheable status (RFC 9110 §15.1).
    """
    if method.upper() not in ("GET", "HEAD") or status not in UNDERSTOOD_STATUSES:
        return False
    req, res = _view(request_headers), _view(response_headers)
    req_cc = parse_cache_control(req.getall("Cache-Control", []))
    cc = parse_cache_control(res.getall("Cache-Control", []))
    if req_cc.no_store or (cc.no_store and not cc.must_understand):
        return False
    if shared and cc.private:
        return False
    authorized = cc.public or cc.s_maxage is not None or cc.must_revalidate
    if shared and req.getall("Authorization", []) and not authorized:
        return False
    if vary_names(res) is None:
        return False
    explicit = (
        cc.public
        or cc.max_age is not None
        or bool(res.getall("Expires", []))
        or (shared and cc.s_maxage is not None)
        or (not shared and (cc.private or bool(cc.private_fields)))
    )
    return explicit or status in HEURISTICALLY_CACHEABLE


def _connection_listed(h: Headers) -> set[str]:
    return {t.strip().lower() for v in h.getall("Connection", []) for t in v.split(",")} - {""}


def storable_headers(
    response_headers: HeaderInput, *, shared: bool = True
) -> list[tuple[str, str]]:
    """The response's fields a cache keeps (§3.1): without hop-by-hop fields and those listed
    in Connection (RFC 9110 §7.6.1), Proxy-Authenticate/-Authentication-Info, the fields
    named by ``no-cache="..."`` (§5.2.2.4) and, shared, by ``private="..."`` (§5.2.2.7)."""
    h = _view(response_headers)
    cc = parse_cache_control(h.getall("Cache-Control", []))
    drop = _NOT_STORED | _connection_listed(h) | cc.no_cache_fields
    if shared:
        drop |= cc.private_fields
    return [(n, v) for n, v in h.items() if n.lower() not in drop]


# --- Freshness (§4.2) --------------------------------------------------------------------


def freshness_lifetime(
    status: int,
    response_headers: HeaderInput,
    *,
    response_time: float,
    shared: bool = True,
    heuristic_fraction: float = HEURISTIC_FRACTION,
    heuristic_max: float = HEURISTIC_MAX,
) -> float:
    """Seconds a response stays fresh (§4.2.1), first match wins:

    1. ``s-maxage`` (shared caches only), 2. ``max-age``, 3. ``Expires - Date`` (Date
    missing -> ``response_time``; invalid or conflicting Expires -> 0, "already expired",
    §5.3), 4. heuristic (§4.2.2), only for heuristically cacheable statuses or ``public``:
    ``heuristic_fraction x (Date - Last-Modified)``, at most ``heuristic_max``; else 0.

    Args:
        response_time: epoch seconds the response was received.
    """
    h = _view(response_headers)
    cc = parse_cache_control(h.getall("Cache-Control", []))
    if shared and cc.s_maxage is not None:
        return float(cc.s_maxage)
    if cc.max_age is not None:
        return float(cc.max_age)
    date = _date(h, response_time)
    expires = h.getall("Expires", [])
    if expires:
        when = parse_http_date(expires[0]) if len(set(expires)) == 1 else None
        return 0.0 if when is None else max(0.0, when - date)
    if status in HEURISTICALLY_CACHEABLE or cc.public:
        lm = _first(h, "Last-Modified")
        modified = parse_http_date(lm) if lm is not None else None
        if modified is not None and modified < date:
            return min(heuristic_max, heuristic_fraction * (date - modified))
    return 0.0


def _date(h: Headers, fallback: float) -> float:
    value = _first(h, "Date")
    parsed = parse_http_date(value) if value is not None else None
    return fallback if parsed is None else parsed


def _age_value(h: Headers) -> int:
    """§5.1: Age is a singleton, but a list-based value means its first member (first line,
    first comma-separated member); an invalid value is ignored: 0, as when absent (§4.2.3)."""
    first = _first(h, "Age")
    if first is None:
        return 0
    return _delta(first.split(",", 1)[0].strip()) or 0


def current_age(
    *, date: float, age_value: float, request_time: float, response_time: float, now: float
) -> float:
    """§4.2.3 current_age, seconds, from epoch-second inputs::

    apparent_age = max(0, response_time - date_value)
    response_delay = response_time - request_time
    corrected_age_value = age_value + response_delay
    corrected_initial_age = max(apparent_age, corrected_age_value)
    resident_time = now - response_time          (floored at 0: a clock step back)
    current_age = corrected_initial_age + resident_time
    """
    apparent_age = max(0.0, response_time - date)
    corrected_initial_age = max(apparent_age, age_value + (response_time - request_time))
    return corrected_initial_age + max(0.0, now - response_time)


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredResponse:
    """What a store keeps for one response (the body is kept beside it).

    Only the init fields need serialising; the rest is derived from them on construction.

    Args:
        status: the response status.
        headers: stored fields (``storable_headers``), with a Date (§6.6.1 of RFC 9110).
        body_length: bytes of the stored body.
        request_time: epoch seconds the request was sent upstream (§4.2.3).
        response_time: epoch seconds the response was received.
        vary: ``vary_values(names, request)`` of the request that got it (§4.1).
        method: the request method it answered (a HEAD response cannot answer GET).
        shared: shared-cache semantics (s-maxage, proxy-revalidate); always True in the gateway.
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    body_length: int
    request_time: float
    response_time: float
    vary: tuple[tuple[str, str | None], ...] = ()
    method: str = "GET"
    shared: bool = True
    cache_control: CacheControl = field(init=False, repr=False, compare=False)
    lifetime: float = field(init=False, repr=False, compare=False)
    initial_age: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        h = Fields(self.headers)
        object.__setattr__(
            self, "cache_control", parse_cache_control(h.getall("Cache-Control", []))
        )
        lifetime = freshness_lifetime(
            self.status, h, response_time=self.response_time, shared=self.shared
        )
        object.__setattr__(self, "lifetime", lifetime)
        age = _age_value(h)
        initial = current_age(
            date=_date(h, self.response_time),
            age_value=age,
            request_time=self.request_time,
            response_time=self.response_time,
            now=self.response_time,
        )
        object.__setattr__(self, "initial_age", initial)

    @classmethod
    def capture(
        cls,
        method: str,
        status: int,
        request_headers: HeaderInput,
        response_headers: HeaderInput,
        *,
        body_length: int,
        request_time: float,
        response_time: float,
        shared: bool = True,
    ) -> StoredResponse:
        """Build the stored form of a response ``is_storable`` accepted: ``storable_headers``,
        a Date added when missing (RFC 9110 §6.6.1), the Vary'd request values captured.

        Raises:
            ValueError: the response has ``Vary: *`` (``is_storable`` refuses those).
        """
        names = vary_names(response_headers)
        if names is None:
            raise ValueError("a Vary: * response is never stored")
        headers = storable_headers(response_headers, shared=shared)
        if not any(n.lower() == "date" for n, _ in headers):
            headers.append(("Date", format_http_date(response_time)))
        return cls(
            status=status,
            headers=tuple(headers),
            body_length=body_length,
            request_time=request_time,
            response_time=response_time,
            vary=vary_values(names, request_headers),
            method=method.upper(),
            shared=shared,
        )

    @property
    def fields(self) -> Fields:
        """The stored headers as a case-insensitive view."""
        return Fields(self.headers)

    def current_age(self, now: float) -> float:
        """§4.2.3 current_age at epoch seconds ``now``."""
        return self.initial_age + max(0.0, now - self.response_time)

    def ttl(self, now: float) -> float:
        """Freshness left at ``now``, seconds; <= 0 when stale (§4.2: fresh iff age < lifetime)."""
        return self.lifetime - self.current_age(now)

    def vary_matches(self, request_headers: HeaderInput) -> bool:
        """Whether a new request selects this response (§4.1)."""
        return vary_values((n for n, _ in self.vary), request_headers) == self.vary

    def conditional_headers(self) -> tuple[tuple[str, str], ...]:
        """Validators to send when revalidating (§4.3.1): If-None-Match from ETag (MUST),
        If-Modified-Since from Last-Modified (SHOULD: one stored response, no subrange)."""
        h, out = self.fields, []
        if (etag := _first(h, "ETag")) is not None:
            out.append(("If-None-Match", etag))
        if (lm := _first(h, "Last-Modified")) is not None:
            out.append(("If-Modified-Since", lm))
        return tuple(out)

    def freshened(
        self, not_modified_headers: HeaderInput, *, request_time: float, response_time: float
    ) -> StoredResponse | None:
        """This response updated by a 304 to our conditional request (§4.3.4), or None when
        the 304's validator names another representation (ETag, else Last-Modified, differs).

        A 304 without any validator is taken as ours (we sent the conditional request for this
        one stored response), which is laxer than §4.3.4's last rule.
        """
        new, old = _view(not_modified_headers), self.fields
        for name in ("ETag", "Last-Modified"):
            if (theirs := _first(new, name)) is not None:
                mine = _first(old, name)
                if name == "ETag" and not theirs.startswith("W/"):
                    return (
                        self._replace_with(new, request_time, response_time)
                        if theirs == mine
                        else None
                    )
                same = mine is not None and mine.removeprefix("W/") == theirs.removeprefix("W/")
                return self._replace_with(new, request_time, response_time) if same else None
        return self._replace_with(new, request_time, response_time)

    def _replace_with(
        self, new: Headers, request_time: float, response_time: float
    ) -> StoredResponse:
        headers = update_from_304(self.headers, new)
        sent = {n.lower() for n, _ in new.items()}
        # The old Date would count the time spent stored as age again, and the old Age
        # described the first response (§5.1): a 304 without them gets a fresh start.
        headers = [(n, v) for n, v in headers if n.lower() not in {"date", "age"} - sent]
        if "date" not in sent:
            headers.append(("Date", format_http_date(response_time)))
        return dataclasses.replace(
            self, headers=tuple(headers), request_time=request_time, response_time=response_time
        )


def update_from_304(
    stored_headers: Iterable[tuple[str, str]], not_modified_headers: HeaderInput
) -> list[tuple[str, str]]:
    """Stored fields updated from a 304 (§4.3.4 via §3.2): each field the 304 carries replaces
    every stored line of that name, except Content-Length, hop-by-hop and Connection-listed
    fields, and fields named by the 304's ``no-cache="..."``/``private="..."`` (§3.1)."""
    new = _view(not_modified_headers)
    cc = parse_cache_control(new.getall("Cache-Control", []))
    skip = _NOT_UPDATED | _connection_listed(new) | cc.no_cache_fields | cc.private_fields
    updates = [(n, v) for n, v in new.items() if n.lower() not in skip]
    replaced = {n.lower() for n, _ in updates}
    return [(n, v) for n, v in stored_headers if n.lower() not in replaced] + updates


# --- Reuse (§4) --------------------------------------------------------------------------


class Outcome(enum.Enum):
    """What to do with a request given the stored response (``.value`` is a metrics label).

    * FRESH: serve the stored response with ``Decision.age`` as Age.
    * STALE_ALLOWED: serve it although stale: the request's ``max-stale`` allows (§5.2.1.2).
    * STALE_WHILE_REVALIDATE: serve it now, revalidate in the background (RFC 5861 §3).
    * REVALIDATE: forward with ``Decision.conditional`` added; a 304 -> ``freshened`` and serve.
    * MUST_FORWARD: forward unconditionally (miss, no validator, method not cacheable).
    * VARY_MISMATCH: a stored response exists but its Vary'd fields differ: a miss.
    * ONLY_IF_CACHED: the request said ``only-if-cached`` and nothing is usable: answer 504
      (§5.2.1.7).
    """

    FRESH = "fresh"
    STALE_ALLOWED = "stale-allowed"
    STALE_WHILE_REVALIDATE = "stale-while-revalidate"
    REVALIDATE = "revalidate"
    MUST_FORWARD = "must-forward"
    VARY_MISMATCH = "vary-mismatch"
    ONLY_IF_CACHED = "only-if-cached"

    @property
    def serves_stored(self) -> bool:
        """True when the stored response answers this request."""
        return self in _SERVES


_SERVES = frozenset({Outcome.FRESH, Outcome.STALE_ALLOWED, Outcome.STALE_WHILE_REVALIDATE})


@dataclass(frozen=True, slots=True)
class Decision:
    """``lookup_decision``'s answer.

    Args:
        outcome: what to do.
        age: Age to send when serving the stored response (§5.1, whole seconds).
        ttl: freshness left, seconds, negative when stale; None without a stored response.
        conditional: validator fields to add for REVALIDATE (§4.3.1).
        fwd: RFC 9211 ``fwd`` reason when the request goes forward (``uri-miss``,
            ``vary-miss``, ``method``, ``miss``, ``request``, ``stale``), else None.
    """

    outcome: Outcome
    age: int = 0
    ttl: float | None = None
    conditional: tuple[tuple[str, str], ...] = ()
    fwd: str | None = None


def lookup_decision(
    method: str, request_headers: HeaderInput, stored: StoredResponse | None, now: float
) -> Decision:
    """Decide how a request is answered from ``stored`` at epoch seconds ``now`` (§4).

    In order: method GET/HEAD (a HEAD response never answers GET); a stored response;
    Vary match (§4.1); response ``no-cache`` (§5.2.2.4) and request ``no-cache`` /
    ``max-age`` / ``min-fresh`` (§5.2.1) -> validate (fwd ``stale`` / ``request``); fresh
    (§4.2) -> FRESH; stale with ``must-revalidate``, or shared with ``proxy-revalidate`` or
    ``s-maxage`` (§5.2.2.2, §5.2.2.8, §5.2.2.10) -> validate, never serve stale; request
    ``max-stale`` -> STALE_ALLOWED; ``stale-while-revalidate`` window -> serve and revalidate;
    else validate. "Validate" is REVALIDATE when the stored response has a validator, else
    MUST_FORWARD. With ``only-if-cached`` every forwarding outcome becomes ONLY_IF_CACHED.

    Args:
        method: the request method.
        request_headers: the request's fields.
        stored: the stored response for the request's key, or None (miss).
        now: epoch seconds.
    """
    req_cc = request_cache_control(request_headers)
    decision = _lookup(method.upper(), request_headers, req_cc, stored, now)
    if req_cc.only_if_cached and not decision.outcome.serves_stored:
        return dataclasses.replace(decision, outcome=Outcome.ONLY_IF_CACHED, conditional=())
    return decision


def _lookup(
    method: str,
    request_headers: HeaderInput,
    req_cc: CacheControl,
    stored: StoredResponse | None,
    now: float,
) -> Decision:
    if method not in ("GET", "HEAD"):
        return Decision(Outcome.MUST_FORWARD, fwd="method")
    if stored is None:
        return Decision(Outcome.MUST_FORWARD, fwd="uri-miss")
    if stored.method == "HEAD" and method == "GET":
        return Decision(Outcome.MUST_FORWARD, fwd="miss")
    if not stored.vary_matches(request_headers):
        return Decision(Outcome.VARY_MISMATCH, fwd="vary-miss")
    age = stored.current_age(now)
    ttl = stored.lifetime - age
    fresh = ttl > 0
    cc = stored.cache_control

    def validate(fwd: str) -> Decision:
        cond = stored.conditional_headers()
        outcome = Outcome.REVALIDATE if cond else Outcome.MUST_FORWARD
        return Decision(outcome, _age_header(age), ttl, cond, fwd)

    if cc.no_cache:
        return validate("stale")
    if req_cc.no_cache or (req_cc.max_age is not None and age > req_cc.max_age):
        return validate("request" if fresh else "stale")
    if req_cc.min_fresh is not None and ttl < req_cc.min_fresh:
        return validate("request" if fresh else "stale")
    if fresh:
        return Decision(Outcome.FRESH, _age_header(age), ttl)
    if _stale_forbidden(stored):
        return validate("stale")
    if req_cc.max_stale is not None and -ttl <= req_cc.max_stale:
        return Decision(Outcome.STALE_ALLOWED, _age_header(age), ttl)
    if cc.stale_while_revalidate is not None and -ttl <= cc.stale_while_revalidate:
        cond = stored.conditional_headers()
        return Decision(Outcome.STALE_WHILE_REVALIDATE, _age_header(age), ttl, cond)
    return validate("stale")


def _stale_forbidden(stored: StoredResponse) -> bool:
    """§4.2.4: no stale serving under must-revalidate, no-cache, or (shared) proxy-revalidate
    and s-maxage (which implies proxy-revalidate, §5.2.2.10)."""
    cc = stored.cache_control
    if cc.must_revalidate or cc.no_cache:
        return True
    return stored.shared and (cc.proxy_revalidate or cc.s_maxage is not None)


def _age_header(age: float) -> int:
    return min(DELTA_MAX, max(0, math.floor(age)))


def stale_if_error_allows(
    stored: StoredResponse,
    now: float,
    request_cc: CacheControl | None = None,
    *,
    disconnected_window: float = 0.0,
) -> bool:
    """Whether ``stored`` may answer when the upstream failed (5xx, no connection).

    Two permissions, the wider wins:

    * RFC 5861 §4: staleness within the response's ``stale-if-error``;
    * RFC 9111 §4.2.4: a cache that is *disconnected* (no answer from the origin at all:
      connection refused or reset, timeout, no region of the zone available) may serve a
      stale response; ``disconnected_window`` (seconds, the route's
      ``stale_if_disconnected``, 0 on an upstream 5xx answer) bounds how stale.

    The request's own ``stale-if-error`` replaces both (the client's limit, narrower or
    wider). Never when stale serving is forbidden (§4.2.4: must-revalidate, no-cache, shared
    proxy-revalidate / s-maxage) or the request asked for validation (``no-cache``).

    Args:
        stored: the stored response selected for the request (Vary already matched).
        now: epoch seconds.
        request_cc: ``request_cache_control(request)``; None for a request with none.
        disconnected_window: seconds of staleness allowed because the origin is unreachable.
    """
    if request_cc is not None and request_cc.no_cache:
        return False
    if _stale_forbidden(stored):
        return False
    staleness = -stored.ttl(now)
    if request_cc is not None and request_cc.stale_if_error is not None:
        return staleness <= request_cc.stale_if_error
    window = max(stored.cache_control.stale_if_error or 0, disconnected_window)
    return window > 0 and staleness <= window


# --- Requests answered from a stored response (§4.3.2; RFC 9110 §13, §14) -----------------

_ENTITY_TAG = re.compile(r'(?:W/)?"([^"]*)"')
_BYTE_RANGE = re.compile(r"[ \t]*bytes[ \t]*=[ \t]*(\d*)[ \t]*-[ \t]*(\d*)[ \t]*", re.IGNORECASE)
_NOT_MODIFIED_FIELDS = ("Cache-Control", "Content-Location", "Date", "ETag", "Expires", "Vary")


def not_modified(method: str, request_headers: HeaderInput, stored: StoredResponse) -> bool:
    """Whether the cache answers a validation request with 304 from ``stored`` (§4.3.2).

    Only for GET/HEAD and a stored 2xx (RFC 9110 §13.2.2: preconditions are evaluated when
    the answer would otherwise be 2xx). ``If-None-Match`` takes precedence (RFC 9110 §13.2.2):
    ``*`` or an entity-tag equal to the stored ETag under weak comparison (§8.8.3.2) -> 304.
    Without it, ``If-Modified-Since`` (one valid HTTP-date, else ignored, §13.1.3): 304 when
    the stored Last-Modified -- or, lacking one, its Date (§4.3.2) -- is not later.
    """
    if method.upper() not in ("GET", "HEAD") or not 200 <= stored.status < 300:
        return False
    h, mine = _view(request_headers), stored.fields
    inm = h.getall("If-None-Match", [])
    if inm:
        if any(member.strip() == "*" for line in inm for member in line.split(",")):
            return True
        etag = _first(mine, "ETag")
        own = _ENTITY_TAG.fullmatch(etag.strip()) if etag is not None else None
        return own is not None and any(
            m[1] == own[1] for line in inm for m in _ENTITY_TAG.finditer(line)
        )
    ims = h.getall("If-Modified-Since", [])
    since = parse_http_date(ims[0]) if len(ims) == 1 else None
    if since is None:
        return False
    lm = _first(mine, "Last-Modified")
    modified = parse_http_date(lm) if lm is not None else None
    if modified is None:
        modified = _date(mine, stored.response_time)
    return modified <= since


def not_modified_headers(stored: StoredResponse) -> list[tuple[str, str]]:
    """The stored fields a 304 carries (RFC 9110 §15.4.5): Cache-Control, Content-Location,
    Date, ETag, Expires and Vary; Last-Modified only when there is no ETag (it may then guide
    the recipient's cache update)."""
    keep = {n.lower() for n in _NOT_MODIFIED_FIELDS}
    if _first(stored.fields, "ETag") is None:
        keep.add("last-modified")
    return [(n, v) for n, v in stored.headers if n.lower() in keep]


def byte_range(
    method: str, request_headers: HeaderInput, stored: StoredResponse, length: int
) -> tuple[int, int] | None:
    """The single byte range ``(first, last)``, inclusive, a GET asks of a stored complete 200
    of ``length`` bytes (RFC 9110 §14.1.2), for a 206 from the cache (RFC 9111 §3.4 lets a
    cache answer ranges from what it stores).

    None -- answer with the whole 200, which a server MAY always do (RFC 9110 §14.2) -- when
    there is no Range, it has other units or several ranges, it is unparsable or
    unsatisfiable, or there is an If-Range (not evaluated here).
    """
    h = _view(request_headers)
    ranges = h.getall("Range", [])
    if method.upper() != "GET" or stored.status != 200 or len(ranges) != 1:
        return None
    if h.getall("If-Range", []) or (m := _BYTE_RANGE.fullmatch(ranges[0])) is None:
        return None
    first, last = m.groups()
    if first:
        start = int(first)
        end = length - 1 if not last else min(int(last), length - 1)
        if last and int(last) < start:
            return None
    elif last and int(last) > 0:
        start, end = max(0, length - int(last)), length - 1
    else:
        return None
    return (start, end) if start < length else None


# --- Invalidation (§4.4) -----------------------------------------------------------------


def _origin(url: str) -> tuple[str, str, int | None] | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def _path_query(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def invalidates(
    method: str, status: int, request_url: str, response_headers: HeaderInput
) -> list[str]:
    """URIs (path + query) to purge after a response to an unsafe method (§4.4).

    A non-error status (2xx, 3xx) to a method that is not safe (RFC 9110 §9.2.1: anything
    but GET, HEAD, OPTIONS, TRACE) invalidates the target URI, and Location and
    Content-Location when they resolve to the same origin (scheme, host, port) as the target
    ("MUST NOT" otherwise: it would let one origin purge another's entries).

    Args:
        request_url: the absolute target URI, ``scheme://host[:port]/path?query``.
    """
    if method.upper() in _SAFE_METHODS or not 200 <= status < 400:
        return []
    out = [_path_query(request_url)]
    target_origin = _origin(request_url)
    h = _view(response_headers)
    for name in ("Location", "Content-Location"):
        if (ref := _first(h, name)) is None or not ref.strip():
            continue
        absolute = urljoin(request_url, ref.strip())
        if _origin(absolute) == target_origin and (p := _path_query(absolute)) not in out:
            out.append(p)
    return out


# --- Cache-Status (RFC 9211) -------------------------------------------------------------

_SF_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_FWD = frozenset(
    {"bypass", "method", "uri-miss", "vary-miss", "miss", "request", "stale", "partial"}
)


def _sf_string(value: str) -> str:
    if not all(" " <= c <= "~" for c in value):
        raise ValueError(f"not printable ASCII, cannot go in a Structured Field: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cache_status(
    result: str,
    *,
    key: str | None = None,
    ttl: float | None = None,
    detail: str | None = None,
    fwd: str | None = None,
    fwd_status: int | None = None,
    stored: bool | None = None,
    collapsed: bool | None = None,
    cache_name: str = "geogate",
) -> str:
    """One RFC 9211 Cache-Status member, e.g. ``geogate; hit; ttl=42`` or
    ``geogate; fwd=uri-miss; fwd-status=200; stored``.

    Args:
        result: ``"hit"`` (served from cache, §2.1) or ``"fwd"`` (went forward, §2.2).
        key: cache key, an sf-string (§2.7); keep user data out of it.
        ttl: freshness left, seconds, floored; negative when stale (§2.4).
        detail: free text: a token when it is one, else a string (§2.8).
        fwd: why it went forward (§2.2); required with ``result="fwd"``, not allowed with hit.
        fwd_status: the status received from the next hop (§2.3).
        stored: the response was stored (§2.5). collapsed: it was collapsed with another
            request (§2.6). False and None both leave the parameter out.
        cache_name: the member's name (§2: a token or a string).

    Raises:
        ValueError: an unknown result or fwd reason, or a value that is not printable ASCII.
    """
    if result not in ("hit", "fwd") or (result == "fwd") != (fwd is not None):
        raise ValueError(
            f"result must be 'hit' without fwd or 'fwd' with it, not {result!r}/{fwd!r}"
        )
    name = cache_name if _SF_TOKEN.fullmatch(cache_name) else _sf_string(cache_name)
    parts = [name]
    if fwd is not None:
        if fwd not in _FWD:
            raise ValueError(f"unknown Cache-Status fwd reason {fwd!r}")
        parts.append(f"fwd={fwd}")
    else:
        parts.append("hit")
    if fwd_status is not None:
        parts.append(f"fwd-status={int(fwd_status)}")
    if ttl is not None:
        parts.append(f"ttl={math.floor(ttl)}")
    if stored:
        parts.append("stored")
    if collapsed:
        parts.append("collapsed")
    if key is not None:
        parts.append(f"key={_sf_string(key)}")
    if detail is not None:
        parts.append(f"detail={detail if _SF_TOKEN.fullmatch(detail) else _sf_string(detail)}")
    return "; ".join(parts)
