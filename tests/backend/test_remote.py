"""LangServe wire format on aiohttp, checked on the wire and with langserve.RemoteRunnable."""

from __future__ import annotations

import asyncio
import uuid
import weakref
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from langserve import RemoteRunnable

from gateway.errors import PROBLEM_CONTENT_TYPE

__all__: list[str] = []

QUESTION = {"question": "What are the support hours?"}


def _is_uuid(value: str) -> bool:
    return str(uuid.UUID(value)) == value


@pytest.mark.parametrize("chain", ["chat", "rag"])
async def test_invoke_wire_format(client: Any, chain: str) -> None:
    resp = await client.post(
        f"/{chain}/invoke", json={"input": QUESTION, "config": {"tags": ["t"]}, "kwargs": {}}
    )
    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"output", "metadata"}
    assert body["output"].startswith('You asked: "What are the support hours?"')
    assert body["metadata"]["feedback_tokens"] == []
    assert _is_uuid(body["metadata"]["run_id"])


async def test_batch_wire_format(client: Any) -> None:
    inputs = [QUESTION, {"question": "Where is the data centre located?"}]
    resp = await client.post("/rag/batch", json={"inputs": inputs, "config": [{}, {}]})
    assert resp.status == 200
    body = await resp.json()
    assert [o.split('"')[1] for o in body["output"]] == [i["question"] for i in inputs]
    run_ids = body["metadata"]["run_ids"]
    assert len(set(run_ids)) == 2
    assert all(map(_is_uuid, run_ids))
    assert body["metadata"]["responses"] == [{"run_id": r, "feedback_tokens": []} for r in run_ids]


async def test_empty_batch(client: Any) -> None:
    resp = await client.post("/chat/batch", json={"inputs": []})
    assert await resp.json() == {"output": [], "metadata": {"responses": [], "run_ids": []}}


async def test_stream_wire_format(client: Any, read_sse: Any) -> None:
    invoked = await (await client.post("/rag/invoke", json={"input": QUESTION})).json()
    resp = await client.post("/rag/stream", json={"input": QUESTION})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-store"
    record = await read_sse(resp)
    kinds = [e.event for e in record.events]
    assert kinds[0] == "metadata"
    assert kinds[-1] == "end"
    assert set(kinds[1:-1]) == {"data"}
    assert _is_uuid(orjson.loads(record.events[0].data)["run_id"])
    assert record.events[-1].data == ""
    chunks = [orjson.loads(e.data) for e in record.of_type("data")]
    assert len(chunks) > 10
    assert "".join(chunks) == invoked["output"]
    raw = b"".join(chunk for _, chunk in record.reads)
    assert raw.startswith(b"event: metadata\r\ndata: ")
    assert raw.endswith(b"event: end\r\n\r\n")


async def test_stream_arrives_token_by_token(make_client: Any, read_sse: Any) -> None:
    client = await make_client(ttft_ms=5, tokens_per_second=400)
    started = asyncio.get_running_loop().time()
    resp = await client.post("/chat/stream", json={"input": {"question": "Which region?"}})
    record = await read_sse(resp)
    data_times = [
        t for t, e in zip(record.event_times, record.events, strict=True) if e.event == "data"
    ]
    assert len(record.reads) > 5  # separate network reads, not one buffered body
    assert len(data_times) > 10
    # the first token is in the client's hands while later ones are still being produced
    assert data_times[0] < data_times[-1]
    # Lower bound only (a sleep never ends early): ttft 5 ms, then 400 tokens/s.
    assert data_times[-1] - started >= 0.005 + (len(data_times) - 1) / 400 - 0.002


@pytest.mark.parametrize("chain", ["chat", "rag"])
async def test_schemas(client: Any, chain: str) -> None:
    input_schema = await (await client.get(f"/{chain}/input_schema")).json()
    assert input_schema["title"] == "QuestionInput"
    assert input_schema["required"] == ["question"]
    assert input_schema["properties"]["question"]["type"] == "string"
    output_schema = await (await client.get(f"/{chain}/output_schema")).json()
    assert output_schema["type"] == "string"


@pytest.mark.parametrize(
    ("path", "body", "status", "slug"),
    [
        ("/chat/invoke", b"{not json", 400, "invalid-json"),
        ("/chat/invoke", b"", 400, "invalid-json"),
        ("/chat/invoke", b"[1, 2]", 422, "invalid-input"),
        ("/chat/invoke", b'{"config": {}}', 422, "invalid-input"),
        ("/chat/invoke", b'{"input": {"q": "x"}}', 422, "invalid-input"),
        ("/chat/invoke", b'{"input": {"question": 5}}', 422, "invalid-input"),
        ("/rag/invoke", b'{"input": {"question": "x"}, "config": 3}', 422, "invalid-input"),
        ("/rag/stream", b'{"input": "just a string"}', 422, "invalid-input"),
        ("/rag/batch", b'{"inputs": {"question": "x"}}', 422, "invalid-input"),
        ("/rag/batch", b'{"inputs": [{"question": "x"}, {}]}', 422, "invalid-input"),
        (
            "/rag/batch",
            b'{"inputs": [{"question": "x"}], "config": [{}, {}]}',
            422,
            "invalid-input",
        ),
        ("/nope/invoke", b'{"input": {"question": "x"}}', 404, "unknown-chain"),
        ("/nope/stream", b"{}", 404, "unknown-chain"),
    ],
)
async def test_bad_requests_are_problem_details(
    client: Any, path: str, body: bytes, status: int, slug: str
) -> None:
    resp = await client.post(path, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == status
    assert resp.content_type == PROBLEM_CONTENT_TYPE
    problem = await resp.json()
    assert problem["type"].endswith("/" + slug)
    assert problem["status"] == status
    assert "Traceback" not in await resp.text()


async def test_validation_errors_locate_the_field(client: Any) -> None:
    resp = await client.post("/rag/batch", json={"inputs": [{"question": "x"}, {"q": 1}]})
    problem = await resp.json()
    assert problem["errors"] == [
        {"loc": ["inputs", 1, "question"], "msg": "Field required", "type": "missing"}
    ]


async def test_unknown_chain_schema_is_404(client: Any) -> None:
    resp = await client.get("/nope/input_schema")
    assert resp.status == 404
    assert (await resp.json())["chain"] == "nope"


def _detach_langserve_finalizer(remote: RemoteRunnable[Any, Any]) -> None:
    """Cancel the ``weakref.finalize`` RemoteRunnable registers to close its clients.

    langserve 0.3.3 closes the async client from that finalizer through a new
    ``ThreadPoolExecutor``; run by the cyclic GC inside another executor's ``submit`` (which
    holds ``concurrent.futures``' global shutdown lock) it deadlocks. We close the clients
    ourselves, so the finalizer has nothing left to do.
    """
    registry = weakref.finalize._registry  # type: ignore[attr-defined]
    for finalizer in list(registry):
        found = finalizer.peek()
        if found is not None and found[0] is remote:
            finalizer.detach()


@pytest.fixture
async def remote_rag(make_server: Any) -> AsyncIterator[RemoteRunnable[Any, Any]]:
    server = await make_server("eu-west-1", ttft_ms=1, tokens_per_second=2000)
    remote: RemoteRunnable[Any, Any] = RemoteRunnable(str(server.make_url("/rag")))
    _detach_langserve_finalizer(remote)
    yield remote
    await remote.async_client.aclose()
    remote.sync_client.close()


async def test_remote_runnable_async_api(remote_rag: RemoteRunnable[Any, Any]) -> None:
    answer = await remote_rag.ainvoke(QUESTION)
    assert "Support hours in eu-west-1 are Monday to Friday" in answer
    chunks = [chunk async for chunk in remote_rag.astream(QUESTION)]
    assert len(chunks) > 10
    assert "".join(chunks) == answer
    batch = await remote_rag.abatch([QUESTION, {"question": "Where is the data centre?"}])
    assert batch[0] == answer
    assert "Dublin" in batch[1]


async def test_remote_runnable_sync_api(remote_rag: RemoteRunnable[Any, Any]) -> None:
    # The sync client blocks, so it runs in a worker thread while the server uses the loop.
    answer = await asyncio.to_thread(remote_rag.invoke, QUESTION)
    chunks = await asyncio.to_thread(lambda: list(remote_rag.stream(QUESTION)))
    batch = await asyncio.to_thread(remote_rag.batch, [QUESTION, QUESTION])
    assert "".join(chunks) == answer
    assert batch == [answer, answer]


async def test_remote_runnable_surfaces_422(remote_rag: RemoteRunnable[Any, Any]) -> None:
    with pytest.raises(httpx.HTTPStatusError, match="422") as info:
        await remote_rag.ainvoke({"q": "missing question"})
    assert info.value.response.headers["Content-Type"] == PROBLEM_CONTENT_TYPE
