"""GeoGate: a residency-aware edge gateway for LLM applications.

Importing the package pulls in nothing heavy; the CLI and the server import aiohttp lazily.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
