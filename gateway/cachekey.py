"""Canonical cache keys for the two route cache policies, ``http`` and ``llm-exact``.

Rule: this module computes keys from plain values; it never reads a store or a socket.

Every key starts with the residency zone, so an entry written for zone ``eu`` can never be
found by a request of another zone, even if two zones shared one Redis by mistake. Parts are
joined as netstrings (``len:part,``) before hashing, so no choice of part values can make two
different part lists hash the same input. Keys are the first 32 hex digits of SHA-256
(128 bits): collisions are not a practical concern and Redis keys stay short.

HEAD and GET share a key (``http_key``): a stored GET response answers a HEAD (RFC 9110
§9.3.2: same header fields; RFC 9111 §4.3.5 lets a HEAD response freshen a stored GET).
The consequence for the cache stage: never store a HEAD response under this key (it has no
body and would answer later GETs with nothing); either forward a HEAD miss as is and store
nothing, or fetch it as GET and store that (Varnish does the latter). ``httpcache`` refuses
to answer a GET from a response stored with ``method="HEAD"`` in any case.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.httpcache import HeaderInput, vary_values

__all__ = [
    "KEY_HEX_DIGITS",
    "STREAM_FIELDS",
    "LlmKey",
    "canonical_json",
    "http_key",
    "is_deterministic",
    "llm_key",
    "nondeterminism",
    "vary_key",
]

KEY_HEX_DIGITS = 32
"""Hex digits of SHA-256 kept in a key (128 bits)."""
STREAM_FIELDS = ("stream", "stream_options")
"""Top-level body fields that only choose the wire format: a streamed and a non-streamed
request share an entry (the cache stage renders the stored answer either way)."""
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}
_SAFE_INT = 2**53  # floats beyond this are not all integers exactly; leave them floats


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(b"%d:%b," % (len(data), data))
    return h.hexdigest()[:KEY_HEX_DIGITS]


def http_key(*, zone: str, route: str, method: str, scheme: str, host: str, target: str) -> str:
    """Primary key of the ``http`` policy (RFC 9111 §4: method and target URI).

    Args:
        zone: the request's residency zone.
        route: the matched route's prefix, e.g. ``"/"``.
        method: the request method; HEAD maps to GET (module docstring), others upper-cased.
        scheme: ``http`` or ``https``, any case.
        host: the Host (authority) as received; lower-cased and its default port dropped
            (RFC 9110 §4.2.3: ``example.com:80`` and ``EXAMPLE.com`` are the same origin).
        target: path and query exactly as received (origin-form). Not normalised: §4.1 of
            RFC 9111 allows it, but ``/a%2Fb`` and ``/a/b`` may well differ to the backend.

    Returns:
        32 hex digits. Vary'd responses are stored under ``vary_key`` beneath it.
    """
    scheme = scheme.lower()
    host = host.lower().removesuffix(_DEFAULT_PORTS.get(scheme, "\0"))
    method = "GET" if method.upper() == "HEAD" else method.upper()
    return _digest("http", zone, route, method, scheme, host, target)


def vary_key(names: Iterable[str], request_headers: HeaderInput) -> str:
    """Secondary key of a request among the responses stored under one primary key.

    Args:
        names: the field names the stored responses vary on (``httpcache.vary_names``).
        request_headers: the new request's fields; values are normalised as for matching
            (``httpcache.normalise_field_value``: whitespace, combined lines, RFC 9111 §4.1).

    Returns:
        32 hex digits; ``""`` when ``names`` is empty (one response per primary key).
    """
    pairs = vary_values(sorted({n.lower() for n in names}), request_headers)
    if not pairs:
        return ""
    parts: list[str] = []
    for name, value in pairs:
        parts += [name, "-" if value is None else f"={value}"]  # absent != empty (§4.1)
    return _digest("vary", *parts)


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) <= _SAFE_INT:
        return int(value)  # 1.0 -> 1 and -0.0 -> 0
    return value


def canonical_json(value: Any, *, drop: Iterable[str] = ()) -> bytes:
    """Canonical JSON bytes of a parsed JSON value.

    * object keys sorted, recursively (by code point);
    * numbers: an integral float up to 2^53 becomes an int (``1.0 == 1``, ``-0.0 == 0``);
      other floats print as the shortest repr that round-trips (``0.10`` == ``0.1``,
      ``1e2`` == ``100``); integers above 2^53 and floats there are not unified;
    * strings exact: no Unicode normalisation, no trimming;
    * ``drop``: top-level object fields left out (nested fields are kept).

    Raises:
        ValueError: nesting too deep to canonicalise.
    """
    if isinstance(value, dict) and drop:
        dropped = set(drop)
        value = {k: v for k, v in value.items() if k not in dropped}
    try:
        canon = _canonical(value)
    except RecursionError:
        raise ValueError("JSON body nested too deeply to canonicalise") from None
    return orjson.dumps(canon, option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True, slots=True)
class LlmKey:
    """An ``llm-exact`` key and what it was computed from.

    Args:
        key: 32 hex digits.
        canonical: the canonical body bytes hashed into the key (for debugging; user data).
        body: the parsed body as sent (``stream`` still in it), for ``is_deterministic``
            and for the stage to read ``stream``.
    """

    key: str
    canonical: bytes
    body: Any


def llm_key(
    body: bytes,
    *,
    zone: str,
    scope: str,
    route: str,
    path: str,
    ignore_fields: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> LlmKey:
    """Key of the ``llm-exact`` policy: same zone, scope, route, path and canonical body.

    Args:
        body: the buffered request body, JSON.
        zone: the request's residency zone.
        scope: who may share answers: the tenant id, or a tenant-configured scope string
            (two tenants sharing a scope share entries).
        route: the matched route's prefix, e.g. ``"/v1/"``.
        path: the request path (and query), e.g. ``"/v1/chat/completions"``: one route
            serves several endpoints, and the same body to ``/v1/embeddings`` and to
            ``/v1/completions`` asks different questions.
        ignore_fields: top-level body fields that do not change the answer for this route's
            backends, left out of the key (e.g. ``("user", "metadata")``); ``STREAM_FIELDS``
            are always left out.
        extra: further key parts from the route (e.g. a pinned API version header value).

    Raises:
        ValueError: the body is not valid JSON (orjson.JSONDecodeError is a ValueError), or
            too deeply nested. The request is then not cacheable.
    """
    parsed = orjson.loads(body)
    canonical = canonical_json(parsed, drop=(*STREAM_FIELDS, *ignore_fields))
    key = _digest("llm-exact", zone, scope, route, path, *extra, canonical)
    return LlmKey(key, canonical, parsed)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def nondeterminism(body: object, *, default_temperature: float | None) -> str | None:
    """Why a chat/completions body may not get the same answer twice, or None if it will.

    Rules, in order (returned tokens fit Cache-Status ``detail``):

    * ``"body"``: the body is not a JSON object.
    * ``"n"``: ``n`` (or ``best_of``) present and not 1: several choices are sampled, so they
      differ from each other and, by design, between calls; not cacheable.
    * ``"temperature"``: ``temperature`` present (not null) and not the number 0.
    * ``"temperature-default"``: ``temperature`` absent or null and the route's
      ``default_temperature`` (what its backend uses when none is sent) is None (unknown)
      or not 0.
    * ``seed`` never makes a request deterministic: OpenAI documents seeded sampling as
      best-effort, so ``seed`` with temperature > 0 is still ``"temperature"``; with
      temperature 0 it changes nothing. ``top_p`` alone (even 0) does not count either:
      backends treat ``top_p=0`` differently (some reject it, some clamp it).
    """
    if not isinstance(body, Mapping):
        return "body"
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is not None and not (_is_number(value) and value == 1):
            return "n"
    temperature = body.get("temperature")
    if temperature is None:
        return None if default_temperature == 0 else "temperature-default"
    if not (_is_number(temperature) and temperature == 0):
        return "temperature"
    return None


def is_deterministic(body: object, *, default_temperature: float | None) -> bool:
    """True when ``nondeterminism(body, ...)`` finds nothing: the answer may be cached.

    Args:
        body: the parsed request body (``LlmKey.body``).
        default_temperature: the temperature the route's backend uses when the body sends
            none; None when unknown (then a body without temperature is not deterministic).
    """
    return nondeterminism(body, default_temperature=default_temperature) is None
