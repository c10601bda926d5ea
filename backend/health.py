"""The deep health probe: the model answers a one-token prompt, the retriever finds documents.

The probe runs the real model (without the offline model's TTFT and token delays: see
``models.health_model``) and the real retriever, each bounded by ``timeout`` seconds. Its
report is reused for ``ttl`` seconds and concurrent callers share one run (single flight),
so a probe storm (several gateways, or wrk on ``/health``) costs one model call per ``ttl``
rather than one per request, as Envoy's health-check filter ``cache_time`` does.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage

from backend.models import health_model
from backend.retriever import LexicalRetriever

__all__ = ["HEALTH_QUERY", "HealthProbe", "HealthReport"]

HEALTH_QUERY = "support hours region"
"""The retriever check's query; any non-empty corpus answers it (see ``retriever.py``)."""


@dataclass(frozen=True, slots=True)
class HealthReport:
    """One probe result.

    Attributes:
        checks: ``{"model": {...}, "retriever": {...}}``; each has ``ok`` and
            ``latency_ms``, a failed one a ``reason``, the retriever its ``documents`` count.
        checked_at: loop time of the probe (s).
    """

    checks: dict[str, dict[str, Any]]
    checked_at: float

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(check["ok"] for check in self.checks.values())

    def reasons(self) -> str:
        """``"check: reason; ..."`` for the failed checks."""
        return "; ".join(
            f"{name}: {check['reason']}" for name, check in self.checks.items() if not check["ok"]
        )


class HealthProbe:
    """Runs and memoises the deep probe.

    Args:
        model: the serving chat model (probed through ``health_model``).
        retriever: the region's retriever.
        region_dir: the documents folder, named in the "no documents" reason.
        timeout: bound on each check (s).
        ttl: how long a report is reused (s); 0 probes on every call.
    """

    def __init__(
        self,
        *,
        model: BaseChatModel,
        retriever: LexicalRetriever,
        region_dir: Path,
        timeout: float,
        ttl: float,
    ) -> None:
        self._model = health_model(model)
        self._retriever = retriever
        self._region_dir = region_dir
        self._timeout = timeout
        self._ttl = ttl
        self._last: HealthReport | None = None
        self._running: asyncio.Task[HealthReport] | None = None

    def __repr__(self) -> str:
        last = "never" if self._last is None else ("ok" if self._last.ok else "failing")
        return f"<HealthProbe last={last} running={self._running is not None} ttl={self._ttl}s>"

    async def report(self) -> HealthReport:
        """Return a report no older than ``ttl`` seconds, probing if needed.

        A caller that is cancelled leaves the shared probe running for the others.
        """
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and loop.time() - last.checked_at < self._ttl:
            return last
        if self._running is None:
            self._running = loop.create_task(self._probe())
            self._running.add_done_callback(self._finished)
        return await asyncio.shield(self._running)

    def close(self) -> None:
        """Cancel a probe still running (app cleanup)."""
        if self._running is not None:
            self._running.cancel()

    def _finished(self, task: asyncio.Task[HealthReport]) -> None:
        self._running = None
        if not task.cancelled() and task.exception() is None:
            self._last = task.result()

    async def _probe(self) -> HealthReport:
        loop = asyncio.get_running_loop()
        checks: dict[str, dict[str, Any]] = {}

        started = loop.time()
        try:
            async with asyncio.timeout(self._timeout):
                answer = await self._model.ainvoke([HumanMessage(content="ping")], max_tokens=1)
            ok = bool(answer.text)
            checks["model"] = {"ok": True} if ok else {"ok": False, "reason": "empty answer"}
        except Exception as exc:  # a failed check is a finding, not an error of the probe
            checks["model"] = {"ok": False, "reason": _reason(exc)}
        checks["model"]["latency_ms"] = round((loop.time() - started) * 1000, 3)

        started = loop.time()
        try:
            async with asyncio.timeout(self._timeout):
                documents = await self._retriever.ainvoke(HEALTH_QUERY)
            checks["retriever"] = {"ok": bool(documents), "documents": len(documents)}
            if not documents:
                checks["retriever"]["reason"] = (
                    f"retriever returned no documents ({self._region_dir} holds no *.md)"
                )
        except Exception as exc:
            checks["retriever"] = {"ok": False, "reason": _reason(exc)}
        checks["retriever"]["latency_ms"] = round((loop.time() - started) * 1000, 3)

        return HealthReport(checks=checks, checked_at=loop.time())


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"
