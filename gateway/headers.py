"""Header rewriting between client and upstream: hop-by-hop removal, forwarding headers, Via.

Rule: this module decides from header mappings; it never reads a socket.

Hop-by-hop fields (RFC 9110 §7.6.1, and RFC 2616 §13.5.1's list that proxies still honour) and
every field named in Connection are removed in both directions; a client's own copy of a field
the gateway sets for the upstream (``X-Residency-Zone``) is always removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "GATEWAY_SET_FIELDS",
    "HOP_BY_HOP",
    "connection_listed",
    "encode_head",
    "forwarded_element",
    "strip_hop_by_hop",
    "via_value",
    "without_field",
]

HOP_BY_HOP = (
    "Connection",
    "Keep-Alive",
    "Proxy-Connection",
    "TE",
    "Trailer",
    "Transfer-Encoding",
    "Upgrade",
    "Proxy-Authenticate",
    "Proxy-Authorization",
)
# Fields only the gateway may set towards the upstream; a client's copy is dropped.
GATEWAY_SET_FIELDS = ("X-Residency-Zone", "X-Served-Region", "X-Tenant-Id", "Expect", "Host")


def connection_listed(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> list[str]:
    """Field names listed in Connection (RFC 9110 §7.6.1), lower-case, without ``close``."""
    names: list[str] = []
    for value in headers.getall("Connection", ()):
        for token in value.split(","):
            token = token.strip().lower()
            if token and token not in ("close", "keep-alive"):
                names.append(token)
    return names


_DROP_SETS: dict[tuple[str, ...], frozenset[str]] = {}  # extra -> lower-case names dropped


def strip_hop_by_hop(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], extra: tuple[str, ...] = ()
) -> CIMultiDict[str]:
    """Return a copy of ``headers`` without hop-by-hop, Connection-listed and ``extra`` fields.

    One pass over ``headers``, keeping order and repeated fields; the set of names to drop is
    built once per ``extra`` (callers pass module constants).

    Args:
        headers: the received header fields (kept unchanged).
        extra: further field names to drop, any case.
    """
    drop = _DROP_SETS.get(extra)
    if drop is None:
        drop = frozenset(name.lower() for name in (*HOP_BY_HOP, *extra))
        if len(_DROP_SETS) < 64:
            _DROP_SETS[extra] = drop
    if "Connection" in headers:
        drop = drop.union(connection_listed(headers))
    return CIMultiDict(
        [(name, value) for name, value in headers.items() if name.lower() not in drop]
    )


_VIA: dict[tuple[tuple[int, int], str], str] = {}


def encode_head(
    start_line: str, fields: Iterable[tuple[str, str]], count: int, extra: Sequence[str] = ()
) -> bytes:
    """A message head as bytes: start line, fields, ``extra`` lines, the empty line.

    Field values travel as the parsers decoded them (UTF-8 with surrogateescape), so bytes
    that were not UTF-8 go out unchanged. The fields are joined by ``str.join`` over ``map``
    (no Python-level loop): the head is built twice per proxied request.

    Args:
        start_line: the request or status line, without CRLF.
        fields: ``(name, value)`` pairs, e.g. a multidict's ``items()``.
        count: how many pairs ``fields`` yields (``len`` of the mapping).
        extra: lines the caller adds (``Content-Length: 5\r\n``), each ending in CRLF.

    Raises:
        ValueError: the start line, a name or a value holds a CR or LF of its own (a header
            injection; RFC 9110 §5.5 forbids them in field values, RFC 9112 §3 in the start
            line).
    """
    joined = "\r\n".join(map(": ".join, fields))
    text = f"{start_line}\r\n{joined}\r\n{''.join(extra)}\r\n" if count else (
        f"{start_line}\r\n{''.join(extra)}\r\n"
    )  # fmt: skip
    lines = 2 + count + len(extra)
    if text.count("\n") != lines or text.count("\r") != lines:
        raise ValueError("CR or LF in a start line or header field")
    return text.encode("utf-8", "surrogateescape")


def without_field(fields: Iterable[tuple[str, str]], name: str) -> list[tuple[str, str]]:
    """``fields`` without those called ``name`` (case-insensitive; ``name`` lower case)."""
    return [(k, v) for k, v in fields if k.lower() != name]


def via_value(version: tuple[int, int], pseudonym: str) -> str:
    """One Via element for a message received as HTTP/``version`` (RFC 9110 §7.6.3)."""
    key = (version, pseudonym)
    value = _VIA.get(key)
    if value is None:
        value = f"{version[0]}.{version[1]} {pseudonym}"
        if len(_VIA) < 64:
            _VIA[key] = value
    return value


def forwarded_element(client: str | None, *, proto: str, host: str | None) -> str:
    """One RFC 7239 Forwarded element ``for=...;proto=...;host=...``.

    Args:
        client: the client's address as text, or None (-> ``for=unknown``, RFC 7239 §6.2).
        proto: ``http`` or ``https``.
        host: the Host the client asked for, or None.
    """
    if client is None:
        node = "unknown"
    elif ":" in client:  # IPv6: bracketed and quoted (RFC 7239 §6)
        node = f'"[{client}]"'
    else:
        node = client
    element = f"for={node};proto={proto}"
    if host:
        element += f';host="{host}"' if not _is_token(host) else f";host={host}"
    return element


def _is_token(value: str) -> bool:
    # RFC 9110 §5.6.2 token; a host with ':' (port) must be quoted in Forwarded.
    return all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in value)
