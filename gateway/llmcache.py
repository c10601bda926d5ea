"""Cache stage, ``llm-exact`` policy: exact-match answers for LLM POSTs, per zone and tenant.

Covered endpoints: OpenAI-compatible ``.../chat/completions`` and LangServe ``.../invoke`` and
``.../stream``. The key (``gateway.cachekey.llm_key``) is the residency zone + the tenant (or
the route's share scope) + the route + the endpoint + the canonical JSON body, with the
``stream`` flag factored out: a streamed and a non-streamed request share one entry, and a
LangServe ``invoke`` and ``stream`` of the same chain share one too.

Request ``Cache-Control``: ``no-cache`` skips the lookup (the answer is still stored);
``no-store`` forbids storing but not answering from the cache (RFC 9111 §5.2.1.5).

An entry holds the *answer*, not the bytes of one response: the content, finish reason and
usage (OpenAI), or the output (LangServe). A hit is rendered in the dialect the request asks
for: JSON, or SSE (OpenAI chunks ending in ``[DONE]``; LangServe ``metadata``/``data``/``end``
events). Only complete 2xx answers are stored (a finish reason and a clean end of stream);
only deterministic requests are cached (``temperature`` 0, or absent when the route says its
backend defaults to 0). Identical concurrent misses are coalesced; when the upstream fails, an
entry within ``stale_if_error`` past its TTL is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from gateway.cachekey import llm_key, nondeterminism
from gateway.cachestore import CacheEntry, ZoneCaches
from gateway.errors import GatewayError
from gateway.httpcache import cache_status, request_cache_control
from gateway.pipeline import LocalReply

if TYPE_CHECKING:
    from gateway.cache import ResponseCapture
    from gateway.exchange import Exchange
    from gateway.metrics import Metrics
    from gateway.pipeline import BackgroundTasks

__all__ = [
    "Answer",
    "LlmCachePolicy",
    "LlmCacheStage",
    "answer_from_response",
    "endpoint_kind",
    "render_answer",
]

COALESCE_WAIT = 30.0  # seconds a coalesced request waits for the leader's answer
ANSWER_CACHE_SIZE = 1024  # parsed answers kept for repeated hits (entries, not bytes)
_BODY_LIMIT = 64 * 1024  # bytes: larger request bodies are not cached (never read whole here)


@dataclass(frozen=True, slots=True)
class LlmCachePolicy:
    """A route's ``llm-exact`` settings (from ``RouteCacheConfig``).

    Attributes:
        ttl: seconds an answer is served fresh.
        stale_if_error: seconds past ``ttl`` it may still be served when the upstream fails.
        max_entry_bytes: larger answers are not stored.
        default_temperature: what the route's backend uses when a body sends none (None:
            unknown, so such bodies are not cached).
        share_scope: entries are shared by tenants naming the same scope; None: per tenant.
        ignore_fields: top-level body fields left out of the key (e.g. ``user``).
    """

    ttl: float
    stale_if_error: float
    max_entry_bytes: int
    default_temperature: float | None
    share_scope: str | None
    ignore_fields: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Answer:
    """The dialect-free content of a complete answer.

    Attributes:
        kind: ``"openai"`` or ``"langserve"``.
        content: OpenAI message content.
        finish_reason: OpenAI finish reason.
        model: OpenAI model id.
        usage: OpenAI usage object, or None.
        output: LangServe output (any JSON value).
    """

    kind: str
    content: str = ""
    finish_reason: str | None = None
    model: str = ""
    usage: Mapping[str, Any] | None = None
    output: Any = None

    def to_json(self) -> bytes:
        """The entry body."""
        return orjson.dumps(
            {"kind": self.kind, "content": self.content, "finish_reason": self.finish_reason,
             "model": self.model, "usage": self.usage, "output": self.output}
        )  # fmt: skip

    @classmethod
    def from_json(cls, data: bytes) -> Answer | None:
        """Read an entry body; None when it is not one of ours."""
        try:
            d = orjson.loads(data)
            return cls(kind=d["kind"], content=d["content"], finish_reason=d["finish_reason"],
                       model=d["model"], usage=d["usage"], output=d["output"])  # fmt: skip
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None


def endpoint_kind(path: str) -> tuple[str, str] | None:
    """(kind, shared endpoint) of a cacheable LLM path, or None.

    ``/rag/invoke`` and ``/rag/stream`` share the endpoint ``/rag`` (one entry answers both).
    """
    if path.endswith("/chat/completions"):
        return "openai", path
    for suffix in ("/invoke", "/stream"):
        if path.endswith(suffix):
            return "langserve", path[: -len(suffix)]
    return None


def _sse_events(body: bytes) -> list[tuple[str, bytes]]:
    """(event name, data) of each SSE event (WHATWG HTML "Server-sent events")."""
    events = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        name, data = "message", []
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data.append(line[5:].lstrip())
        if data:
            events.append((name, b"\n".join(data)))
    return events


def answer_from_response(kind: str, content_type: str, body: bytes) -> Answer | None:
    """The Answer in a complete 2xx response body, or None when it is incomplete or odd.

    OpenAI JSON needs a ``finish_reason``; an OpenAI stream needs ``[DONE]`` and a finish
    reason; a LangServe stream needs its ``end`` event and no ``error`` event.
    """
    try:
        if kind == "openai" and "json" in content_type:
            d = orjson.loads(body)
            choice = d["choices"][0]
            if not choice.get("finish_reason"):
                return None
            return Answer("openai", content=choice["message"].get("content") or "",
                          finish_reason=choice["finish_reason"], model=d.get("model", ""),
                          usage=d.get("usage"))  # fmt: skip
        if kind == "openai" and "event-stream" in content_type:
            events = _sse_events(body)
            if not events or events[-1][1] != b"[DONE]":
                return None
            content, finish, model, usage = [], None, "", None
            for _, data in events[:-1]:
                chunk = orjson.loads(data)
                if "error" in chunk:
                    return None
                model = chunk.get("model", model)
                usage = chunk.get("usage") or usage
                for c in chunk.get("choices") or []:
                    content.append((c.get("delta") or {}).get("content") or "")
                    finish = c.get("finish_reason") or finish
            if finish is None:
                return None
            return Answer("openai", content="".join(content), finish_reason=finish,
                          model=model, usage=usage)  # fmt: skip
        if kind == "langserve" and "json" in content_type:
            return Answer("langserve", output=orjson.loads(body)["output"])
        if kind == "langserve" and "event-stream" in content_type:
            events = _sse_events(body)
            names = [n for n, _ in events]
            if "error" in names or not names or names[-1] != "end":
                return None
            chunks = [orjson.loads(d) for n, d in events if n == "data"]
            if all(isinstance(c, str) for c in chunks):
                return Answer("langserve", output="".join(chunks))
            return Answer("langserve", output=chunks[-1] if chunks else None)
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return None
    return None


def render_answer(
    answer: Answer, *, stream: bool, include_usage: bool, request_id: str
) -> tuple[bytes, str]:
    """(body, content type) of ``answer`` in the dialect and mode the request asks for."""
    if answer.kind == "openai":
        created = int(time.time())
        cid = f"chatcmpl-cached-{request_id}"
        if not stream:
            body = {"id": cid, "object": "chat.completion", "created": created,
                    "model": answer.model,
                    "choices": [{"index": 0, "message": {"role": "assistant",
                                 "content": answer.content}, "logprobs": None,
                                 "finish_reason": answer.finish_reason}]}  # fmt: skip
            if answer.usage is not None:
                body["usage"] = answer.usage
            return orjson.dumps(body), "application/json"

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            c: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                 "model": answer.model, "choices": [{"index": 0, "delta": delta,
                                 "logprobs": None, "finish_reason": finish}]}  # fmt: skip
            if include_usage:
                c["usage"] = None
            return b"data: " + orjson.dumps(c) + b"\n\n"

        parts = [chunk({"role": "assistant", "content": ""}, None)]
        if answer.content:
            parts.append(chunk({"content": answer.content}, None))
        parts.append(chunk({}, answer.finish_reason))
        if include_usage and answer.usage is not None:
            final = {"id": cid, "object": "chat.completion.chunk", "created": created,
                     "model": answer.model, "choices": [], "usage": answer.usage}  # fmt: skip
            parts.append(b"data: " + orjson.dumps(final) + b"\n\n")
        parts.append(b"data: [DONE]\n\n")
        return b"".join(parts), "text/event-stream"
    run_id = str(uuid.uuid4())
    if not stream:
        body = {"output": answer.output, "metadata": {"run_id": run_id, "feedback_tokens": []}}
        return orjson.dumps(body), "application/json"
    events = [
        b"event: metadata\r\ndata: " + orjson.dumps({"run_id": run_id}) + b"\r\n\r\n",
        b"event: data\r\ndata: " + orjson.dumps(answer.output) + b"\r\n\r\n",
        b"event: end\r\n\r\n",
    ]
    return b"".join(events), "text/event-stream"


class LlmCacheStage:
    """The ``llm-exact`` policy for the routes that name it.

    Args:
        caches: L1 and the per-zone L2 stores.
        routes: route prefix -> its policy.
        metrics: lookups by result and zone.
        tasks: background work (L2 writes).
    """

    name = "llm-cache"

    def __init__(
        self,
        caches: ZoneCaches,
        routes: Mapping[str, LlmCachePolicy],
        *,
        metrics: Metrics,
        tasks: BackgroundTasks,
    ) -> None:
        self._caches = caches
        self._routes = dict(routes)
        self._metrics = metrics
        self._tasks = tasks
        self._inflight: dict[str, asyncio.Future[None]] = {}
        # parsed answers of recently hit entries, so a hit does not parse JSON again; an
        # entry never changes once stored, so (key, stored_at) names its body
        self._answers: OrderedDict[tuple[str, float], Answer] = OrderedDict()

    async def on_request(self, ex: Exchange) -> LocalReply | None:
        """Answer a deterministic, cached LLM request from its entry; else prepare storing."""
        route, request = ex.route, ex.request
        if (
            route is None
            or request.method != "POST"
            or (p := self._routes.get(route.prefix)) is None
        ):
            return None
        kind = endpoint_kind(request.path)
        length = request.content_length
        if kind is None or length is None or length > _BODY_LIMIT:
            return self._bypass(ex, "not-cacheable")
        cc = request_cache_control(request.headers)
        body = await request.read()
        scope = p.share_scope or (ex.tenant.id if ex.tenant else "anonymous")
        try:
            k = llm_key(body, zone=ex.zone or "", scope=scope, route=route.prefix,
                        path=kind[1], ignore_fields=p.ignore_fields)  # fmt: skip
        except ValueError:
            return self._bypass(ex, "body")
        if kind[0] == "openai" and (
            why := nondeterminism(k.body, default_temperature=p.default_temperature)
        ):
            return self._bypass(ex, why)
        if kind[0] == "langserve" and p.default_temperature != 0:
            return self._bypass(ex, "temperature-default")
        stream = request.path.endswith("/stream") or (
            isinstance(k.body, dict) and k.body.get("stream") is True
        )
        # Request no-store forbids storing, not answering from what is stored (RFC 9111
        # §5.2.1.5); SSE clients (httpx-sse, so RemoteRunnable.stream) send it on every request.
        state: dict[str, Any] = {
            "key": k.key, "kind": kind[0], "stream": stream, "body": k.body,
            "no_store": cc.no_store,
        }  # fmt: skip
        ex.cache_state = state
        if not cc.no_cache:
            reply = await self._lookup(ex, state, p)
            if reply is not None:
                return reply
        if cc.no_store:
            ex.response_headers["Cache-Status"] = cache_status("fwd", fwd="request")
            return None
        if k.key not in self._inflight:
            self._inflight[k.key] = asyncio.get_running_loop().create_future()
            state["leader"] = True
        ex.capture = _capture(p.max_entry_bytes)
        ex.response_headers["Cache-Status"] = cache_status(
            "fwd", fwd="request" if cc.no_cache else "uri-miss"
        )
        return None

    async def _lookup(
        self, ex: Exchange, state: dict[str, Any], p: LlmCachePolicy
    ) -> LocalReply | None:
        key, zone = state["key"], ex.zone or ""
        entry = await self._caches.get(zone, key)
        collapsed = False
        if entry is None and (leader := self._inflight.get(key)) is not None:
            with contextlib.suppress(TimeoutError):  # then it goes forward itself
                await asyncio.wait_for(asyncio.shield(leader), COALESCE_WAIT)
            entry = await self._caches.get(zone, key)
            collapsed = True
        if entry is None:
            state["stale_entry"] = None
            return None
        fresh_until = float(entry.meta.get("fresh_until", 0))
        now = time.time()
        if now >= fresh_until:
            state["stale_entry"] = entry  # kept for stale-if-error
            return None
        self._count(ex, "coalesced" if collapsed else "hit")
        status = cache_status("hit", ttl=fresh_until - now, collapsed=collapsed)
        return self._reply(ex, entry, status)

    def _answer(self, entry: CacheEntry) -> Answer | None:
        """``Answer.from_json(entry.body)``, from a small LRU of recent hits."""
        ident = (entry.key, entry.stored_at)
        answer = self._answers.get(ident)
        if answer is not None:
            self._answers.move_to_end(ident)
            return answer
        answer = Answer.from_json(entry.body)
        if answer is not None:
            self._answers[ident] = answer
            if len(self._answers) > ANSWER_CACHE_SIZE:
                self._answers.popitem(last=False)
        return answer

    def _reply(self, ex: Exchange, entry: CacheEntry, status_field: str) -> LocalReply | None:
        answer = self._answer(entry)
        if answer is None:
            return None
        state = ex.cache_state or {}
        body = state.get("body")
        include_usage = bool(
            isinstance(body, dict)
            and isinstance(body.get("stream_options"), dict)
            and body["stream_options"].get("include_usage")
        )
        data, content_type = render_answer(
            answer, stream=state.get("stream", False), include_usage=include_usage,
            request_id=ex.request_id,
        )  # fmt: skip
        return LocalReply(200, data, {"Content-Type": content_type, "Cache-Status": status_field})

    def on_error(self, ex: Exchange, err: GatewayError) -> LocalReply | None:
        """Serve a stale answer instead of an upstream failure, within ``stale_if_error``."""
        state = ex.cache_state or {}
        entry: CacheEntry | None = state.get("stale_entry")
        if entry is None or err.status < 500 or time.time() >= entry.expires_at:
            return None
        self._count(ex, "stale")
        field = cache_status("hit", ttl=float(entry.meta.get("fresh_until", 0)) - time.time(),
                             detail=f"stale-if-error {err.slug}")  # fmt: skip
        return self._reply(ex, entry, field)

    def on_complete(self, ex: Exchange) -> None:
        """Store a complete deterministic 2xx answer; wake coalesced requests."""
        state = ex.cache_state
        if state is None or "key" not in state:
            return
        try:
            if ex.cache_result is None:
                self._count(ex, "miss")
            capture = ex.capture
            route = ex.route
            p = self._routes.get(route.prefix) if route is not None else None
            if (
                capture is None
                or p is None
                or ex.zone is None
                or not 200 <= capture.status < 300
                or (body := capture.body) is None
            ):
                return
            ctype = capture.headers.get("Content-Type", "")
            answer = answer_from_response(state["kind"], ctype, body)
            if answer is None:
                return
            now = time.time()
            assert route is not None
            entry = CacheEntry(
                key=state["key"], variant="", zone=ex.zone, route=route.prefix,
                tenant=ex.tenant.id if ex.tenant else None, status=200, headers=(),
                body=answer.to_json(), meta={"fresh_until": now + p.ttl},
                stored_at=now, expires_at=now + p.ttl + p.stale_if_error,
            )  # fmt: skip
            if self._caches.put_l1(entry):
                self._tasks.spawn(self._caches.put_l2(entry))
                self._metrics.cache_stores.labels(ex.zone).inc()
        finally:
            if state.get("leader"):
                future = self._inflight.pop(state["key"], None)
                if future is not None and not future.done():
                    future.set_result(None)

    def _bypass(self, ex: Exchange, why: str) -> LocalReply | None:
        self._count(ex, "bypass")
        ex.response_headers["Cache-Status"] = cache_status("fwd", fwd="bypass", detail=why)
        return None

    def _count(self, ex: Exchange, result: str) -> None:
        ex.cache_result = result
        self._metrics.cache_lookups.labels(result, ex.zone or "none").inc()


def _capture(limit: int) -> ResponseCapture:
    from gateway.cache import ResponseCapture

    return ResponseCapture(limit)
