"""W3C Trace Context (https://www.w3.org/TR/trace-context/): ``traceparent`` and ``tracestate``.

Rule: this module decides from header values; it reads no request and sends nothing. The
forwarder asks ``TraceContext.from_headers`` once per request and sends
``TraceContext.traceparent()`` (and ``tracestate`` when kept) upstream.

The gateway is one hop of the trace: it keeps the caller's trace-id and flags and names itself
as the parent of the upstream request with a span id of its own (section "Mutating the
traceparent Field": update parent-id). A missing or invalid ``traceparent`` starts a new trace
(section "tracestate Header": "If the vendor failed to parse traceparent, it MUST NOT attempt to
parse tracestate"), so ``tracestate`` is only ever passed on next to a valid ``traceparent``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

__all__ = [
    "MAX_TRACESTATE_CHARS",
    "MAX_TRACESTATE_MEMBERS",
    "TraceContext",
    "parse_traceparent",
    "parse_tracestate",
]

MAX_TRACESTATE_MEMBERS = 32  # "tracestate Header": more list-members -> discard it whole
MAX_TRACESTATE_CHARS = 512  # vendors SHOULD propagate at least 512 characters; our cap
_ZERO_TRACE_ID = "0" * 32
_ZERO_PARENT_ID = "0" * 16
_SAMPLED = 0x01

# version "-" trace-id "-" parent-id "-" trace-flags, lowercase hex only ("traceparent Header").
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# list-member = key "=" value ("tracestate Header" ABNF); key is simple-key or
# tenant-id "@" system-id,
# value is up to 256 printable ASCII characters but "," and "=", not ending in a space.
_KEY_CHARS = r"[a-z0-9_\-*/]"
_MEMBER_RE = re.compile(
    rf"(?:[a-z]{_KEY_CHARS}{{0,255}}|[a-z0-9]{_KEY_CHARS}{{0,240}}@[a-z]{_KEY_CHARS}{{0,13}})"
    r"=([\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e])"
)


def parse_traceparent(value: str) -> tuple[str, str, str] | None:
    """Parse one ``traceparent`` field value.

    Version ``00`` must be exactly 55 characters. A higher version (not ``ff``) is read as
    version 00 when its first 55 characters parse and are followed by nothing or by ``-``,
    and then only its sampled flag is kept (section "Versioning of traceparent").

    Args:
        value: the field value, e.g. ``"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"``.

    Returns:
        ``(trace_id, parent_id, flags)``: 32, 16 and 2 lowercase hex characters; None when the
        value is invalid: wrong length or layout, upper-case hex, version ``ff``, or an
        all-zero trace-id or parent-id (both "an invalid value").
    """
    value = value.strip(" \t")  # OWS around a field value is not part of it (RFC 9110 §5.5)
    m = _TRACEPARENT_RE.match(value)
    if m is None:
        return None
    version, trace_id, parent_id, flags = m.groups()
    if version == "00":
        if len(value) != 55:
            return None
    elif version == "ff" or (len(value) > 55 and value[55] != "-"):
        return None
    else:  # a future version: only the flags this version knows are carried on
        flags = "01" if int(flags, 16) & _SAMPLED else "00"
    if trace_id == _ZERO_TRACE_ID or parent_id == _ZERO_PARENT_ID:
        return None
    return trace_id, parent_id, flags


def parse_tracestate(values: Sequence[str]) -> str | None:
    """Validate the ``tracestate`` field lines of a request, combined as one list.

    Empty list-members (between commas, or whitespace) are allowed; every other member must
    be ``key=value`` as the "tracestate Header" ABNF spells them, and keys must be unique.

    Args:
        values: each ``tracestate`` field line as received, in order.

    Returns:
        The combined value (lines joined with ``","``, otherwise unchanged) to pass on, or None
        (drop it): no lines, more than ``MAX_TRACESTATE_MEMBERS`` members, longer than
        ``MAX_TRACESTATE_CHARS`` characters, a malformed member or a repeated key.
    """
    if not values:
        return None
    combined = values[0] if len(values) == 1 else ",".join(values)
    if len(combined) > MAX_TRACESTATE_CHARS:
        return None
    keys: set[str] = set()
    for member in combined.split(","):
        member = member.strip(" \t")
        if not member:
            continue
        if _MEMBER_RE.fullmatch(member) is None:
            return None
        key = member.partition("=")[0]
        if key in keys:
            return None
        keys.add(key)
        if len(keys) > MAX_TRACESTATE_MEMBERS:
            return None
    return combined


class TraceContext:
    """The trace one request belongs to, and the gateway's own span in it.

    Usage::

        trace = TraceContext.from_headers(
            request.headers.getall("traceparent", ()), request.headers.getall("tracestate", ())
        )
        upstream_headers["traceparent"] = trace.traceparent()

    Attributes:
        trace_id: 32 lowercase hex characters; the caller's, or new when it sent none valid.
        parent_id: the caller's span id (16 lowercase hex), or None when the trace began here.
        span_id: the gateway's span id (16 lowercase hex), sent upstream as the parent-id.
        flags: trace-flags, 2 lowercase hex characters; ``"00"`` for a trace begun here (the
            gateway records no trace data itself, so it does not claim "sampled").
        tracestate: the caller's validated ``tracestate`` to pass on unchanged, or None.
    """

    __slots__ = ("flags", "parent_id", "span_id", "trace_id", "tracestate")

    def __init__(
        self,
        *,
        trace_id: str,
        span_id: str,
        flags: str = "00",
        parent_id: str | None = None,
        tracestate: str | None = None,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.flags = flags
        self.parent_id = parent_id
        self.tracestate = tracestate

    @classmethod
    def from_headers(
        cls, traceparent: Sequence[str], tracestate: Sequence[str] = ()
    ) -> TraceContext:
        """Continue the caller's trace, or begin a new one.

        More than one ``traceparent`` line counts as invalid, as the W3C test suite expects
        ("test_traceparent_duplicated": the vendor restarts the trace).

        Args:
            traceparent: the request's ``traceparent`` field lines.
            tracestate: the request's ``tracestate`` field lines.

        Returns:
            A TraceContext with a fresh ``span_id``; ``tracestate`` only when ``traceparent``
            was valid (``parse_tracestate`` decides whether it is kept).
        """
        random_hex = os.urandom(24).hex()  # 16 bytes of trace-id + 8 of span id, one syscall
        span_id = random_hex[32:]
        if span_id == _ZERO_PARENT_ID:  # chance 2**-64, but all-zero ids are invalid
            span_id = "0" * 15 + "1"
        parsed = parse_traceparent(traceparent[0]) if len(traceparent) == 1 else None
        if parsed is None:
            trace_id = random_hex[:32]
            if trace_id == _ZERO_TRACE_ID:
                trace_id = "0" * 31 + "1"
            return cls(trace_id=trace_id, span_id=span_id)
        trace_id, parent_id, flags = parsed
        return cls(
            trace_id=trace_id,
            span_id=span_id,
            flags=flags,
            parent_id=parent_id,
            tracestate=parse_tracestate(tracestate),
        )

    def traceparent(self) -> str:
        """The ``traceparent`` value for the upstream request: version 00, our span as parent."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def __repr__(self) -> str:
        return (
            f"<TraceContext trace={self.trace_id} parent={self.parent_id} span={self.span_id}"
            f" flags={self.flags} tracestate={self.tracestate!r}>"
        )
