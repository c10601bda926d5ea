"""GeoGate's regional backend: LangChain chains of one region behind an aiohttp server.

Each backend process serves one region's ``chat`` and ``rag`` chains over two wire formats,
LangServe's (``/{chain}/invoke|batch|stream|input_schema|output_schema``, so that
``langserve.RemoteRunnable`` works) and OpenAI's (``/v1/chat/completions``, ``/v1/models``),
plus ``/health`` (deep) and ``/ready`` (cheap). Every response says which region served it
(``X-Served-Region``), and a request the gateway marked for a zone the region does not
serve is refused with 451.

Public names, imported lazily so that ``import backend`` pulls in neither aiohttp nor
LangChain:

* ``BackendSettings`` (``backend.settings``): frozen settings of one region.
* ``build_app(settings)`` (``backend.app``): the aiohttp Application.
* ``main(argv)`` (``backend.server``): the CLI of ``python -m backend``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backend.app import build_app
    from backend.server import main
    from backend.settings import BackendSettings

__all__ = ["BackendSettings", "build_app", "main"]

_HOMES = {
    "BackendSettings": "backend.settings",
    "build_app": "backend.app",
    "main": "backend.server",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'backend' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
