"""The supervisor's admin listener: one admin API over the admin apps of every worker.

With ``--workers N`` each worker serves the usual admin app (``gateway.admin``) on a private
Unix socket; the supervisor owns ``admin.listen`` and answers there by fanning out:

* ``GET /metrics``: one scrape, merged from every worker's (``merge_expositions``):
  counters, histograms and summaries summed over identical label sets (a request counted by
  any worker counts once); gauges and other per-process state keep a ``worker`` label
  (the slot, ``"0"``..``"N-1"``): summing a breaker state or a cache size would be wrong.
* ``GET`` anything else (status, status page, config): worker 0's answer; ``/status`` JSON
  gains ``"workers": [{slot, pid, ready, restarts}]``.
* ``?worker=N`` on any route: only slot N's worker (its own metrics, status, ...).
* ``POST`` (drain, undrain, purge, reload): sent to every worker. The answer is
  ``{"workers": [{slot, pid, status, body}]}`` with the worst (highest) status of them.
* ``POST /workers/restart``: a rolling restart (the same as SIGUSR2), answered when done with
  each slot's old and new pid and how long the replacement took.
* ``GET /ready`` and ``GET /live`` (no token): the supervisor's own readiness.

Bearer auth is the one ``build_admin_app`` applies (``admin.token``; the GETs in
``admin.OPEN_PATHS`` open); the supervisor checks it and passes the header on, so workers
check it too.
Counters of a worker that exits leave the merged sums (a counter reset, which Prometheus'
``rate()`` handles); the merged view covers the workers alive at scrape time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.admin import bearer_auth
from gateway.errors import PROBLEM_CONTENT_TYPE, problem_bytes
from gateway.listener import probe_middleware

if TYPE_CHECKING:
    from collections.abc import Iterator

    from gateway.supervisor import Supervisor, Worker

__all__ = ["build_supervisor_admin_app", "merge_expositions"]

_SUMMED_TYPES = frozenset({"counter", "histogram", "summary", "gaugehistogram"})
_FORWARDED_HEADERS = ("Authorization", "Content-Type", "Accept")
CALL_TIMEOUT = 15.0  # seconds for one worker's admin answer (a reload or purge may take a while)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merge_expositions(texts: Sequence[tuple[str, str]]) -> bytes:
    """Merge Prometheus text expositions of several worker processes into one.

    Args:
        texts: ``(worker label, exposition text)`` pairs, e.g. ``[("0", "..."), ("1", "...")]``.

    Returns:
        One text exposition (format 0.0.4). Counter, histogram and summary samples with the
        same name and labels are summed, except ``_created`` timestamps, of which the earliest
        is kept; every other family (gauge, info, stateset, untyped) keeps each worker's
        samples apart under an added ``worker`` label.

    Raises:
        ValueError: a text is not a valid exposition (prometheus_client's parser).
    """
    merged: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for worker, text in texts:
        for family in text_string_to_metric_families(text):
            out = merged.get(family.name)
            if out is None:
                out = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                sums[family.name] = {}
            acc = sums[family.name]
            for s in family.samples:
                if family.type in _SUMMED_TYPES:
                    key = (s.name, tuple(sorted(s.labels.items())))
                    if s.name.endswith("_created"):
                        acc[key] = min(acc.get(key, s.value), s.value)
                    else:
                        acc[key] = acc.get(key, 0.0) + s.value
                else:
                    out.add_sample(s.name, {**s.labels, "worker": worker}, s.value, s.timestamp)
    for name, acc in sums.items():
        for (sample_name, labels), value in acc.items():
            merged[name].add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry)


async def _call(worker: Worker, request: web.Request, body: bytes) -> tuple[int, bytes, str]:
    """Send ``request`` (method, path and query, body) to ``worker``'s admin app.

    Returns:
        (status, body, content type); 502 with a problem body when the worker cannot answer.
    """
    headers = {h: request.headers[h] for h in _FORWARDED_HEADERS if h in request.headers}
    try:
        async with asyncio.timeout(CALL_TIMEOUT):
            async with worker.admin.request(
                request.method, f"http://worker{request.path_qs}", data=body, headers=headers
            ) as resp:
                return resp.status, await resp.read(), resp.content_type
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        detail = f"worker {worker.slot} (pid {worker.pid}) did not answer: {exc!r}"
        return (
            502,
            problem_bytes(
                status=502, title="Worker unreachable", slug="worker-down", detail=detail
            ),
            PROBLEM_CONTENT_TYPE,
        )


def _problem(status: int, title: str, slug: str, detail: str) -> web.Response:
    return web.Response(
        status=status,
        body=problem_bytes(status=status, title=title, slug=slug, detail=detail),
        content_type=PROBLEM_CONTENT_TYPE,
    )


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_INDENT_2),
        status=status,
        content_type="application/json",
    )


def build_supervisor_admin_app(supervisor: Supervisor, token: str | None) -> web.Application:
    """Build the supervisor's admin application (see the module docstring for the routes).

    Args:
        supervisor: the running supervisor: its live workers and rolling restart.
        token: ``admin.token``; required as ``Authorization: Bearer <token>`` on every route
            but the GETs in ``gateway.admin.OPEN_PATHS`` (metrics, probes, status page).
            None: no auth.

    Returns:
        The application; the supervisor runs it on ``admin.listen``.
    """
    auth = bearer_auth(token)

    def chosen(request: web.Request) -> list[Worker]:
        """Ready workers; only slot N's with ``?worker=N`` (debugging, tests)."""
        workers = supervisor.ready_workers()
        if "worker" in request.query:
            workers = [w for w in workers if str(w.slot) == request.query["worker"]]
        return workers

    async def metrics(request: web.Request) -> web.Response:
        workers = chosen(request)
        answers = await asyncio.gather(*(_call(w, request, b"") for w in workers))
        texts = [
            (str(w.slot), body.decode())
            for w, (status, body, _) in zip(workers, answers, strict=True)
            if status == 200
        ]
        return web.Response(
            body=merge_expositions(texts), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def restart(request: web.Request) -> web.Response:
        if supervisor.is_restarting:
            return _problem(409, "Restart running", "restart-running", "a restart is running")
        replaced = await supervisor.rolling_restart()
        failed = any(r.get("error") for r in replaced)
        return _json({"replaced": replaced}, status=500 if failed else 200)

    async def forward(request: web.Request) -> web.StreamResponse:
        workers = chosen(request)
        if not workers:
            return _problem(503, "No worker ready", "no-worker", "no such worker is ready")
        body = await request.read()
        if request.method in ("GET", "HEAD"):
            status, data, ctype = await _call(workers[0], request, body)
            if request.path == "/status" and status == 200 and ctype == "application/json":
                view = orjson.loads(data)
                view["workers"] = supervisor.workers_view()
                return _json(view)
            return web.Response(status=status, body=data, headers={"Content-Type": ctype})
        answers = await asyncio.gather(*(_call(w, request, body) for w in workers))
        combined = []
        for w, (status, data, ctype) in zip(workers, answers, strict=True):
            shown: object = data.decode(errors="replace")
            if ctype.endswith("json"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    shown = orjson.loads(data)
            combined.append({"slot": w.slot, "pid": w.pid, "status": status, "body": shown})
        return _json({"workers": combined}, status=max(status for status, _, _ in answers))

    app = web.Application(middlewares=[probe_middleware(lambda: supervisor.is_ready), auth])
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/workers/restart", restart)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app
