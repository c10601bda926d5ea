"""App-wide behaviour: residency guard, X-Served-Region, problems, limits, health, readiness."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.runnables import RunnableGenerator, RunnableLambda

from backend import completions, remote
from backend.app import begin_drain, build_app, guard
from backend.chains import build_chains
from backend.models import OfflineChatModel
from backend.retriever import LexicalRetriever
from backend.runtime import CHAINS, SETTINGS
from gateway.errors import PROBLEM_CONTENT_TYPE

__all__: list[str] = []

ASK = {"input": {"question": "What are the support hours?"}}


async def test_requests_without_residency_header_are_served(client: Any) -> None:
    resp = await client.post("/rag/invoke", json=ASK)
    assert resp.status == 200
    assert resp.headers["X-Served-Region"] == "eu-west-1"


@pytest.mark.parametrize("zone", ["eu", "global", "EU", " eu "])
async def test_zones_the_region_serves_are_allowed(client: Any, zone: str) -> None:
    resp = await client.post("/chat/invoke", json=ASK, headers={"X-Residency-Zone": zone})
    assert resp.status == 200


@pytest.mark.parametrize("path", ["/chat/invoke", "/v1/chat/completions", "/health", "/nope"])
@pytest.mark.parametrize("zone", ["us", "", "eu-west"])
async def test_foreign_zone_is_refused_with_451(client: Any, path: str, zone: str) -> None:
    resp = await client.post(path, json=ASK, headers={"X-Residency-Zone": zone})
    assert resp.status == 451
    assert resp.content_type == PROBLEM_CONTENT_TYPE
    assert resp.headers["X-Served-Region"] == "eu-west-1"
    problem = await resp.json()
    assert problem["type"] == "https://geogate.dev/problems/residency-mismatch"
    assert (problem["zone"], problem["region"], problem["zones"]) == (
        zone,
        "eu-west-1",
        ["eu", "global"],
    )


async def test_openai_routes_get_an_openai_error_member_on_451(client: Any) -> None:
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "geogate-chat", "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-Residency-Zone": "us"},
    )
    assert (await resp.json())["error"]["code"] == "residency-mismatch"


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/ready", None, 200),
        ("GET", "/health", None, 200),
        ("POST", "/chat/invoke", ASK, 200),
        ("POST", "/chat/stream", ASK, 200),
        ("GET", "/rag/input_schema", None, 200),
        ("GET", "/v1/models", None, 200),
        ("GET", "/", None, 404),
        ("GET", "/no/such/route", None, 404),
        ("POST", "/nope/invoke", ASK, 404),
        ("GET", "/chat/invoke", None, 405),
        ("POST", "/chat/invoke", {"input": {}}, 422),
    ],
)
async def test_every_response_says_which_region_served_it(
    client: Any, method: str, path: str, body: Any, status: int
) -> None:
    resp = await client.request(method, path, json=body)
    assert resp.status == status
    assert resp.headers["X-Served-Region"] == "eu-west-1"
    await resp.read()


async def test_unknown_route_and_method_are_problems(client: Any) -> None:
    missing = await client.get("/nowhere")
    assert missing.content_type == PROBLEM_CONTENT_TYPE
    assert (await missing.json())["type"].endswith("/route-not-found")
    wrong_method = await client.get("/chat/invoke")
    assert wrong_method.headers["Allow"] == "POST"
    assert (await wrong_method.json())["type"].endswith("/method-not-allowed")


async def test_oversized_body_is_413(make_client: Any) -> None:
    client = await make_client(max_body_bytes=1024)
    big = orjson.dumps({"input": {"question": "x" * 2000}})
    resp = await client.post("/chat/invoke", data=big)
    assert resp.status == 413
    assert resp.headers["X-Served-Region"] == "eu-west-1"
    problem = await resp.json()
    assert problem["type"].endswith("/payload-too-large")
    assert problem["max_body_bytes"] == 1024


async def test_oversized_chunked_body_is_413(make_client: Any) -> None:
    client = await make_client(max_body_bytes=1024)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b" " * 256  # no Content-Length: the limit is enforced while reading

    resp = await client.post("/v1/chat/completions", data=body())
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload-too-large"


async def test_body_at_the_limit_is_accepted(make_client: Any) -> None:
    raw = orjson.dumps(ASK)
    client = await make_client(max_body_bytes=len(raw))
    assert (await client.post("/chat/invoke", data=raw)).status == 200


async def test_health_runs_model_and_retriever(make_client: Any) -> None:
    client = await make_client("eu-central-1", ttft_ms=60_000, tokens_per_second=0.001)
    resp = await client.get("/health")  # would take a minute if the probe used the delays
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ok"
    assert (body["region"], body["zones"], body["provider"]) == (
        "eu-central-1",
        ["eu", "global"],
        "offline",
    )
    assert body["checks"]["model"]["ok"] is True
    assert body["checks"]["retriever"] == {
        "ok": True,
        "documents": 3,
        "latency_ms": body["checks"]["retriever"]["latency_ms"],
    }


async def test_health_reuses_a_fresh_report(make_client: Any) -> None:
    client = await make_client(health_ttl=60)
    first = await (await client.get("/health")).json()
    second = await (await client.get("/health")).json()
    assert second["checks"] == first["checks"]  # same probe, latencies included
    assert second["age_s"] >= first["age_s"]


async def test_health_is_503_when_the_region_has_no_documents(
    make_client: Any, empty_region: tuple[str, Path]
) -> None:
    region, data_dir = empty_region
    client = await make_client(region, data_dir=data_dir)
    resp = await client.get("/health")
    assert resp.status == 503
    assert resp.content_type == PROBLEM_CONTENT_TYPE
    assert resp.headers["X-Served-Region"] == region
    assert resp.headers["Retry-After"] == "1"
    problem = await resp.json()
    assert problem["type"].endswith("/unhealthy")
    assert problem["checks"]["model"]["ok"] is True
    assert problem["checks"]["retriever"]["ok"] is False
    assert str(data_dir / region) in problem["detail"]
    # cheap readiness does not look at documents, and rag still answers (from nothing)
    assert (await client.get("/ready")).status == 200
    answer = await (await client.post("/rag/invoke", json=ASK)).json()
    assert "I found nothing about that" in answer["output"]


async def test_ready_then_draining(client: Any) -> None:
    resp = await client.get("/ready")
    assert resp.status == 200
    assert await resp.json() == {"status": "ready", "region": "eu-west-1"}
    begin_drain(client.app)
    for path in ("/ready", "/health"):
        resp = await client.get(path)
        assert resp.status == 503
        problem = await resp.json()
        assert (problem["type"].rsplit("/", 1)[1], problem["phase"]) == ("not-ready", "draining")
    # requests still in flight on open connections are served while draining
    assert (await client.post("/chat/invoke", json=ASK)).status == 200


async def test_rag_answers_differ_per_region_and_show_region_content(make_client: Any) -> None:
    expected = {
        "us-east-1": "Northern Virginia",
        "eu-west-1": "Dublin, Ireland",
        "eu-central-1": "Frankfurt am Main",
        "ap-southeast-1": "located in Singapore",
    }
    answers = {}
    for region, place in expected.items():
        client = await make_client(region)
        body = {"input": {"question": "Where is the data centre located?"}}
        resp = await client.post("/rag/invoke", json=body)
        assert resp.headers["X-Served-Region"] == region
        answers[region] = (await resp.json())["output"]
        assert place in answers[region]
        assert region in answers[region]
        again = await (await client.post("/rag/invoke", json=body)).json()
        assert again["output"] == answers[region]  # deterministic
    assert len(set(answers.values())) == len(expected)


# --- failures inside a chain: real middleware and routes, a chain that raises -------------


def _boom(_: Any) -> str:
    raise RuntimeError("secret upstream detail")


async def _two_then_boom(chunks: AsyncIterator[Any]) -> AsyncIterator[str]:
    async for _ in chunks:
        pass
    yield "partial "
    yield "answer"
    raise RuntimeError("secret upstream detail")


class _FailingMidStream(OfflineChatModel):
    async def _astream(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Any:
        count = 0
        async for chunk in super()._astream(messages, *args, **kwargs):
            count += 1
            if count > 2:
                raise RuntimeError("secret upstream detail")
            yield chunk

    def _stream(self, *args: Any, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        raise NotImplementedError


@pytest.fixture
async def failing_client(aiohttp_client: Any, make_settings: Any) -> Any:
    """The real guard and routes over chains whose runnables fail."""
    settings = make_settings()
    model = _FailingMidStream()
    chains = build_chains(
        region=settings.region, zones=settings.zones, model=model, retriever=LexicalRetriever()
    )
    chains = replace(chains, chat=RunnableLambda(_boom), rag=RunnableGenerator(_two_then_boom))
    app = web.Application(middlewares=[guard])
    app[SETTINGS] = settings
    app[CHAINS] = chains
    app.router.add_routes(completions.routes)
    app.router.add_routes(remote.routes)
    return await aiohttp_client(app)


async def test_chain_failure_is_a_500_problem_without_details(failing_client: Any) -> None:
    for path in ("/chat/invoke", "/chat/stream", "/chat/batch"):
        body = {"inputs": [ASK["input"]]} if path.endswith("batch") else ASK
        resp = await failing_client.post(path, json=body)
        assert resp.status == 500
        assert resp.content_type == PROBLEM_CONTENT_TYPE
        text = await resp.text()
        assert "secret" not in text
        assert "Traceback" not in text


async def test_failure_mid_stream_sends_langserve_error_event(
    failing_client: Any, read_sse: Any
) -> None:
    record = await read_sse(await failing_client.post("/rag/stream", json=ASK))
    assert [e.event for e in record.events] == ["metadata", "data", "data", "error"]
    assert orjson.loads(record.events[-1].data) == {
        "status_code": 500,
        "message": "Internal Server Error",
    }


async def test_failure_mid_stream_sends_openai_error_event(
    failing_client: Any, read_sse: Any
) -> None:
    body = {"model": "geogate-chat", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    record = await read_sse(await failing_client.post("/v1/chat/completions", json=body))
    last = orjson.loads(record.events[-1].data)
    assert last == {"error": {"message": "The model failed mid-stream", "type": "server_error"}}
    assert all(e.data != "[DONE]" for e in record.events)


def test_build_app_does_no_io(tmp_path: Path, make_settings: Any) -> None:
    app = build_app(make_settings("nowhere-1", data_dir=tmp_path))  # folder checked at startup
    assert app[SETTINGS].region_dir == tmp_path / "nowhere-1"
