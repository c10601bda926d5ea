"""Settings of one regional backend process, and the errors that stop it from starting.

Rule: this module validates values; it never touches the filesystem or the network, so
``BackendSettings(...)`` is cheap and safe to build anywhere (tests, the CLI, the lead's
``geogate backend`` subcommand).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DATA_ROOT",
    "DEFAULT_ZONES",
    "KIB",
    "MIB",
    "MS",
    "PROVIDERS",
    "SECONDS",
    "BackendSettings",
    "StartupError",
]

SECONDS, MS = 1.0, 0.001
KIB, MIB = 1024, 1024 * 1024

DATA_ROOT = Path(__file__).resolve().parent / "data"
"""Packaged region documents: ``DATA_ROOT / <region> / *.md`` (pyproject package data)."""

DEFAULT_ZONES: dict[str, tuple[str, ...]] = {
    "us-east-1": ("us", "global"),
    "eu-west-1": ("eu", "global"),
    "eu-central-1": ("eu", "global"),
    "ap-southeast-1": ("global",),
}
"""Zones each demo region serves when ``--zones`` is not given (DESIGN.md config sketch)."""

PROVIDERS = ("offline", "openai")


class StartupError(Exception):
    """The backend cannot start: missing region documents, missing optional dependency, bad
    provider settings. The CLI prints the message and exits with status 2; never sent to a
    client."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendSettings:
    """Everything ``build_app`` needs to serve one region.

    Usage::

        settings = BackendSettings(region="eu-west-1", zones=("eu", "global"))
        app = build_app(settings)

    Attributes:
        region: region name, e.g. ``"eu-west-1"``; sent as ``X-Served-Region`` on every
            response and names the document folder ``data_dir / region``.
        zones: residency zones this region may serve; a request whose ``X-Residency-Zone``
            names another zone is refused with 451.
        ttft_ms: offline model's time to first token (ms); 0 means no delay.
        tokens_per_second: offline model's streaming rate after the first token; 0 means no
            delay between tokens (benchmarks).
        max_body_bytes: largest request body accepted (bytes); longer bodies get 413.
        provider: ``"offline"`` (embedded deterministic model) or ``"openai"`` (any
            OpenAI-compatible API through langchain-openai; key from ``OPENAI_API_KEY``).
        openai_base_url: base URL of the OpenAI-compatible API, e.g.
            ``"https://api.openai.com/v1"``; None for the client's default.
        openai_model: model name sent to the provider; required with ``provider="openai"``.
        data_dir: folder holding one sub-folder of ``*.md`` documents per region.
        retriever_k: documents (sections) the rag retriever returns per question.
        health_timeout: bound on each check of the deep ``/health`` probe (s).
        health_ttl: how long one deep probe's report answers ``/health`` (s); 0 probes on
            every request.

    Raises:
        ValueError: a value is out of range (message names the field).
    """

    region: str
    zones: tuple[str, ...]
    ttft_ms: float = 0.0
    tokens_per_second: float = 0.0
    max_body_bytes: int = 1 * MIB
    provider: str = "offline"
    openai_base_url: str | None = None
    openai_model: str | None = None
    data_dir: Path = DATA_ROOT
    retriever_k: int = 3
    health_timeout: float = 5 * SECONDS
    health_ttl: float = 1 * SECONDS

    def __post_init__(self) -> None:
        if not self.region or "/" in self.region or self.region in {".", ".."}:
            raise ValueError(f"region: {self.region!r} is not a region name")
        if not self.zones or any(not z or z != z.strip().lower() for z in self.zones):
            raise ValueError(f"zones: {self.zones!r} must be non-empty lowercase zone names")
        if self.ttft_ms < 0:
            raise ValueError(f"ttft_ms: {self.ttft_ms} must be >= 0")
        if self.tokens_per_second < 0:
            raise ValueError(f"tokens_per_second: {self.tokens_per_second} must be >= 0")
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes: {self.max_body_bytes} must be > 0")
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider: {self.provider!r} is not one of {PROVIDERS}")
        if self.retriever_k < 1:
            raise ValueError(f"retriever_k: {self.retriever_k} must be >= 1")
        if self.health_timeout <= 0:
            raise ValueError(f"health_timeout: {self.health_timeout} must be > 0")
        if self.health_ttl < 0:
            raise ValueError(f"health_ttl: {self.health_ttl} must be >= 0")

    @property
    def region_dir(self) -> Path:
        """Folder of this region's documents: ``data_dir / region``."""
        return self.data_dir / self.region

    def serves(self, zone: str) -> bool:
        """Return True when this region may serve residency ``zone`` (case-insensitive)."""
        return zone.strip().lower() in self.zones
