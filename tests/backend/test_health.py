"""The deep health probe: checks, time bounds, report reuse and single flight."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatResult

from backend.health import HealthProbe
from backend.models import OfflineChatModel
from backend.retriever import LexicalRetriever

__all__: list[str] = []

DOCS = [Document(page_content="Support hours are 9 to 5.")]


class _Silent(BaseChatModel):
    """A provider that never answers."""

    @property
    def _llm_type(self) -> str:
        return "silent"

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        raise NotImplementedError

    async def _agenerate(
        self, messages: list[BaseMessage], *args: Any, **kwargs: Any
    ) -> ChatResult:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def _probe(model: BaseChatModel, docs: list[Document], **kwargs: Any) -> HealthProbe:
    options: dict[str, Any] = {"timeout": 5.0, "ttl": 0.0, "region_dir": Path("/data/r")}
    options.update(kwargs)
    return HealthProbe(model=model, retriever=LexicalRetriever(documents=docs), **options)


async def test_healthy_report() -> None:
    report = await _probe(OfflineChatModel(ttft_ms=60_000), DOCS).report()
    assert report.ok
    assert report.checks["retriever"]["documents"] == 1
    assert report.reasons() == ""


async def test_silent_model_fails_within_the_timeout() -> None:
    async with asyncio.timeout(2):
        report = await _probe(_Silent(), DOCS, timeout=0.01).report()
    assert not report.ok
    assert report.checks["model"] == {
        "ok": False,
        "reason": "timed out",
        "latency_ms": report.checks["model"]["latency_ms"],
    }
    assert report.checks["retriever"]["ok"] is True


async def test_no_documents_names_the_folder() -> None:
    report = await _probe(OfflineChatModel(), []).report()
    assert not report.ok
    assert report.reasons() == "retriever: retriever returned no documents (/data/r holds no *.md)"


async def test_concurrent_callers_share_one_probe_and_ttl_reuses_it() -> None:
    probe = _probe(OfflineChatModel(), DOCS, ttl=0.0)
    first, second = await asyncio.gather(probe.report(), probe.report())
    assert first is second
    assert await probe.report() is not first  # ttl 0: a later call probes again
    cached = _probe(OfflineChatModel(), DOCS, ttl=60.0)
    assert await cached.report() is await cached.report()


async def test_a_cancelled_caller_leaves_the_probe_to_the_others() -> None:
    probe = _probe(OfflineChatModel(), DOCS)
    leaving = asyncio.ensure_future(probe.report())
    staying = asyncio.ensure_future(probe.report())
    await asyncio.sleep(0)  # both are waiting on the shared probe
    leaving.cancel()
    report = await staying
    assert report.ok
    assert leaving.cancelled()
