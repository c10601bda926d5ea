"""Fixtures for the integration tests: the real-process cluster lives in cluster.py."""

from __future__ import annotations

from tests.integration.cluster import cluster

__all__ = ["cluster"]
