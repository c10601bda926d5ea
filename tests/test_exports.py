"""Every module declares ``__all__`` and it names real objects; decision modules do no I/O."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import backend
import gateway

SUBMODULES = sorted(
    m.name
    for pkg in (gateway, backend)
    for m in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + ".")
    if not m.name.endswith("__main__")
)
MODULES = ["backend", "gateway", *SUBMODULES]


@pytest.mark.parametrize("name", MODULES)
def test_module_exports(name: str) -> None:
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    for export in module.__all__:
        assert hasattr(module, export), f"{name}.__all__ names missing {export!r}"


PURE = ["gateway.residency", "gateway.balancer", "gateway.forwarded", "gateway.routing",
        "gateway.outlier", "gateway.budget", "gateway.breaker", "gateway.upstreams", "gateway.gcra",
        "gateway.httpcache", "gateway.cachekey", "gateway.windowstats", "gateway.tracecontext",
        "gateway.headers"]  # fmt: skip


@pytest.mark.parametrize("module", PURE)
def test_decision_module_does_no_io(module: str) -> None:
    # pybreaker tries `from redis import Redis` (its optional storage) at import time: mark
    # the optional backends absent, as on a machine without them, so the probe sees our imports.
    probe = (
        "import sys; sys.modules['redis'] = sys.modules['tornado'] = None; "
        f"import {module}; "
        "loaded = {'aiohttp', 'redis', 'asyncio', 'maxminddb'} & "
        "{k for k, v in sys.modules.items() if v is not None}; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)
