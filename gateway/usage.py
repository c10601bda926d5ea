"""LLM token usage from OpenAI-compatible answers, for the tokens-per-minute limit.

A non-streamed chat completion carries ``usage`` in its JSON body; a streamed one carries it
in a final chunk (``choices: []``) only when the request asked with
``stream_options.include_usage`` (OpenAI API reference, "Create chat completion"). The gateway
asks for it when the client did not, and strips that extra chunk again so the client sees
the stream it asked for.

Rule: this module parses bytes; it never reads a socket.
"""

from __future__ import annotations

import orjson

__all__ = ["SseUsageTap", "usage_from_json", "with_include_usage"]

_MAX_EVENT = 1 << 20  # bytes: a longer SSE event is passed through unparsed


def _total(usage: object) -> int | None:
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    if isinstance(total, int):
        return total
    parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    return sum(p for p in parts if isinstance(p, int)) if any(parts) else None


def usage_from_json(body: bytes) -> int | None:
    """Total tokens of a JSON answer's ``usage``, or None when it has none."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return _total(data.get("usage")) if isinstance(data, dict) else None


def with_include_usage(body: bytes) -> bytes | None:
    """The request body with ``stream_options.include_usage`` set, or None if unchanged.

    Only streamed chat requests (``"stream": true``) that did not ask are changed.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("stream") is not True:
        return None
    options = data.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None
    data["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
    }
    return orjson.dumps(data)


class SseUsageTap:
    """Watch an SSE stream for the usage chunk; optionally remove it.

    Events pass through as soon as they are complete (a blank line ends one, WHATWG HTML
    "Server-sent events"); only the partial event at the end of a chunk waits for the next.

    Args:
        strip: drop the usage-only chunk (``choices: []``) the gateway asked for.
    """

    __slots__ = ("_buffer", "_strip", "usage")

    def __init__(self, *, strip: bool) -> None:
        self._strip = strip
        self._buffer = b""
        self.usage: int | None = None

    def feed(self, chunk: bytes) -> bytes:
        """Take a chunk from the upstream; return the bytes to send to the client now."""
        data = self._buffer + chunk
        out: list[bytes] = []
        start = 0
        while True:
            end, sep = _event_end(data, start)
            if end < 0:
                break
            event = data[start : end + sep]
            if not self._consume(data[start:end]):
                out.append(event)
            start = end + sep
        self._buffer = data[start:]
        if len(self._buffer) > _MAX_EVENT:  # not an event stream we understand: pass it on
            out.append(self._buffer)
            self._buffer = b""
        return b"".join(out)

    def flush(self) -> bytes:
        """What is left at the end of the stream."""
        rest, self._buffer = self._buffer, b""
        return rest

    def _consume(self, event: bytes) -> bool:
        """Record usage from ``event``; True when the event is to be dropped."""
        if b'"usage"' not in event:
            return False
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            try:
                payload = orjson.loads(line[5:].strip())
            except orjson.JSONDecodeError:
                return False
            if not isinstance(payload, dict):
                return False
            total = _total(payload.get("usage"))
            if total is not None:
                self.usage = total
                return self._strip and payload.get("choices") == []
        return False


def _event_end(data: bytes, start: int) -> tuple[int, int]:
    """Index where the next event ends (before its blank line) and the separator length."""
    lf = data.find(b"\n\n", start)
    crlf = data.find(b"\r\n\r\n", start)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, 4
    return (lf, 2) if lf >= 0 else (-1, 0)
