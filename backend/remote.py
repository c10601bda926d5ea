"""LangServe-style routes, so that ``langserve.RemoteRunnable`` works against this backend.

The wire format is LangServe 0.3's (``langserve/api_handler.py``, ``client.py``,
``serialization.py``), reimplemented on aiohttp because LangServe is deprecated and pulls in
FastAPI:

* ``POST /{chain}/invoke`` ``{"input": ..., "config": {...}, "kwargs": {...}}`` ->
  ``{"output": ..., "metadata": {"run_id": "<uuid>", "feedback_tokens": []}}``
* ``POST /{chain}/batch`` ``{"inputs": [...], "config": {...} | [{...}, ...]}`` ->
  ``{"output": [...], "metadata": {"responses": [{"run_id", "feedback_tokens"}, ...],
  "run_ids": [...]}}``
* ``POST /{chain}/stream`` -> ``text/event-stream``: ``metadata`` (``{"run_id": ...}``)
  just before the first ``data`` event, one ``data`` event per output chunk (JSON), then
  ``end``; on a failure after the first byte, ``error`` with
  ``{"status_code": 500, "message": "Internal Server Error"}`` (LangServe never sends the
  exception text) and the stream ends.
* ``GET /{chain}/input_schema`` / ``output_schema`` -> the runnable's JSON Schema.

As in LangServe's ``add_routes`` defaults, only ``config["configurable"]`` would be honoured
(``config_keys=("configurable",)``) and our chains have no configurable fields, so the
config is checked for shape and otherwise ignored; ``kwargs`` is ignored too. Differences:
errors are problem+json (400/404/413/422) rather than FastAPI's ``{"detail": ...}``, and a
stream sends its headers with the first chunk, so that a failure before any output is a
plain HTTP error a gateway may retry.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, cast

import orjson
from aiohttp import web
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import BaseModel, ValidationError

from backend.errors import InvalidInput, UnknownChain
from backend.runtime import CHAINS, read_json
from backend.sse import CRLF, SSE_HEADERS, encode_event

__all__ = ["BATCH_CONCURRENCY", "dumps_output", "routes", "validation_errors"]

log = logging.getLogger(__name__)

BATCH_CONCURRENCY = 8
"""Inputs of one batch request run at most this many at a time."""

_END = encode_event(None, event="end", sep=CRLF)
_STREAM_ERROR = encode_event(
    orjson.dumps({"status_code": 500, "message": "Internal Server Error"}), event="error", sep=CRLF
)

routes = web.RouteTableDef()


def _lc_default(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dumps_output(obj: Any) -> bytes:
    """Serialise a runnable's output as LangServe's ``WellKnownLCSerializer.dumps`` does.

    Args:
        obj: output or chunk: JSON types, or pydantic models such as messages and Documents.

    Returns:
        JSON bytes (orjson, pydantic models through ``model_dump()``).
    """
    return orjson.dumps(obj, default=_lc_default)


def validation_errors(exc: ValidationError, *prefix: str | int) -> list[dict[str, Any]]:
    """Return pydantic errors as FastAPI reports them, each ``loc`` prefixed.

    Args:
        exc: the validation error.
        prefix: path of the validated value in the request, e.g. ``("inputs", 2)``.

    Returns:
        ``[{"loc": [...], "msg": ..., "type": ...}, ...]``.
    """
    return [
        {"loc": [*prefix, *err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


def _chain(request: web.Request) -> tuple[str, Runnable[Any, Any]]:
    name = request.match_info["chain"]
    chain = request.app[CHAINS].by_name(name)
    if chain is None:
        raise UnknownChain(f"no chain {name!r}; this backend serves 'chat' and 'rag'", chain=name)
    return name, chain


def _shape_error(detail: str, loc: list[str | int], msg: str, type_: str) -> InvalidInput:
    return InvalidInput(detail, errors=[{"loc": loc, "msg": msg, "type": type_}])


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _shape_error(
            "body must be a JSON object", ["body"], "Input should be an object", "dict_type"
        )
    return body


def _check_config(config: Any, *loc: str | int) -> None:
    if config is not None and not isinstance(config, dict):
        raise _shape_error(
            "config must be an object", [*loc], "Input should be an object", "dict_type"
        )


def _single_input(chain: Runnable[Any, Any], body: dict[str, Any]) -> Any:
    if "input" not in body:
        raise _shape_error("body has no 'input'", ["body", "input"], "Field required", "missing")
    _check_config(body.get("config"), "body", "config")
    return _validated_input(chain, body["input"], "input")


def _validated_input(chain: Runnable[Any, Any], value: Any, *loc: str | int) -> Any:
    # langchain-core types it as pydantic v1 or v2; these chains are built with v2 models
    model = cast("type[BaseModel]", chain.get_input_schema())
    try:
        validated = model.model_validate(value)
    except ValidationError as exc:
        errors = validation_errors(exc, *loc)
        raise InvalidInput(
            f"{'.'.join(map(str, loc))} does not match the input schema", errors=errors
        ) from exc
    # LangServe's ``_unpack_input``: the runnable gets the dict, not the pydantic model.
    return validated.model_dump()


def _run_config(name: str, run_id: uuid.UUID, **extra: Any) -> RunnableConfig:
    return cast(RunnableConfig, {"run_id": run_id, "run_name": name, **extra})


def _client_left(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _json(body: Any) -> web.Response:
    return web.Response(body=dumps_output(body), content_type="application/json")


@routes.post("/{chain}/invoke")
async def invoke(request: web.Request) -> web.Response:
    """Run the chain once (LangServe ``invoke``).

    Raises:
        UnknownChain: 404. InvalidJson: 400. PayloadTooLarge: 413.
        InvalidInput: no ``input``, or it fails the chain's input schema (422).
    """
    name, chain = _chain(request)
    value = _single_input(chain, _object(await read_json(request)))
    run_id = uuid.uuid4()
    output = await chain.ainvoke(value, config=_run_config(name, run_id))
    return _json({"output": output, "metadata": {"run_id": str(run_id), "feedback_tokens": []}})


@routes.post("/{chain}/batch")
async def batch(request: web.Request) -> web.Response:
    """Run the chain on each of ``inputs`` (LangServe ``batch``), at most 8 at a time.

    Raises:
        UnknownChain: 404. InvalidJson: 400. PayloadTooLarge: 413.
        InvalidInput: ``inputs`` is not a list, an input fails the schema, or a config list
            does not match ``inputs`` in length (422).
    """
    name, chain = _chain(request)
    body = _object(await read_json(request))
    inputs = body.get("inputs")
    if not isinstance(inputs, list):
        raise _shape_error(
            "body needs 'inputs', a list", ["body", "inputs"], "Input should be a list", "list_type"
        )
    config = body.get("config")
    if isinstance(config, list):
        if len(config) != len(inputs):
            raise InvalidInput(
                f"Number of configs ({len(config)}) must match number of inputs ({len(inputs)})"
            )
        for i, item in enumerate(config):
            _check_config(item, "body", "config", i)
    else:
        _check_config(config, "body", "config")
    values = [_validated_input(chain, item, "inputs", i) for i, item in enumerate(inputs)]
    run_ids = [uuid.uuid4() for _ in values]
    configs = [_run_config(name, r, max_concurrency=BATCH_CONCURRENCY) for r in run_ids]
    outputs = await chain.abatch(values, config=configs) if values else []
    ids = [str(r) for r in run_ids]
    return _json(
        {
            "output": outputs,
            "metadata": {
                "responses": [{"run_id": r, "feedback_tokens": []} for r in ids],
                "run_ids": ids,
            },
        }
    )


@routes.post("/{chain}/stream")
async def stream(request: web.Request) -> web.StreamResponse:
    """Stream the chain's output as server-sent events (LangServe ``stream``).

    Raises:
        UnknownChain: 404. InvalidJson: 400. PayloadTooLarge: 413. InvalidInput: 422.
        Exception: the chain failed before its first chunk (the middleware answers 500);
            after it, an ``error`` event ends the stream instead.
    """
    name, chain = _chain(request)
    value = _single_input(chain, _object(await read_json(request)))
    run_id = uuid.uuid4()
    response = web.StreamResponse(headers=SSE_HEADERS)
    metadata = encode_event(orjson.dumps({"run_id": str(run_id)}), event="metadata", sep=CRLF)
    try:
        stream = cast(
            "AsyncGenerator[Any, None]", chain.astream(value, config=_run_config(name, run_id))
        )
        async with aclosing(stream) as chunks:
            async for chunk in chunks:
                if not response.prepared:
                    await response.prepare(request)
                    await response.write(metadata)
                await response.write(encode_event(dumps_output(chunk), event="data", sep=CRLF))
    except Exception:
        if not response.prepared:
            raise
        if _client_left(request):
            return response  # nobody to tell; aiohttp drops the connection
        log.exception("chain %s failed mid-stream (run %s)", name, run_id)
        await response.write(_STREAM_ERROR)
        await response.write_eof()
        return response
    if not response.prepared:
        await response.prepare(request)
    await response.write(_END)
    await response.write_eof()
    return response


@routes.get("/{chain}/input_schema")
async def input_schema(request: web.Request) -> web.Response:
    """JSON Schema of the chain's input (``Runnable.get_input_schema``). Raises UnknownChain."""
    _, chain = _chain(request)
    return _json(cast("type[BaseModel]", chain.get_input_schema()).model_json_schema())


@routes.get("/{chain}/output_schema")
async def output_schema(request: web.Request) -> web.Response:
    """JSON Schema of the chain's output (``Runnable.get_output_schema``). Raises UnknownChain."""
    _, chain = _chain(request)
    return _json(cast("type[BaseModel]", chain.get_output_schema()).model_json_schema())
