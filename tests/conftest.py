"""Fixtures shared by every test directory; keep this file minimal (see tests/*/conftest.py)."""

from __future__ import annotations

import pytest

from gateway.clock import ManualClock

__all__ = ["manual_clock"]


@pytest.fixture
def manual_clock() -> ManualClock:
    """A clock at 0.0 s that moves only through ``advance()``."""
    return ManualClock()
