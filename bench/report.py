"""Figures of a benchmark run: wrk summaries, CPU per request, medians, ratios and tables.

Rule: this module computes and renders; it never starts a process, runs wrk or reads /proc
(``bench/run.py`` does, and hands the numbers here).

Why ratios and medians: the benchmark machine is shared and drifts 20-30 % between minutes,
so an absolute req/s says little about the gateway. Each repeat measures the backend directly,
through the gateway and (for cacheable scenarios) through a second gateway that answers from
its cache, back to back; the per-repeat ratios (gateway/direct, gateway-cached/direct,
gateway-cached/gateway) cancel most of the drift, and the median over repeats (of the figures
and of the per-repeat ratios) ignores one odd repeat. CPU per request (user + system time of
a process divided by the requests completed in the run) does not depend on how busy the rest
of the machine was, within the 10 ms resolution of ``/proc/<pid>/stat``.

Units: durations and latencies are float seconds in the dataclasses; JSON and tables name their
unit in the key or header (``p50_ms``, ``gateway_cpu_us_per_request``).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "COMPARISONS",
    "SUMMARY_MARKER",
    "Ratio",
    "Repeat",
    "Run",
    "ScenarioSummary",
    "Target",
    "TargetMedians",
    "WrkSummary",
    "parse_wrk_output",
    "render_markdown",
    "render_text",
    "summarise",
    "table_rows",
]

SUMMARY_MARKER = "GEOGATE_WRK_SUMMARY "  # prefix of the line bench/wrk/summary.lua prints
US, MS = 1e-6, 1e-3  # seconds


class Target(StrEnum):
    """Where wrk sends its requests."""

    DIRECT = "direct"  # wrk -> backend: the reference
    GATEWAY = "gateway"  # wrk -> gateway -> the same backend
    GATEWAY_CACHED = "gateway-cached"  # wrk -> a second gateway answering from its llm-exact cache


COMPARISONS: tuple[tuple[Target, Target], ...] = (
    (Target.GATEWAY, Target.DIRECT),
    (Target.GATEWAY_CACHED, Target.DIRECT),
    (Target.GATEWAY_CACHED, Target.GATEWAY),  # a cache hit against the same request proxied
)
"""(target, reference) pairs whose per-repeat ratios are reported, when both were measured."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WrkSummary:
    """What wrk's ``done(summary, latency, requests)`` reported for one run.

    ``errors_status`` counts responses with status >= 400 (wrk's "Non-2xx or 3xx responses");
    the other ``errors_*`` are socket errors. ``requests`` counts every completed response,
    whatever its status.
    """

    duration: float  # seconds wrk measured
    requests: int
    bytes_read: int
    p50: float  # latency percentiles, seconds
    p90: float
    p99: float
    p999: float
    mean: float
    max: float
    errors_connect: int = 0
    errors_read: int = 0
    errors_write: int = 0
    errors_timeout: int = 0
    errors_status: int = 0

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return self.requests / self.duration if self.duration > 0 else 0.0

    @property
    def errors(self) -> int:
        """Socket errors plus responses with status >= 400."""
        return (
            self.errors_connect
            + self.errors_read
            + self.errors_write
            + self.errors_timeout
            + self.errors_status
        )

    @property
    def ok_requests(self) -> int:
        """Responses with a status below 400: the denominator of CPU per request."""
        return self.requests - self.errors_status

    def to_json(self) -> dict[str, Any]:
        return {
            "duration_s": round(self.duration, 6),
            "requests": self.requests,
            "bytes_read": self.bytes_read,
            "rps": round(self.rps, 1),
            "latency_ms": {
                "p50": round(self.p50 / MS, 3),
                "p90": round(self.p90 / MS, 3),
                "p99": round(self.p99 / MS, 3),
                "p99.9": round(self.p999 / MS, 3),
                "mean": round(self.mean / MS, 3),
                "max": round(self.max / MS, 3),
            },
            "errors": {
                "connect": self.errors_connect,
                "read": self.errors_read,
                "write": self.errors_write,
                "timeout": self.errors_timeout,
                "status": self.errors_status,
            },
            "error_count": self.errors,
        }


def parse_wrk_output(stdout: str) -> WrkSummary:
    """Return the summary in wrk's stdout: the last line starting with SUMMARY_MARKER.

    Args:
        stdout: everything wrk printed; its human-readable text is ignored.

    Raises:
        ValueError: no summary line (the script was not loaded, or wrk failed), or a line
            that is not the JSON ``bench/wrk/summary.lua`` writes.
    """
    lines = [ln for ln in stdout.splitlines() if ln.startswith(SUMMARY_MARKER)]
    if not lines:
        raise ValueError("wrk printed no summary line (was bench/wrk/summary.lua loaded?)")
    try:
        raw = json.loads(lines[-1][len(SUMMARY_MARKER) :])
        lat, pct, err = raw["latency_us"], raw["latency_us"]["percentiles"], raw["errors"]
        return WrkSummary(
            duration=raw["duration_us"] * US,
            requests=int(raw["requests"]),
            bytes_read=int(raw["bytes"]),
            p50=pct["50"] * US,
            p90=pct["90"] * US,
            p99=pct["99"] * US,
            p999=pct["99.9"] * US,
            mean=lat["mean"] * US,
            max=lat["max"] * US,
            errors_connect=int(err["connect"]),
            errors_read=int(err["read"]),
            errors_write=int(err["write"]),
            errors_timeout=int(err["timeout"]),
            errors_status=int(err["status"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"unreadable wrk summary {lines[-1]!r}: {exc}") from exc


def _per_request_us(cpu: float, requests: int) -> float | None:
    return cpu / requests / US if requests > 0 else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    """One wrk run against one target, and the CPU each process used meanwhile.

    CPU figures are user + system seconds, read from ``/proc/<pid>/stat`` right before and
    right after wrk (all threads of the process; 10 ms resolution at 100 Hz clock ticks).
    ``gateway_cpu`` is the CPU of the gateway the run went through (gateway or
    gateway-cached); in a direct run, of the idle gateways (their health probes), not reported
    per request. ``cache_hits``: cache hits the gateway counted during the run (its /metrics),
    for gateway-cached runs; None otherwise.
    """

    scenario: str
    target: Target
    repeat: int  # 1-based
    wrk: WrkSummary
    gateway_cpu: float  # seconds
    backend_cpu: float  # seconds
    wrk_cpu: float  # seconds
    seq: int = 0  # position in the whole benchmark, 0 first
    cache_hits: int | None = None

    @property
    def gateway_us_per_request(self) -> float | None:
        """Gateway CPU microseconds per successful request; None in direct runs."""
        if self.target is Target.DIRECT:
            return None
        return _per_request_us(self.gateway_cpu, self.wrk.ok_requests)

    @property
    def backend_us_per_request(self) -> float | None:
        """Backend CPU microseconds per successful request."""
        return _per_request_us(self.backend_cpu, self.wrk.ok_requests)

    @property
    def wrk_us_per_request(self) -> float | None:
        """wrk's own CPU microseconds per request (is the load generator the bottleneck?)."""
        return _per_request_us(self.wrk_cpu, self.wrk.requests)

    @property
    def gateway_cpu_share(self) -> float | None:
        """Gateway CPU seconds per wall second: 1.0 is one core fully busy; None if direct."""
        if self.target is Target.DIRECT or self.wrk.duration <= 0:
            return None
        return self.gateway_cpu / self.wrk.duration

    def to_json(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 1)

        return {
            "scenario": self.scenario,
            "target": str(self.target),
            "repeat": self.repeat,
            "seq": self.seq,
            "wrk": self.wrk.to_json(),
            "gateway_cpu_s": round(self.gateway_cpu, 3),
            "backend_cpu_s": round(self.backend_cpu, 3),
            "wrk_cpu_s": round(self.wrk_cpu, 3),
            "gateway_cpu_us_per_request": r(self.gateway_us_per_request),
            "backend_cpu_us_per_request": r(self.backend_us_per_request),
            "wrk_cpu_us_per_request": r(self.wrk_us_per_request),
            "gateway_cpu_share": None if (s := self.gateway_cpu_share) is None else round(s, 3),
            "cache_hits": self.cache_hits,
            "flagged": self.wrk.errors > 0,
        }


@dataclass(frozen=True, slots=True)
class Ratio:
    """A run's figure divided by the reference run's figure of the same repeat.

    Against direct: ``rps`` below 1 and ``p50`` / ``p99`` above 1 mean the gateway costs
    something. ``cpu``: gateway CPU per request over the reference's, when both went through
    a gateway (gateway-cached against gateway: what a hit costs against a proxied request);
    None otherwise.
    """

    rps: float
    p50: float
    p99: float
    cpu: float | None = None

    @classmethod
    def of(cls, run: Run, reference: Run) -> Ratio:
        def div(a: float, b: float) -> float:
            return a / b if b > 0 else float("nan")

        a, b = run.gateway_us_per_request, reference.gateway_us_per_request
        return cls(
            rps=div(run.wrk.rps, reference.wrk.rps),
            p50=div(run.wrk.p50, reference.wrk.p50),
            p99=div(run.wrk.p99, reference.wrk.p99),
            cpu=None if a is None or b is None else div(a, b),
        )

    @classmethod
    def median(cls, ratios: Sequence[Ratio]) -> Ratio:
        return cls(
            rps=statistics.median(r.rps for r in ratios),
            p50=statistics.median(r.p50 for r in ratios),
            p99=statistics.median(r.p99 for r in ratios),
            cpu=_median_or_none(r.cpu for r in ratios),
        )

    def to_json(self) -> dict[str, float]:
        out = {"rps": round(self.rps, 3), "p50": round(self.p50, 3), "p99": round(self.p99, 3)}
        if self.cpu is not None:
            out["cpu"] = round(self.cpu, 3)
        return out


def _median_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetMedians:
    """Medians over the repeats of one scenario and target; ``errors`` is the sum."""

    rps: float
    p50: float  # seconds
    p99: float  # seconds
    errors: int
    gateway_us_per_request: float | None
    backend_us_per_request: float | None
    gateway_cpu_share: float | None

    @classmethod
    def of(cls, runs: Sequence[Run]) -> TargetMedians:
        return cls(
            rps=statistics.median(r.wrk.rps for r in runs),
            p50=statistics.median(r.wrk.p50 for r in runs),
            p99=statistics.median(r.wrk.p99 for r in runs),
            errors=sum(r.wrk.errors for r in runs),
            gateway_us_per_request=_median_or_none(r.gateway_us_per_request for r in runs),
            backend_us_per_request=_median_or_none(r.backend_us_per_request for r in runs),
            gateway_cpu_share=_median_or_none(r.gateway_cpu_share for r in runs),
        )

    def to_json(self) -> dict[str, Any]:
        def r(x: float | None, n: int = 1) -> float | None:
            return None if x is None else round(x, n)

        return {
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50 / MS, 3),
            "p99_ms": round(self.p99 / MS, 3),
            "errors": self.errors,
            "gateway_cpu_us_per_request": r(self.gateway_us_per_request),
            "backend_cpu_us_per_request": r(self.backend_us_per_request),
            "gateway_cpu_share": r(self.gateway_cpu_share, 3),
        }


def _label(comparison: tuple[Target, Target]) -> str:
    return f"{comparison[0]}/{comparison[1]}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Repeat:
    """One repeat of a scenario: a run per target and the ratios between them."""

    repeat: int
    runs: dict[Target, Run]  # in Target order
    ratios: dict[tuple[Target, Target], Ratio]  # (target, reference) -> ratio, COMPARISONS order

    def to_json(self) -> dict[str, Any]:
        return {
            "repeat": self.repeat,
            "ratios": {_label(c): r.to_json() for c, r in self.ratios.items()},
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ScenarioSummary:
    """Per-repeat runs and ratios of one scenario, and their medians per target."""

    scenario: str
    targets: tuple[Target, ...]  # the targets measured, in Target order
    repeats: tuple[Repeat, ...]
    medians: dict[Target, TargetMedians]
    ratios: dict[tuple[Target, Target], Ratio]  # medians of the per-repeat ratios

    @property
    def errors(self) -> int:
        return sum(m.errors for m in self.medians.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "targets": [str(t) for t in self.targets],
            "repeats": [r.to_json() for r in self.repeats],
            "median": {
                **{str(t): m.to_json() for t, m in self.medians.items()},
                "ratios": {_label(c): r.to_json() for c, r in self.ratios.items()},
            },
        }


def summarise(runs: Sequence[Run]) -> list[ScenarioSummary]:
    """Group each repeat's runs by target, take ratios and medians, scenario by scenario.

    Args:
        runs: every measured run; scenarios keep the order of their first run. A scenario's
            targets are those it has runs for; a repeat missing any of them (the run was
            interrupted) is left out.

    Returns:
        One summary per scenario that has at least one complete repeat.
    """
    by_key = {(r.scenario, r.repeat, r.target): r for r in runs}
    summaries: list[ScenarioSummary] = []
    for scenario in dict.fromkeys(r.scenario for r in runs):
        mine = [r for r in runs if r.scenario == scenario]
        targets = tuple(t for t in Target if any(r.target is t for r in mine))
        comparisons = [c for c in COMPARISONS if c[0] in targets and c[1] in targets]
        repeats = []
        for repeat in sorted({r.repeat for r in mine}):
            group = {t: by_key.get((scenario, repeat, t)) for t in targets}
            complete = {t: r for t, r in group.items() if r is not None}
            if len(complete) < len(targets):
                continue
            ratios = {c: Ratio.of(complete[c[0]], complete[c[1]]) for c in comparisons}
            repeats.append(Repeat(repeat=repeat, runs=complete, ratios=ratios))
        if not repeats:
            continue
        summaries.append(
            ScenarioSummary(
                scenario=scenario,
                targets=targets,
                repeats=tuple(repeats),
                medians={t: TargetMedians.of([r.runs[t] for r in repeats]) for t in targets},
                ratios={c: Ratio.median([r.ratios[c] for r in repeats]) for c in comparisons},
            )
        )
    return summaries


HEADER = [
    "scenario", "repeat", "target", "req/s", "p50 ms", "p99 ms", "errors",
    "gw CPU µs/req", "gw CPU %", "backend CPU µs/req", "ratio req/s", "ratio p50", "ratio p99",
]  # fmt: skip
CACHED_HEADER = ["cached/gw req/s", "cached/gw p50", "cached/gw p99", "cached/gw CPU"]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _errors(count: int) -> str:
    return f"{count} !" if count else "0"


def _ratio_cells(ratio: Ratio | None, *, cpu: bool = False) -> list[str]:
    if ratio is None:
        return ["-"] * (4 if cpu else 3)
    cells = [_fmt(ratio.rps, ".2f"), _fmt(ratio.p50, ".2f"), _fmt(ratio.p99, ".2f")]
    return [*cells, _fmt(ratio.cpu, ".2f")] if cpu else cells


def _row(
    scenario: str,
    repeat: str,
    target: Target,
    m: TargetMedians | Run,
    ratios: dict[tuple[Target, Target], Ratio],
    *,
    cached_columns: bool,
) -> list[str]:
    if isinstance(m, Run):
        m = TargetMedians.of([m])
    share = None if m.gateway_cpu_share is None else 100 * m.gateway_cpu_share
    row = [
        scenario,
        repeat,
        str(target),
        _fmt(m.rps, ".0f"),
        _fmt(m.p50 / MS, ".2f"),
        _fmt(m.p99 / MS, ".2f"),
        _errors(m.errors),
        _fmt(m.gateway_us_per_request, ".0f"),
        _fmt(share, ".0f"),
        _fmt(m.backend_us_per_request, ".0f"),
        *_ratio_cells(ratios.get((target, Target.DIRECT))),
    ]
    if cached_columns:
        row += _ratio_cells(ratios.get((target, Target.GATEWAY)), cpu=True)
    return row


def table_rows(summaries: Sequence[ScenarioSummary]) -> list[list[str]]:
    """Rows of the results table, header first: each repeat's runs, then the medians.

    The ratio columns sit on the row of the run divided: ``ratio *`` against direct (on
    gateway and gateway-cached rows), ``cached/gw *`` (only when some scenario measured
    gateway-cached) the cached gateway against the uncached one, CPU per request included.
    On a median row they hold the median of the per-repeat ratios. An error count is
    followed by ``!``.
    """
    cached = any(Target.GATEWAY_CACHED in s.targets for s in summaries)
    rows = [HEADER + CACHED_HEADER if cached else list(HEADER)]
    for s in summaries:
        for rep in s.repeats:
            for run in sorted(rep.runs.values(), key=lambda r: r.seq):  # in the order they ran
                rows.append(
                    _row(s.scenario, str(run.repeat), run.target, run, rep.ratios,
                         cached_columns=cached)
                )  # fmt: skip
        for target, medians in s.medians.items():
            rows.append(
                _row(s.scenario, "median", target, medians, s.ratios, cached_columns=cached)
            )
    return rows


def render_text(rows: Sequence[Sequence[str]]) -> str:
    """Align ``rows`` in columns for a terminal: text left, numbers right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(w) if i < 3 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def render_markdown(rows: Sequence[Sequence[str]]) -> str:
    """Render ``rows`` as a GitHub Markdown table; median rows in bold."""
    out = ["| " + " | ".join(rows[0]) + " |"]
    out.append("|" + "|".join([" --- "] * 3 + [" ---: "] * (len(rows[0]) - 3)) + "|")
    for row in rows[1:]:
        cells = [f"**{c}**" if row[1] == "median" and c != "-" else c for c in row]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
