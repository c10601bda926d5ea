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


# gateway.breaker and gateway.upstreams decide without I/O too, but pybreaker imports redis
# (for its optional CircuitRedisStorage) at import time, which pulls in asyncio.
PURE = ["gateway.residency", "gateway.balancer", "gateway.forwarded", "gateway.routing",
        "gateway.outlier", "gateway.budget",
        "gateway.headers"]  # fmt: skip


@pytest.mark.parametrize("module", PURE)
def test_decision_module_does_no_io(module: str) -> None:
    probe = (
        f"import sys, {module}; "
        f"loaded = {{'aiohttp', 'redis', 'asyncio', 'maxminddb'}} & set(sys.modules); "
        f"assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)
