"""OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Shapes follow the OpenAI API reference ("Chat Completions": create, the chat completion
object, the chunk object; "Models": list, retrieve), so the official ``openai`` client works:

* JSON answer: ``object: "chat.completion"``, one choice with ``message``,
  ``finish_reason`` ``"stop"`` or ``"length"`` (``max_tokens`` /
  ``max_completion_tokens`` reached), and ``usage``.
* ``stream: true``: ``data:`` events of ``chat.completion.chunk`` objects: the first delta
  carries ``role``, then one delta per token, a last chunk with an empty delta and the
  ``finish_reason``; with ``stream_options.include_usage`` every chunk has ``usage: null``
  and one more chunk with ``choices: []`` carries the usage; then ``data: [DONE]``.

Models: ``geogate-chat`` runs the chat chain's prompt over the request's messages;
``geogate-rag`` adds the region's documents retrieved with the last user message. Only
text content, roles system / developer / user / assistant and ``n = 1`` are supported;
other fields (``seed``, ``user``, ``tools`` ...) are accepted and ignored. ``temperature``
and ``top_p`` are passed to a real provider; the offline model ignores them.

Errors are problem+json with an added OpenAI-style ``error`` member (``errors.py``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Annotated, Any, Literal, cast

import orjson
from aiohttp import web
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    BaseMessageChunk,
    HumanMessage,
    SystemMessage,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backend.errors import InvalidInput, UnknownModel
from backend.remote import validation_errors
from backend.runtime import CHAINS, read_json
from backend.sse import OPENAI_DONE, SSE_HEADERS, encode_event
from backend.text import count_tokens

__all__ = [
    "MODEL_IDS",
    "ChatCompletionRequest",
    "ChatMessage",
    "models_listing",
    "routes",
    "to_langchain",
]

log = logging.getLogger(__name__)

MODEL_IDS = {"geogate-chat": "chat", "geogate-rag": "rag"}
"""OpenAI model id -> chain whose prompt it uses."""
MODELS_CREATED = 1_767_225_600
"""``created`` of our models in ``/v1/models`` (Unix seconds, 2026-01-01T00:00:00Z)."""

routes = web.RouteTableDef()


class TextPart(BaseModel):
    """A ``{"type": "text", "text": ...}`` content part."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of ``messages`` (OpenAI API reference, chat completion message params)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The content as one string (text parts joined, None as "")."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` is read."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions`` that this backend reads.

    ``max_completion_tokens`` wins over the older ``max_tokens`` when both are given, as in
    the OpenAI API reference. ``stop`` takes up to 4 strings.
    """

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Literal[1] = 1
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the chat model call (only those the request set)."""
        kwargs: dict[str, Any] = {}
        limit = self.max_completion_tokens or self.max_tokens
        if limit is not None:
            kwargs["max_tokens"] = limit
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.top_p is not None:
            kwargs["top_p"] = self.top_p
        if self.stop:
            kwargs["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        return kwargs


def to_langchain(messages: list[ChatMessage]) -> list[BaseMessage]:
    """Convert OpenAI messages to LangChain messages.

    Args:
        messages: validated request messages.

    Returns:
        SystemMessage for ``system`` and ``developer`` (OpenAI's newer name for system
        instructions), HumanMessage for ``user``, AIMessage for ``assistant``.
    """
    out: list[BaseMessage] = []
    for message in messages:
        text = message.text()
        if message.role in ("system", "developer"):
            out.append(SystemMessage(content=text))
        elif message.role == "user":
            out.append(HumanMessage(content=text))
        else:
            out.append(AIMessage(content=text))
    return out


def models_listing() -> dict[str, Any]:
    """The ``GET /v1/models`` body: a list of model objects."""
    return {"object": "list", "data": [_model_object(model_id) for model_id in MODEL_IDS]}


def _model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": MODELS_CREATED, "owned_by": "geogate"}


def _parse(body: Any) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        errors = validation_errors(exc, "body")
        first = errors[0]
        where = ".".join(str(part) for part in first["loc"][1:]) or "body"
        raise InvalidInput(f"{where}: {first['msg']}", errors=errors, param=where) from exc


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Create a chat completion, as JSON or as a server-sent event stream.

    Raises:
        InvalidJson: 400. PayloadTooLarge: 413.
        InvalidInput: the body fails ``ChatCompletionRequest`` (422, ``param`` names the
            first offending field).
        UnknownModel: ``model`` is not one of ``MODEL_IDS`` (404).
    """
    req = _parse(await read_json(request))
    kind = MODEL_IDS.get(req.model)
    if kind is None:
        raise UnknownModel(
            f"The model {req.model!r} does not exist; try one of {sorted(MODEL_IDS)}",
            param="model",
        )
    chains = request.app[CHAINS]
    messages = to_langchain(req.messages)
    prompt = await chains.conversation_prompt(kind, messages)
    kwargs = req.model_kwargs()
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return await _stream(
            request,
            cast("AsyncGenerator[BaseMessageChunk, None]", chains.model.astream(prompt, **kwargs)),
            head={
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": req.model,
            },
            include_usage=include_usage,
            prompt_text=prompt.to_string(),
        )
    answer = await chains.model.ainvoke(prompt, **kwargs)
    text = answer.text
    usage = answer.usage_metadata
    prompt_tokens = usage["input_tokens"] if usage else count_tokens(prompt.to_string())
    completion_tokens = usage["output_tokens"] if usage else count_tokens(text)
    body = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": req.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": answer.response_metadata.get("finish_reason") or "stop",
            }
        ],
        "usage": _usage(prompt_tokens, completion_tokens),
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _stream(
    request: web.Request,
    chunks: AsyncGenerator[BaseMessageChunk, None],
    *,
    head: dict[str, Any],
    include_usage: bool,
    prompt_text: str,
) -> web.StreamResponse:
    """Write the model's chunks as ``chat.completion.chunk`` events; headers go with the first.

    A failure before the first chunk propagates (an HTTP error); after it, a
    ``data: {"error": {...}}`` event ends the stream, which the ``openai`` client raises as
    ``APIError``.
    """
    response = web.StreamResponse(headers=SSE_HEADERS)
    extra = {"usage": None} if include_usage else {}

    def frame(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return encode_event(orjson.dumps({**head, "choices": [choice], **extra}))

    prompt_tokens = completion_tokens = 0
    reported = False
    finish_reason = "stop"
    emitted: list[str] = []
    try:
        async with aclosing(chunks) as stream:
            async for chunk in stream:
                if not response.prepared:
                    await response.prepare(request)
                    await response.write(frame({"role": "assistant", "content": ""}))
                if text := chunk.text:
                    emitted.append(text)
                    await response.write(frame({"content": text}))
                if usage := getattr(chunk, "usage_metadata", None):  # on AIMessageChunk only
                    reported = True
                    prompt_tokens += usage["input_tokens"]
                    completion_tokens += usage["output_tokens"]
                finish_reason = chunk.response_metadata.get("finish_reason") or finish_reason
    except Exception:
        if not response.prepared:
            raise
        if request.transport is None or request.transport.is_closing():
            return response  # the client left: nobody to tell
        log.exception("model failed mid-stream (%s)", head["id"])
        error = {"error": {"message": "The model failed mid-stream", "type": "server_error"}}
        await response.write(encode_event(orjson.dumps(error)))
        await response.write_eof()
        return response
    if not response.prepared:
        await response.prepare(request)
        await response.write(frame({"role": "assistant", "content": ""}))
    await response.write(frame({}, finish_reason))
    if include_usage:
        if not reported:
            prompt_tokens = count_tokens(prompt_text)
            completion_tokens = count_tokens("".join(emitted))
        usage = {**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}
        await response.write(encode_event(orjson.dumps(usage)))
    await response.write(OPENAI_DONE)
    await response.write_eof()
    return response


_MODELS_BODY = orjson.dumps(models_listing())


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    """List ``geogate-chat`` and ``geogate-rag`` (OpenAI API reference, "List models")."""
    return web.Response(body=_MODELS_BODY, content_type="application/json")


@routes.get("/v1/models/{model}")
async def retrieve_model(request: web.Request) -> web.Response:
    """Describe one model (OpenAI API reference, "Retrieve model").

    Raises:
        UnknownModel: no such model (404).
    """
    model_id = request.match_info["model"]
    if model_id not in MODEL_IDS:
        raise UnknownModel(f"The model {model_id!r} does not exist", param="model")
    return web.Response(body=orjson.dumps(_model_object(model_id)), content_type="application/json")
