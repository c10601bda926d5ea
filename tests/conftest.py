"""Fixtures shared by every test directory; keep this file minimal (see tests/*/conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import uvloop

from gateway.clock import ManualClock

__all__ = ["manual_clock"]


@pytest.fixture
def manual_clock() -> ManualClock:
    """A clock at 0.0 s that moves only through ``advance()``."""
    return ManualClock()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Async tests run on uvloop, the loop the gateway runs on (``gateway.cli``)."""
    return {"uvloop": uvloop.new_event_loop}
