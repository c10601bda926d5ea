"""Server-sent events: framing for the two dialects we write, and an incremental decoder.

Framing follows the WHATWG HTML standard, "Server-sent events" §9.2.5 ("event stream
format"). Two dialects differ only in line ends and field use:

* LangServe (``/{chain}/stream``): ``event:`` plus ``data:`` lines ending in CRLF, because
  LangServe answers through sse_starlette, whose default separator is ``"\\r\\n"``;
  events ``metadata``, ``data``, ``error`` and ``end`` (the last without data).
* OpenAI (``/v1/chat/completions`` with ``stream: true``): ``data:`` lines only, LF line
  ends, closed by ``data: [DONE]`` (OpenAI API reference, "Streaming").

``SSEDecoder`` parses either, fed any split of the bytes (one byte at a time included).

Rule: pure; no I/O, no awaits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "CRLF",
    "LF",
    "OPENAI_DONE",
    "SSE_HEADERS",
    "SSEDecoder",
    "ServerSentEvent",
    "encode_event",
]

CRLF, LF = b"\r\n", b"\n"
OPENAI_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-store",
    # Tell nginx-style proxies not to buffer the stream (sse_starlette sends it too).
    "X-Accel-Buffering": "no",
}
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


def encode_event(data: bytes | None, *, event: str | None = None, sep: bytes = LF) -> bytes:
    """Frame one event.

    Args:
        data: UTF-8 payload; each of its lines becomes one ``data:`` line. None writes no
            ``data:`` line (LangServe's ``end`` event).
        event: event type for an ``event:`` line, or None for the default ``message`` type.
        sep: line end, ``LF`` (OpenAI) or ``CRLF`` (LangServe, as sse_starlette writes it).

    Returns:
        The event's bytes, ending in a blank line.
    """
    parts: list[bytes] = []
    if event is not None:
        parts.append(b"event: " + event.encode() + sep)
    if data is not None:
        parts.extend(b"data: " + line + sep for line in _LINE_BREAK.split(data))
    parts.append(sep)
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event.

    Attributes:
        event: the ``event:`` field, ``"message"`` when absent (WHATWG default).
        data: the ``data:`` lines joined with ``"\\n"``.
        id: the last event id seen so far (WHATWG keeps it across events).
        retry: the ``retry:`` field in ms, or None.
    """

    event: str
    data: str
    id: str = ""
    retry: int | None = None


class SSEDecoder:
    """Incremental event-stream parser (WHATWG "event stream interpretation").

    Feed bytes as they arrive; a CR at the end of one chunk followed by LF at the start of
    the next counts as one line end. One liberty with the standard: an event with an empty
    data buffer is still dispatched when it set a field, as the httpx-sse and LangServe
    clients do, so that LangServe's data-less ``end`` event is seen.

    Usage::

        decoder = SSEDecoder()
        async for chunk in response.content.iter_any():
            for sse in decoder.feed(chunk):
                ...
    """

    __slots__ = ("_buffer", "_data", "_event", "_fields_seen", "_last_id", "_retry", "_started")

    def __init__(self) -> None:
        self._buffer = b""
        self._started = False
        self._event = ""
        self._data: list[str] = []
        self._last_id = ""
        self._retry: int | None = None
        self._fields_seen = False

    def __repr__(self) -> str:
        return f"<SSEDecoder buffered={len(self._buffer)}B pending_data_lines={len(self._data)}>"

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Consume ``chunk`` and return the events it completed, in order.

        Args:
            chunk: the next bytes of the stream, split anywhere.

        Returns:
            Events completed by a blank line in the bytes seen so far.
        """
        buffer = self._buffer + chunk
        if not self._started:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                self._buffer = buffer  # could still be a BOM: wait
                return []
            self._started = True
            buffer = buffer.removeprefix(_BOM)  # a leading UTF-8 BOM is ignored
        events: list[ServerSentEvent] = []
        start = 0
        for match in _LINE_BREAK.finditer(buffer):
            if match.group() == b"\r" and match.end() == len(buffer):
                break  # maybe the first half of CRLF: wait for the next byte
            self._line(buffer[start : match.start()].decode("utf-8", "replace"), events)
            start = match.end()
        self._buffer = buffer[start:]
        return events

    def _line(self, line: str, events: list[ServerSentEvent]) -> None:
        if not line:
            if self._fields_seen:
                events.append(
                    ServerSentEvent(
                        event=self._event or "message",
                        data="\n".join(self._data),
                        id=self._last_id,
                        retry=self._retry,
                    )
                )
            self._event, self._data, self._retry, self._fields_seen = "", [], None, False
            return
        if line.startswith(":"):
            return  # comment (keep-alive pings)
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" in value:
                return
            self._last_id = value
        elif name == "retry":
            if not value.isdigit():
                return
            self._retry = int(value)
        else:
            return  # unknown field: ignored
        self._fields_seen = True
