"""OpenAI-compatible routes, on the wire and through the official openai client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
from openai import AsyncOpenAI, OpenAI

from gateway.errors import PROBLEM_CONTENT_TYPE

__all__: list[str] = []

USER = [{"role": "user", "content": "What are the support hours?"}]


async def test_json_completion_shape_and_usage(client: Any) -> None:
    resp = await client.post(
        "/v1/chat/completions", json={"model": "geogate-rag", "messages": USER}
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "geogate-rag"
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert "Support hours in eu-west-1" in choice["message"]["content"]
    usage = body["usage"]
    assert usage["completion_tokens"] == len(choice["message"]["content"].split())
    assert usage["prompt_tokens"] > usage["completion_tokens"]  # the context is in the prompt
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_models_route(client: Any) -> None:
    body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["geogate-chat", "geogate-rag"]
    assert (await (await client.get("/v1/models/geogate-rag")).json())["id"] == "geogate-rag"
    missing = await client.get("/v1/models/gpt-4")
    assert missing.status == 404
    assert missing.content_type == PROBLEM_CONTENT_TYPE


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "gpt-4o", "messages": USER}, 404, "model"),
        ({"model": "geogate-chat", "messages": []}, 422, "messages"),
        ({"model": "geogate-chat"}, 422, "messages"),
        ({"messages": USER}, 422, "model"),
        ({"model": "geogate-chat", "messages": USER, "max_tokens": 0}, 422, "max_tokens"),
        ({"model": "geogate-chat", "messages": USER, "n": 2}, 422, "n"),
        (
            {"model": "geogate-chat", "messages": [{"role": "tool", "content": "x"}]},
            422,
            "messages.0.role",
        ),
    ],
)
async def test_bad_requests_are_problems_with_openai_error(
    client: Any, body: dict[str, Any], status: int, param: str
) -> None:
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == status
    assert resp.content_type == PROBLEM_CONTENT_TYPE
    problem = await resp.json()
    assert problem["status"] == status
    assert problem["error"]["param"] == param
    assert problem["error"]["type"] == "invalid_request_error"
    assert problem["error"]["message"] == problem["detail"]


async def test_stream_chunks_usage_and_done(client: Any, read_sse: Any) -> None:
    body = {
        "model": "geogate-chat",
        "messages": USER,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    record = await read_sse(resp)
    assert record.events[-1].data == "[DONE]"
    chunks = [orjson.loads(e.data) for e in record.events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *content, last, usage_chunk = chunks[1:]
    assert last["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert all(c["usage"] is None for c in chunks[:-1])
    assert usage_chunk["choices"] == []
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert usage_chunk["usage"]["completion_tokens"] == len(content) == len(text.split())
    plain = await client.post(
        "/v1/chat/completions", json={"model": "geogate-chat", "messages": USER}
    )
    answer = await plain.json()
    assert text == answer["choices"][0]["message"]["content"]
    assert usage_chunk["usage"] == answer["usage"]


async def test_stream_without_include_usage_has_no_usage(client: Any, read_sse: Any) -> None:
    body = {"model": "geogate-chat", "messages": USER, "stream": True}
    record = await read_sse(await client.post("/v1/chat/completions", json=body))
    chunks = [orjson.loads(e.data) for e in record.events[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.fixture
async def openai_client(make_server: Any) -> AsyncIterator[AsyncOpenAI]:
    server = await make_server("ap-southeast-1", ttft_ms=5, tokens_per_second=400)
    base_url = str(server.make_url("/v1"))
    async with AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
        yield client


async def test_async_openai_client(openai_client: AsyncOpenAI) -> None:
    completion = await openai_client.chat.completions.create(model="geogate-rag", messages=USER)
    content = completion.choices[0].message.content
    assert content is not None
    assert "Singapore Time" in content
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(content.split())
    models = await openai_client.models.list()
    assert [m.id for m in models.data] == ["geogate-chat", "geogate-rag"]


async def test_async_openai_client_streams_token_by_token(openai_client: AsyncOpenAI) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    stream = await openai_client.chat.completions.create(
        model="geogate-rag",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals: list[tuple[float, str]] = []
    usage = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append((loop.time(), chunk.choices[0].delta.content))
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(arrivals) > 10
    assert len({t for t, _ in arrivals}) > 5  # many separate arrivals, not one buffered body
    assert arrivals[0][0] < arrivals[-1][0]
    # Lower bound only (a sleep never ends early): ttft 5 ms, then 400 tokens/s.
    assert arrivals[-1][0] - started >= 0.005 + (len(arrivals) - 1) / 400 - 0.002
    assert usage is not None
    assert usage.completion_tokens == len(arrivals)
    assert "Singapore Time" in "".join(text for _, text in arrivals)


async def test_max_tokens_gives_finish_reason_length(openai_client: AsyncOpenAI) -> None:
    completion = await openai_client.chat.completions.create(
        model="geogate-chat", messages=USER, max_tokens=4
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == 'You asked: "What are'
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 4
    stream = await openai_client.chat.completions.create(
        model="geogate-chat", messages=USER, max_completion_tokens=3, stream=True
    )
    finishes = [c.choices[0].finish_reason async for c in stream if c.choices]
    assert finishes[-1] == "length"


async def test_openai_client_errors(openai_client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        await openai_client.chat.completions.create(model="gpt-4o", messages=USER)
    with pytest.raises(openai.UnprocessableEntityError):
        await openai_client.chat.completions.create(model="geogate-chat", messages=[])


async def test_sync_openai_client(make_server: Any) -> None:
    server = await make_server("us-east-1")
    base_url = str(server.make_url("/v1"))

    def ask() -> tuple[str | None, str]:
        with OpenAI(base_url=base_url, api_key="unused", max_retries=0) as sync_client:
            plain = sync_client.chat.completions.create(model="geogate-rag", messages=USER)
            stream = sync_client.chat.completions.create(
                model="geogate-rag", messages=USER, stream=True
            )
            streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            return plain.choices[0].message.content, streamed

    plain, streamed = await asyncio.to_thread(ask)
    assert plain == streamed
    assert "Eastern Time" in streamed
