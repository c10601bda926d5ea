"""The request path as a filter chain (Envoy's decoder filters; aiohttp's handler chain).

Each stage reads what earlier stages put on the Exchange and adds its own field. A stage
returns None to continue, or a LocalReply to answer without the upstream (Envoy's
``sendLocalReply``), or raises a GatewayError that the server renders as problem+json.
The forwarder is the terminal stage. Completion hooks run in reverse order, synchronously,
in ``finally``, so they also run on cancellation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from multidict import CIMultiDict

from gateway.errors import GatewayError, MethodNotAllowed, RouteNotFound
from gateway.http1 import Response, StreamResponse

if TYPE_CHECKING:
    from gateway.exchange import Exchange
    from gateway.routing import RouteTable

__all__ = ["BackgroundTasks", "Forwarder", "LocalReply", "Pipeline", "Stage"]

log = logging.getLogger("geogate.pipeline")


class BackgroundTasks:
    """Work that must await after the response (Redis slot release, token reconciliation).

    Each task gets its own timeout; the set keeps strong references (asyncio keeps only weak
    ones) and ``drain`` waits for what is left when the server stops.

    Args:
        timeout: seconds each task may take before it is cancelled.
    """

    def __init__(self, timeout: float = 5.0) -> None:
        self._timeout = timeout
        self._tasks: set[asyncio.Task[object]] = set()

    def spawn(self, coro: Coroutine[object, object, object]) -> None:
        """Run ``coro`` in the background, bounded by the timeout; failures are logged."""
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(self._run(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, coro: Coroutine[object, object, object]) -> object:
        try:
            async with asyncio.timeout(self._timeout):
                return await coro
        except Exception:
            log.exception("background task failed")
            return None

    async def drain(self, within: float) -> None:
        """Wait up to ``within`` seconds for the tasks still running, then cancel them."""
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=within)
        for task in pending:
            task.cancel()

    def __len__(self) -> int:
        return len(self._tasks)


class LocalReply:
    """A response a stage gives instead of forwarding (cache hit, rate-limit 429, ...).

    Args:
        status: HTTP status.
        body: response body bytes.
        headers: response header fields (a multidict keeps repeated fields).
    """

    __slots__ = ("body", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        headers: Mapping[str, str] | CIMultiDict[str] | None = None,
    ):
        self.status = status
        self.body = body
        self.headers = headers or {}

    async def send(self, ex: Exchange) -> Response:
        """Build the response for ``ex`` (the server writes it)."""
        ex.status = self.status
        headers = CIMultiDict(self.headers)
        headers["X-Request-Id"] = ex.request_id
        if ex.zone is not None:
            headers["X-Residency-Zone"] = ex.zone
        return Response(self.status, self.body, headers)


class Stage(Protocol):
    """One step of the request path."""

    name: str

    async def on_request(self, ex: Exchange) -> LocalReply | None:
        """Act on the request; None continues, a LocalReply answers at once."""

    def on_complete(self, ex: Exchange) -> None:
        """Synchronous, cheap completion hook: metrics, log fields, scheduling."""


class Forwarder(Protocol):
    """The terminal stage: sends the request upstream and streams the answer back."""

    async def forward(self, ex: Exchange) -> Response | StreamResponse:
        """Forward ``ex`` and return the (already written or ready) response."""


class Pipeline:
    """Route, then the stages in order, then the forwarder.

    Args:
        routes: the compiled route table.
        stages: the stages after routing, in order.
        forwarder: the terminal stage.
    """

    __slots__ = ("_forwarder", "_routes", "_stages")

    def __init__(self, routes: RouteTable, stages: Sequence[Stage], forwarder: Forwarder):
        self._routes = routes
        self._stages = tuple(stages)
        self._forwarder = forwarder

    async def run(self, ex: Exchange) -> Response | StreamResponse:
        """Take ``ex`` through the chain.

        Raises:
            RouteNotFound: no route matches host and path (404).
            MethodNotAllowed: the route does not allow the method (405).
            GatewayError: whatever a stage or the forwarder raises.
        """
        request = ex.request
        route = self._routes.match(request.host, request.path)
        if route is None:
            raise RouteNotFound(f"no route for {request.path!r}")
        if request.method not in route.methods:
            raise MethodNotAllowed(f"{request.method} is not allowed on route {route.prefix!r}")
        ex.route = route
        entered: list[Stage] = []
        try:
            for stage in self._stages:
                entered.append(stage)
                if (reply := await stage.on_request(ex)) is not None:
                    return await reply.send(ex)
            try:
                return await self._forwarder.forward(ex)
            except GatewayError as err:
                # a stage may answer instead of an upstream failure (stale-if-error)
                for stage in reversed(entered):
                    on_error = getattr(stage, "on_error", None)
                    if on_error is not None and (reply := on_error(ex, err)) is not None:
                        response: Response = await reply.send(ex)
                        return response
                raise
        finally:
            for stage in reversed(entered):
                stage.on_complete(ex)
