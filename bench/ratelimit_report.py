"""Figures of the rate-limit benchmark: admitted vs expected, verdicts, overhead ratios, tables.

Rule: this module computes and renders; it never starts a process, sends a request or reads
/proc (``bench/ratelimit_bench.py`` does, and hands the numbers here).

Accuracy. GCRA (``gateway.gcra``) admits at most ``burst + rate x D`` units of cost over any
window of ``D`` seconds, and a key that starts with a full bucket and is offered more than
that admits exactly that much, to within one request's cost (an arrival waits for the next
one after the bucket has room). So the expected admitted quantity of a run is

    expected = burst + rate x D

with ``D`` the span from the first to the last request *sent* (the client's monotonic clock).
The gateway decides on Redis server time (or its own loop clock), so queueing between the
client's send and the decision at either end of the window shifts the figure by about
``rate x`` that delay: 20 ms is one request at 50 requests/s.

Verdict: ``|admitted - expected| <= max(1 % of expected, one request's cost)`` (1 for request
limits; the largest ``usage.total_tokens`` of one answer for a tokens-per-minute limit).

Units: times are float seconds in the dataclasses; JSON and tables name their unit in the key
or header (``span_s``, ``p50_ms``, ``gateway_cpu_us_per_request``).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.report import MS, US, WrkSummary

__all__ = [
    "TOLERANCE_SHARE",
    "Accuracy",
    "GatewayCounts",
    "LimitSpec",
    "Outcome",
    "OverheadRun",
    "accuracy_of",
    "accuracy_rows",
    "gateway_rows",
    "overhead_rows",
    "overhead_summary",
]

TOLERANCE_SHARE = 0.01  # the target: within 1 % of expected (or one request's cost)


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """One request the client sent, and what came of it.

    ``status`` is None when no HTTP answer arrived (``error`` says why); a 2xx with an
    ``error`` (a stream without its usage chunk) is not counted as admitted.
    """

    gateway: int  # index of the gateway it went to
    sent: float  # client loop time when it was sent, seconds
    latency: float  # seconds until the whole answer was read, or the failure
    status: int | None
    tokens: int | None = None  # usage.total_tokens of a streamed answer
    error: str | None = None

    @property
    def is_admitted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300 and self.error is None

    @property
    def is_limited(self) -> bool:
        return self.status == 429

    @property
    def kind(self) -> str:
        """``admitted``, ``limited``, or the error: ``status 503``, ``ClientOSError`` ..."""
        if self.is_admitted:
            return "admitted"
        if self.is_limited:
            return "limited"
        return self.error or f"status {self.status}"


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitSpec:
    """The limit under test: ``rate`` units per second, ``burst`` units at once."""

    unit: str  # "requests" or "tokens"
    rate: float  # units per second
    burst: float  # units
    label: str  # as configured, e.g. "50 req/s, burst 20" or "6000 tokens/min"

    def expected(self, span: float) -> float:
        """``burst + rate x span``: what GCRA admits over ``span`` seconds of overload."""
        return self.burst + self.rate * span


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayCounts:
    """What one gateway answered; ``admitted_units`` in the limit's unit."""

    gateway: int
    sent: int
    admitted: int  # requests
    limited: int
    errors: int  # neither admitted nor 429
    admitted_units: float
    p50: float | None  # latency over every answer, seconds
    p99: float | None

    @classmethod
    def of(cls, gateway: int, outcomes: Sequence[Outcome], unit: str) -> GatewayCounts:
        admitted = [o for o in outcomes if o.is_admitted]
        latencies = [o.latency for o in outcomes if o.status is not None]
        return cls(
            gateway=gateway,
            sent=len(outcomes),
            admitted=len(admitted),
            limited=sum(o.is_limited for o in outcomes),
            errors=sum(not (o.is_admitted or o.is_limited) for o in outcomes),
            admitted_units=_units(admitted, unit),
            p50=_pct(latencies, 0.50),
            p99=_pct(latencies, 0.99),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "gateway": self.gateway,
            "sent": self.sent,
            "admitted": self.admitted,
            "limited": self.limited,
            "errors": self.errors,
            "admitted_units": self.admitted_units,
            "p50_ms": None if self.p50 is None else round(self.p50 / MS, 3),
            "p99_ms": None if self.p99 is None else round(self.p99 / MS, 3),
        }


def _units(admitted: Sequence[Outcome], unit: str) -> float:
    if unit == "tokens":
        return float(sum(o.tokens or 0 for o in admitted))
    return float(len(admitted))


@dataclass(frozen=True, slots=True, kw_only=True)
class Accuracy:
    """One accuracy scenario: admitted against ``burst + rate x span``."""

    scenario: str
    store: str  # "redis" or "memory"
    limit: LimitSpec
    offered_rate: float  # requests per second the client was asked to send
    span: float  # seconds from the first to the last request sent
    sent: int
    admitted: int  # requests
    limited: int
    errors: int
    error_kinds: dict[str, int]
    admitted_units: float  # in limit.unit
    unit_cost: float  # one request's cost: 1, or the largest total_tokens of an answer
    per_gateway: tuple[GatewayCounts, ...]
    peak_excess: float  # max over t of admitted(sent <= t) - (burst + rate x t), units
    peak_excess_at: float  # that t, seconds after the first send

    @property
    def expected(self) -> float:
        return self.limit.expected(self.span)

    @property
    def tolerance(self) -> float:
        """``max(1 % of expected, one request's cost)``, in limit.unit."""
        return max(TOLERANCE_SHARE * self.expected, self.unit_cost)

    @property
    def error_pct(self) -> float:
        """``(admitted - expected) / expected`` in percent; positive: admitted too much."""
        return 100 * (self.admitted_units - self.expected) / self.expected

    @property
    def is_within(self) -> bool:
        return abs(self.admitted_units - self.expected) <= self.tolerance

    @property
    def achieved_rate(self) -> float:
        """Requests per second actually sent (pacing slips when the client falls behind)."""
        return (self.sent - 1) / self.span if self.span > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "store": self.store,
            "limit": {
                "unit": self.limit.unit,
                "rate_per_s": self.limit.rate,
                "burst": self.limit.burst,
                "label": self.limit.label,
            },
            "gateways": len(self.per_gateway),
            "offered_rate_per_s": round(self.offered_rate, 3),
            "achieved_rate_per_s": round(self.achieved_rate, 3),
            "span_s": round(self.span, 6),
            "sent": self.sent,
            "admitted": self.admitted,
            "limited": self.limited,
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "admitted_units": self.admitted_units,
            "expected_units": round(self.expected, 3),
            "error_pct": round(self.error_pct, 3),
            "tolerance_units": round(self.tolerance, 3),
            "unit_cost": self.unit_cost,
            "within_target": self.is_within,
            "peak_excess_units": round(self.peak_excess, 3),
            "peak_excess_at_s": round(self.peak_excess_at, 4),
            "per_gateway": [g.to_json() for g in self.per_gateway],
        }


def accuracy_of(
    scenario: str,
    *,
    store: str,
    limit: LimitSpec,
    offered_rate: float,
    gateways: int,
    outcomes: Sequence[Outcome],
) -> Accuracy:
    """Count ``outcomes`` against ``limit``.

    Args:
        outcomes: every request sent, in any order (at least two, so the span is defined).
        offered_rate: the pacing the client was asked for, requests per second.
        gateways: how many gateways the requests went to (round robin).

    Raises:
        ValueError: fewer than two outcomes.
    """
    if len(outcomes) < 2:
        raise ValueError("an accuracy run needs at least two requests")
    sent = [o.sent for o in outcomes]
    admitted = [o for o in outcomes if o.is_admitted]
    unit_cost = 1.0
    if limit.unit == "tokens":
        unit_cost = float(max((o.tokens or 0 for o in admitted), default=1) or 1)
    peak, peak_at = _peak_excess(outcomes, limit)
    kinds = Counter(o.kind for o in outcomes)
    errors = {k: n for k, n in sorted(kinds.items()) if k not in ("admitted", "limited")}
    return Accuracy(
        scenario=scenario,
        store=store,
        limit=limit,
        offered_rate=offered_rate,
        span=max(sent) - min(sent),
        sent=len(outcomes),
        admitted=len(admitted),
        limited=kinds["limited"],
        errors=sum(errors.values()),
        error_kinds=errors,
        admitted_units=_units(admitted, limit.unit),
        unit_cost=unit_cost,
        peak_excess=peak,
        peak_excess_at=peak_at,
        per_gateway=tuple(
            GatewayCounts.of(g, [o for o in outcomes if o.gateway == g], limit.unit)
            for g in range(gateways)
        ),
    )


def _peak_excess(outcomes: Sequence[Outcome], limit: LimitSpec) -> tuple[float, float]:
    """The largest ``admitted(sent <= t) - limit.expected(t)`` over the run, and its ``t``.

    ``t`` is seconds after the first send; each admitted request counts at its send time,
    with its final cost (tokens used). Positive: some prefix of the run admitted more than
    the limit allows over that prefix (a token reservation below the usage, reconciled only
    after the answer, does this while answers are in flight; the debt is repaid later).
    """
    ordered = sorted(outcomes, key=lambda o: o.sent)
    t0 = ordered[0].sent
    admitted = 0.0
    peak, peak_at = -limit.burst, 0.0
    for o in ordered:
        if not o.is_admitted:
            continue
        admitted += (o.tokens or 0) if limit.unit == "tokens" else 1
        excess = admitted - limit.expected(o.sent - t0)
        if excess > peak:
            peak, peak_at = excess, o.sent - t0
    return peak, peak_at


ACCURACY_HEADER = [
    "scenario", "store", "limit", "gateways", "offered req/s", "sent", "span s", "2xx", "429",
    "other", "admitted", "expected", "error %", "tolerance", "verdict",
]  # fmt: skip


def _num(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def accuracy_rows(results: Sequence[Accuracy]) -> list[list[str]]:
    """Rows of the accuracy table, header first; admitted/expected in the limit's unit."""
    rows = [ACCURACY_HEADER]
    for a in results:
        unit = "tok" if a.limit.unit == "tokens" else "req"
        rows.append(
            [
                a.scenario,
                a.store,
                a.limit.label,
                str(len(a.per_gateway)),
                f"{a.achieved_rate:.1f}",
                str(a.sent),
                f"{a.span:.3f}",
                str(a.admitted),
                str(a.limited),
                f"{a.errors} !" if a.errors else "0",
                f"{_num(a.admitted_units)} {unit}",
                f"{a.expected:.1f} {unit}",
                f"{a.error_pct:+.2f}",
                f"±{a.tolerance:.1f}",
                "within" if a.is_within else "MISSED",
            ]
        )
    return rows


GATEWAY_HEADER = ["scenario", "gateway", "store", "sent", "2xx", "429", "other", "admitted",
                  "p50 ms", "p99 ms"]  # fmt: skip


def gateway_rows(results: Sequence[Accuracy]) -> list[list[str]]:
    """Rows of the per-gateway table, header first; latency over every answer."""
    rows = [GATEWAY_HEADER]
    for a in results:
        for g in a.per_gateway:
            rows.append(
                [
                    a.scenario,
                    f"#{g.gateway}",
                    a.store,
                    str(g.sent),
                    str(g.admitted),
                    str(g.limited),
                    f"{g.errors} !" if g.errors else "0",
                    _num(g.admitted_units),
                    "-" if g.p50 is None else f"{g.p50 / MS:.2f}",
                    "-" if g.p99 is None else f"{g.p99 / MS:.2f}",
                ]
            )
    return rows


# --- overhead ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class OverheadRun:
    """One wrk run against the gateway with limiting on (Redis) or off, and the CPU used.

    CPU figures are user + system seconds from ``/proc/<pid>/stat`` read right before and
    right after wrk (10 ms resolution at 100 Hz clock ticks).
    """

    repeat: int  # 1-based
    limiting: bool
    seq: int  # position in the whole overhead run, 0 first
    wrk: WrkSummary
    gateway_cpu: float  # seconds, the gateway that took the load
    redis_cpu: float  # seconds
    backend_cpu: float  # seconds
    redis_connections: int = 0  # connections Redis accepted during the run
    redis_scripts: int = 0  # rate-limit scripts Redis ran during the run
    fallback: int = 0  # decisions the gateway took without Redis (call_timeout missed)

    @property
    def label(self) -> str:
        return "on" if self.limiting else "off"

    def _per_request_us(self, cpu: float) -> float | None:
        ok = self.wrk.ok_requests
        return cpu / ok / US if ok > 0 else None

    @property
    def gateway_us_per_request(self) -> float | None:
        """Gateway CPU microseconds per successful request."""
        return self._per_request_us(self.gateway_cpu)

    @property
    def redis_us_per_request(self) -> float | None:
        """Redis CPU microseconds per successful request."""
        return self._per_request_us(self.redis_cpu)

    def to_json(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 1)

        return {
            "repeat": self.repeat,
            "limiting": self.label,
            "seq": self.seq,
            "wrk": self.wrk.to_json(),
            "gateway_cpu_s": round(self.gateway_cpu, 3),
            "redis_cpu_s": round(self.redis_cpu, 3),
            "backend_cpu_s": round(self.backend_cpu, 3),
            "gateway_cpu_us_per_request": r(self.gateway_us_per_request),
            "redis_cpu_us_per_request": r(self.redis_us_per_request),
            "redis_connections": self.redis_connections,
            "redis_scripts": self.redis_scripts,
            "fallback_decisions": self.fallback,
            "gateway_cpu_share": round(self.gateway_cpu / self.wrk.duration, 3)
            if self.wrk.duration > 0
            else None,
        }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _pairs(runs: Sequence[OverheadRun]) -> list[tuple[OverheadRun, OverheadRun]]:
    """(on, off) per repeat that has both."""
    by_key = {(r.repeat, r.limiting): r for r in runs}
    return [
        (by_key[(rep, True)], by_key[(rep, False)])
        for rep in sorted({r.repeat for r in runs})
        if (rep, True) in by_key and (rep, False) in by_key
    ]


def _run_ratios(on: OverheadRun, off: OverheadRun) -> dict[str, float | None]:
    return {
        "rps": _ratio(on.wrk.rps, off.wrk.rps),
        "p50": _ratio(on.wrk.p50, off.wrk.p50),
        "p99": _ratio(on.wrk.p99, off.wrk.p99),
        "gateway_cpu_us_per_request": _ratio(on.gateway_us_per_request, off.gateway_us_per_request),
    }


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def overhead_summary(runs: Sequence[OverheadRun]) -> dict[str, Any]:
    """Medians per setting, per-repeat ratios on/off and their median.

    Ratios are on / off of the same repeat: req/s below 1, latency and CPU above 1 are the
    cost of limiting. The median ratio is the median of the per-repeat ratios.
    """
    out: dict[str, Any] = {}
    for limiting in (True, False):
        mine = [r for r in runs if r.limiting is limiting]
        if not mine:
            continue
        out["on" if limiting else "off"] = {
            "rps": round(statistics.median(r.wrk.rps for r in mine), 1),
            "p50_ms": round(statistics.median(r.wrk.p50 for r in mine) / MS, 3),
            "p99_ms": round(statistics.median(r.wrk.p99 for r in mine) / MS, 3),
            "errors": sum(r.wrk.errors for r in mine),
            "gateway_cpu_us_per_request": _round(_median([r.gateway_us_per_request for r in mine])),
            "redis_cpu_us_per_request": _round(_median([r.redis_us_per_request for r in mine])),
            "fallback": sum(r.fallback for r in mine),
        }
    ratios = [_run_ratios(on, off) for on, off in _pairs(runs)]
    out["ratios"] = [{k: _round(v, 3) for k, v in r.items()} for r in ratios]
    out["median_ratio"] = {k: _round(_median([r[k] for r in ratios]), 3) for k in _KEYS}
    on, off = out.get("on"), out.get("off")
    if on and off and on["gateway_cpu_us_per_request"] and off["gateway_cpu_us_per_request"]:
        out["gateway_cpu_us_per_request_added"] = round(
            on["gateway_cpu_us_per_request"] - off["gateway_cpu_us_per_request"], 1
        )
    return out


_KEYS = ("rps", "p50", "p99", "gateway_cpu_us_per_request")


def _round(x: float | None, n: int = 1) -> float | None:
    return None if x is None else round(x, n)


OVERHEAD_HEADER = [
    "limiting", "repeat", "order", "req/s", "p50 ms", "p99 ms", "errors", "gw CPU µs/req",
    "gw CPU %", "redis CPU µs/req", "redis scripts", "redis conns", "fallback", "ratio req/s",
    "ratio p50", "ratio p99", "ratio gw CPU",
]  # fmt: skip


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def overhead_rows(runs: Sequence[OverheadRun]) -> list[list[str]]:
    """Rows of the overhead table, header first: each run in order, then the medians.

    Ratio columns (on / off of the same repeat) sit on the ``on`` rows; on the median row
    they hold the median of the per-repeat ratios. ``repeat`` is in column 2 so that
    ``report.render_markdown`` bolds the median rows (it looks for "median" there).
    """
    rows = [OVERHEAD_HEADER]
    ratios = {on.repeat: _run_ratios(on, off) for on, off in _pairs(runs)}
    for run in sorted(runs, key=lambda r: r.seq):
        rt = ratios.get(run.repeat) if run.limiting else None
        share = 100 * run.gateway_cpu / run.wrk.duration if run.wrk.duration > 0 else None
        rows.append(
            [
                run.label,
                str(run.repeat),
                str(run.seq + 1),
                f"{run.wrk.rps:.0f}",
                f"{run.wrk.p50 / MS:.2f}",
                f"{run.wrk.p99 / MS:.2f}",
                f"{run.wrk.errors} !" if run.wrk.errors else "0",
                _f(run.gateway_us_per_request, ".0f"),
                _f(share, ".0f"),
                _f(run.redis_us_per_request, ".0f"),
                str(run.redis_scripts),
                str(run.redis_connections),
                f"{run.fallback} !" if run.fallback else "0",
                *(_f(None if rt is None else rt[k], ".2f") for k in _KEYS),
            ]
        )
    summary = overhead_summary(runs)
    for label in ("on", "off"):
        m = summary.get(label)
        if m is None:
            continue
        mr = summary["median_ratio"] if label == "on" else None
        rows.append(
            [
                label,
                "median",
                "-",
                f"{m['rps']:.0f}",
                f"{m['p50_ms']:.2f}",
                f"{m['p99_ms']:.2f}",
                f"{m['errors']} !" if m["errors"] else "0",
                _f(m["gateway_cpu_us_per_request"], ".0f"),
                "-",
                _f(m["redis_cpu_us_per_request"], ".0f"),
                "-",
                "-",
                str(m["fallback"]),
                *(_f(None if mr is None else mr[k], ".2f") for k in _KEYS),
            ]
        )
    return rows
