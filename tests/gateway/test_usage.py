"""Token usage from OpenAI answers; the SSE tap fed whole and byte by byte."""

from __future__ import annotations

import orjson
import pytest

from gateway.usage import SseUsageTap, usage_from_json, with_include_usage


def chunk(content: str) -> bytes:
    body = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


USAGE = b"data: " + orjson.dumps(
    {"object": "chat.completion.chunk", "choices": [],
     "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}}
) + b"\n\n"  # fmt: skip
STREAM = chunk("Hel") + chunk("lo") + USAGE + b"data: [DONE]\n\n"


def feed(tap: SseUsageTap, data: bytes, split: str) -> bytes:
    if split == "whole":
        return tap.feed(data) + tap.flush()
    return b"".join(tap.feed(data[i : i + 1]) for i in range(len(data))) + tap.flush()


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_tap_reads_usage_and_keeps_the_stream_when_the_client_asked(split: str) -> None:
    tap = SseUsageTap(strip=False)
    assert feed(tap, STREAM, split) == STREAM
    assert tap.usage == 42


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_tap_strips_the_chunk_the_gateway_asked_for(split: str) -> None:
    tap = SseUsageTap(strip=True)
    out = feed(tap, STREAM, split)
    assert out == chunk("Hel") + chunk("lo") + b"data: [DONE]\n\n"
    assert tap.usage == 42


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_tap_handles_crlf_framing(split: str) -> None:
    stream = STREAM.replace(b"\n\n", b"\r\n\r\n")
    tap = SseUsageTap(strip=False)
    assert feed(tap, stream, split) == stream
    assert tap.usage == 42


def test_tap_passes_events_on_as_soon_as_they_are_complete() -> None:
    tap = SseUsageTap(strip=True)
    first = chunk("Hel")
    assert tap.feed(first + first[:5]) == first  # the partial second event waits
    assert tap.feed(first[5:]) == first


def test_usage_from_json() -> None:
    assert usage_from_json(b'{"usage": {"total_tokens": 7}}') == 7
    assert usage_from_json(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}') == 7
    assert usage_from_json(b'{"output": "x"}') is None
    assert usage_from_json(b"not json") is None


def test_with_include_usage() -> None:
    asked = with_include_usage(b'{"stream": true, "messages": []}')
    assert asked is not None
    assert orjson.loads(asked)["stream_options"] == {"include_usage": True}
    assert with_include_usage(b'{"stream": false}') is None
    assert (
        with_include_usage(b'{"stream": true, "stream_options": {"include_usage": true}}') is None
    )
    kept = with_include_usage(b'{"stream": true, "stream_options": {"other": 1}}')
    assert kept is not None
    assert orjson.loads(kept)["stream_options"] == {"other": 1, "include_usage": True}
