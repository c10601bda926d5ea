"""SSE framing (LangServe and OpenAI dialects) and the incremental decoder."""

from __future__ import annotations

import pytest

from backend.sse import CRLF, OPENAI_DONE, ServerSentEvent, SSEDecoder, encode_event

__all__: list[str] = []

LANGSERVE_STREAM = (
    encode_event(b'{"run_id": "r1"}', event="metadata", sep=CRLF)
    + encode_event(b'"Hel"', event="data", sep=CRLF)
    + encode_event(b'"lo \\u00e9"', event="data", sep=CRLF)
    + b": keep-alive comment\r\n\r\n"
    + encode_event(None, event="end", sep=CRLF)
)
OPENAI_STREAM = (
    encode_event(b'{"choices": [{"delta": {"content": "caf\xc3\xa9"}}]}')
    + encode_event(b"two\nlines")
    + OPENAI_DONE
)


def test_langserve_framing_matches_sse_starlette() -> None:
    assert encode_event(b'"x"', event="data", sep=CRLF) == b'event: data\r\ndata: "x"\r\n\r\n'
    assert encode_event(None, event="end", sep=CRLF) == b"event: end\r\n\r\n"


def test_openai_framing_is_data_only() -> None:
    assert encode_event(b"{}") == b"data: {}\n\n"
    assert encode_event(b"a\nb") == b"data: a\ndata: b\n\n"
    assert OPENAI_DONE == b"data: [DONE]\n\n"


def _decode(stream: bytes, split: str) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    if split == "whole":
        return decoder.feed(stream)
    events: list[ServerSentEvent] = []
    for i in range(len(stream)):
        events.extend(decoder.feed(stream[i : i + 1]))
    return events


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_decoder_reads_langserve_stream(split: str) -> None:
    events = _decode(LANGSERVE_STREAM, split)
    assert [(e.event, e.data) for e in events] == [
        ("metadata", '{"run_id": "r1"}'),
        ("data", '"Hel"'),
        ("data", '"lo \\u00e9"'),
        ("end", ""),
    ]


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_decoder_reads_openai_stream_with_multibyte_text(split: str) -> None:
    events = _decode(OPENAI_STREAM, split)
    assert [(e.event, e.data) for e in events] == [
        ("message", '{"choices": [{"delta": {"content": "café"}}]}'),
        ("message", "two\nlines"),
        ("message", "[DONE]"),
    ]


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_decoder_handles_every_line_end_bom_id_and_retry(split: str) -> None:
    stream = b"\xef\xbb\xbfid: 7\rretry: 1500\r\ndata: a\n\rdata: b\r\n\r\n"
    events = _decode(stream, split)
    assert events == [
        ServerSentEvent(event="message", data="a", id="7", retry=1500),
        ServerSentEvent(event="message", data="b", id="7", retry=None),
    ]


def test_decoder_waits_for_the_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: partial\r") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\r\n") == [ServerSentEvent(event="message", data="partial")]
