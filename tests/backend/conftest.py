"""Fixtures of the backend tests: settings per region, app clients, real loopback servers.

Every server here is real: ``aiohttp_client`` runs the app on a loopback port behind an
aiohttp client, ``aiohttp_server`` gives a URL that httpx-based clients (``openai``,
``langserve.RemoteRunnable``) can reach. Nothing is mocked; the model is the offline one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from blockbuster import BlockBuster, blockbuster_ctx

from backend.app import build_app
from backend.settings import DEFAULT_ZONES, BackendSettings
from backend.sse import ServerSentEvent, SSEDecoder

__all__ = ["MakeClient", "MakeServer", "ReadSSE", "SSERecord", "settings_for"]

REGIONS = tuple(DEFAULT_ZONES)

MakeClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
MakeServer = Callable[..., Awaitable[TestServer]]


@pytest.fixture(autouse=True)
def backend_blockbuster() -> Iterator[BlockBuster]:
    """Fail any test in which backend code makes a blocking call on the event loop.

    Only calls made from ``backend/`` frames count (``scanned_modules``), so the sync
    clients the tests drive from worker threads and third-party setup code do not.
    """
    with blockbuster_ctx("backend") as bb:
        yield bb


def settings_for(region: str = "eu-west-1", **overrides: Any) -> BackendSettings:
    """BackendSettings for a demo region with its demo zones, ``overrides`` applied."""
    values: dict[str, Any] = {"region": region, "zones": DEFAULT_ZONES.get(region, ("global",))}
    values.update(overrides)
    return BackendSettings(**values)


@pytest.fixture
def make_client(aiohttp_client: Any) -> MakeClient:
    """Start a backend for ``settings_for(region, **overrides)`` and return its test client."""

    async def make(
        region: str = "eu-west-1", **overrides: Any
    ) -> TestClient[web.Request, web.Application]:
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            build_app(settings_for(region, **overrides))
        )
        return client

    return make


@pytest.fixture
def make_server(aiohttp_server: Any) -> MakeServer:
    """Start a backend on a real loopback port; ``str(server.make_url("/"))`` is its URL."""

    async def make(region: str = "eu-west-1", **overrides: Any) -> TestServer:
        server: TestServer = await aiohttp_server(build_app(settings_for(region, **overrides)))
        return server

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> TestClient[web.Request, web.Application]:
    """A eu-west-1 backend (zones eu, global) with a zero-delay offline model."""
    return await make_client()


@pytest.fixture
def empty_region(tmp_path: Path) -> tuple[str, Path]:
    """A region whose document folder exists but holds no markdown: ``(name, data_dir)``."""
    (tmp_path / "xx-empty-1").mkdir()
    return "xx-empty-1", tmp_path


@dataclass
class SSERecord:
    """Events of one stream and when each network read arrived (loop time, s).

    Attributes:
        events: every event, in order.
        reads: ``(loop_time, bytes)`` per read of the response body.
        event_times: loop time at which each event was completed.
    """

    events: list[ServerSentEvent] = field(default_factory=list)
    reads: list[tuple[float, bytes]] = field(default_factory=list)
    event_times: list[float] = field(default_factory=list)

    def of_type(self, event: str) -> list[ServerSentEvent]:
        """The events whose ``event`` field is ``event``."""
        return [e for e in self.events if e.event == event]


ReadSSE = Callable[[aiohttp.ClientResponse], Awaitable[SSERecord]]


@pytest.fixture
def read_sse() -> ReadSSE:
    """Return ``read(response) -> SSERecord``: decode a stream as bytes arrive, timing reads."""
    return _read_sse


@pytest.fixture
def make_settings() -> Callable[..., BackendSettings]:
    """Return ``settings_for``: demo-region settings with overrides."""
    return settings_for


async def _read_sse(response: aiohttp.ClientResponse) -> SSERecord:
    loop = asyncio.get_running_loop()
    decoder = SSEDecoder()
    record = SSERecord()
    async for chunk in response.content.iter_any():
        now = loop.time()
        record.reads.append((now, chunk))
        for event in decoder.feed(chunk):
            record.events.append(event)
            record.event_times.append(now)
    return record
