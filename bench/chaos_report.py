"""Figures of a chaos run: classify each request, summarise a scenario, judge the targets.

Rule: this module computes and renders; it never starts a process, sends a request or reads
the admin API (``bench/chaos.py`` does, and hands the observations here).

What counts as what (per request, in ``classify``):

* **ok**: a 2xx answer.
* **violation**: an ok answer whose ``X-Served-Region`` (stamped by the backend that served
  it) is not a region of the request's zone, or is missing (residency unproven counts against
  us). The zone of a request is the one its client address implies (``X-Forwarded-For``
  2.125.160.216 is GB -> eu, 8.8.8.8 is US -> us, 133.242.0.3 is JP -> global).
* **fail-closed**: a 503 whose problem body names the request's own zone, in a scenario that
  takes down every region of that zone (``zone``). Expected, and counted apart from failures.
* **failure**: anything else: another status, or no answer at all (the exception's type).

Units: times are float seconds since the scenario started in the records; JSON keys and
tables give milliseconds and say so (``detection_ms``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "COUNTERS",
    "Observation",
    "Outcome",
    "RequestRecord",
    "ScenarioSpec",
    "Verdict",
    "classify",
    "counter_totals",
    "judge",
    "render_markdown_section",
    "render_scenario",
    "render_table",
    "summarise",
    "summary_rows",
]

MS = 1000.0  # milliseconds per second
SAMPLES = 20  # failures / violations kept verbatim per scenario, as evidence


class Outcome(StrEnum):
    OK = "ok"
    VIOLATION = "violation"
    FAIL_CLOSED = "fail-closed"
    FAILURE = "failure"


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRecord:
    """One request of the load, as the client saw it.

    Attributes:
        n: sequence number in the scenario (also its ``X-Request-Id`` suffix).
        sent: seconds since the scenario started when it was sent.
        done: seconds since the scenario started when its answer (or error) was complete.
        zone: the zone its client address implies: ``"eu"``, ``"us"`` or ``"global"``.
        kind: ``"GET /ready"`` or ``"POST /chat/invoke"`` (with an Idempotency-Key).
        status: the HTTP status; 0 when no answer came.
        served_region: the ``X-Served-Region`` field of the answer, None without one.
        error: the exception's type name when ``status`` is 0.
        problem_zone: the ``zone`` member of a 503 problem body, else None.
        detail: a short excerpt of a non-2xx body or of the exception, for evidence.
    """

    n: int
    sent: float
    done: float
    zone: str
    kind: str
    status: int
    served_region: str | None = None
    error: str | None = None
    problem_zone: str | None = None
    detail: str | None = None

    @property
    def error_class(self) -> str:
        """``"HTTP 502"``, or the exception type (``"ServerDisconnectedError"``), or ``"ok"``."""
        if self.status == 0:
            return self.error or "no answer"
        return "ok" if 200 <= self.status < 300 else f"HTTP {self.status}"

    def to_json(self, *, since: float = 0.0) -> dict[str, Any]:
        """JSON-ready, times in ms relative to ``since`` (seconds since the scenario start)."""
        return {
            "n": self.n,
            "sent_ms": round((self.sent - since) * MS, 1),
            "done_ms": round((self.done - since) * MS, 1),
            "zone": self.zone,
            "kind": self.kind,
            "class": self.error_class,
            "served_region": self.served_region,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ScenarioSpec:
    """What a scenario breaks and who it should hurt.

    Attributes:
        name: ``replica``, ``region``, ``zone`` or ``hang``.
        fault: human description, e.g. ``"SIGKILL us-east-1#0"``.
        dead_regions: regions with every endpoint down during the fault; an answer from one
            of them after the kill cannot be a failover.
        affected_zones: zones whose requests went to a victim before the fault.
        fail_closed_zones: zones left with no region at all: their 503s are expected.
    """

    name: str
    fault: str
    dead_regions: frozenset[str] = frozenset()
    affected_zones: tuple[str, ...] = ()
    fail_closed_zones: frozenset[str] = frozenset()


@dataclass(slots=True, kw_only=True)
class Observation:
    """What the harness saw besides the requests (seconds since the scenario start).

    Attributes:
        kill: when the signal(s) went out.
        restore: when the restart (or SIGCONT) was issued.
        end: when the load stopped.
        detection: first ``/status`` answer showing the victim (or every victim region)
            ``available: false``; None if not seen before ``restore``.
        detected_by: what made it unavailable then: ``probe``, ``outlier``, ``breaker``,
            ``retry-after``.
        probe_verdict: first ``/status`` answer with every victim endpoint ``healthy: false``
            (the active probes' verdict alone); None if not seen before ``restore``.
        listening: when every restarted backend printed ``listening`` (None for SIGCONT).
        recovery: first ``/status`` answer with every victim available again; None if not
            within the recovery timeout.
        settled: the whole topology was available again before the next scenario.
        metrics: gateway counters, after minus before (``counter_totals`` keys).
    """

    kill: float
    restore: float
    end: float
    detection: float | None = None
    detected_by: list[str] = field(default_factory=list)
    probe_verdict: float | None = None
    listening: float | None = None
    recovery: float | None = None
    settled: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


def classify(
    record: RequestRecord,
    zone_regions: Mapping[str, frozenset[str]],
    fail_closed_zones: frozenset[str] = frozenset(),
) -> Outcome:
    """Decide what one request counts as (see the module docstring).

    Args:
        record: the request.
        zone_regions: zone -> the regions allowed to serve it.
        fail_closed_zones: zones whose own 503 is expected in this scenario.
    """
    if 200 <= record.status < 300:
        allowed = zone_regions.get(record.zone, frozenset())
        return Outcome.OK if record.served_region in allowed else Outcome.VIOLATION
    if (
        record.status == 503
        and record.zone in fail_closed_zones
        and record.problem_zone == record.zone
    ):
        return Outcome.FAIL_CLOSED
    return Outcome.FAILURE


# Counters read from the gateway's /metrics before and after each scenario: sample name ->
# the label to group by (None: one total).
COUNTERS: dict[str, str | None] = {
    "geogate_retries_total": "reason",
    "geogate_retry_budget_exhausted_total": None,
    "geogate_upstream_ejections_total": None,
    "geogate_residency_blocked_total": "zone",
    "geogate_breaker_transitions_total": "state",
    "geogate_health_transitions_total": "healthy",
}


def counter_totals(text: str) -> dict[str, float]:
    """Sum the COUNTERS in a Prometheus text exposition.

    Returns:
        ``{"geogate_retries_total": 12.0, "geogate_retries_total{reason=connect}": 10.0,
        ...}``: each counter's total, and per value of its grouping label.
    """
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in COUNTERS:
                continue
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
            label = COUNTERS[sample.name]
            if label is not None and label in sample.labels:
                key = f"{sample.name}{{{label}={sample.labels[label]}}}"
                out[key] = out.get(key, 0.0) + sample.value
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * MS, 1)


def summarise(
    spec: ScenarioSpec,
    records: Sequence[RequestRecord],
    obs: Observation,
    zone_regions: Mapping[str, frozenset[str]],
) -> dict[str, Any]:
    """Reduce one scenario to its figures (JSON-ready).

    Failover (per affected zone): the first ok answer to a request of that zone sent at or
    after the kill and served by a region not in ``spec.dead_regions``, measured from the
    kill to that answer. When only one endpoint of a region is down (``replica``, ``hang``)
    the answer names the region, not the endpoint: this is then the first success after the
    kill, which may have come from the surviving endpoint without any retry; the gateway's
    retry counter (``metrics``) shows whether retries happened.

    Returns:
        A dict with ``requests``, ``by_zone``, ``failures`` (count), ``failures_by_class``
        (``[{"zone", "kind", "class", "count"}]``), ``failure_samples`` (first SAMPLES, times
        relative to the kill), ``fail_closed``, ``violations``, ``violation_samples``, and
        the times in ms from the kill: ``detection_ms``, ``probe_verdict_ms``,
        ``failover_ms`` (zone -> ms or None), ``first_fail_closed_ms``; ``listening_ms`` and
        ``recovery_ms`` are measured from the restore.
    """
    outcomes = [classify(r, zone_regions, spec.fail_closed_zones) for r in records]
    by_zone: dict[str, Counter[str]] = {}
    classes: Counter[tuple[str, str, str]] = Counter()
    failure_samples: list[dict[str, Any]] = []
    violation_samples: list[dict[str, Any]] = []
    failover: dict[str, float | None] = dict.fromkeys(spec.affected_zones)
    first_fail_closed: float | None = None
    for record, outcome in zip(records, outcomes, strict=True):
        by_zone.setdefault(record.zone, Counter())["requests"] += 1
        by_zone[record.zone][str(outcome)] += 1
        if outcome is Outcome.FAILURE:
            classes[record.zone, record.kind, record.error_class] += 1
            if len(failure_samples) < SAMPLES:
                failure_samples.append(record.to_json(since=obs.kill))
        elif outcome is Outcome.VIOLATION and len(violation_samples) < SAMPLES:
            violation_samples.append(record.to_json(since=obs.kill))
        elif outcome is Outcome.FAIL_CLOSED and record.sent >= obs.kill:
            first_fail_closed = min(first_fail_closed or record.done, record.done)
        if (
            outcome is Outcome.OK
            and record.zone in failover
            and record.sent >= obs.kill
            and record.served_region not in spec.dead_regions
        ):
            took = record.done - obs.kill
            best = failover[record.zone]
            failover[record.zone] = took if best is None else min(best, took)
    counts = Counter(outcomes)
    before_kill: dict[str, float | None] = {}
    if spec.dead_regions:  # did the fault hit live traffic? (the zone's share, last second)
        for zone in spec.affected_zones:
            window = [
                r
                for r, o in zip(records, outcomes, strict=True)
                if o is Outcome.OK and r.zone == zone and obs.kill - 1.0 <= r.sent < obs.kill
            ]
            dead = sum(r.served_region in spec.dead_regions for r in window)
            before_kill[zone] = round(dead / len(window), 3) if window else None
    return {
        "name": spec.name,
        "fault": spec.fault,
        "affected_zones": list(spec.affected_zones),
        "schedule_s": {
            "kill": round(obs.kill, 3),
            "restore": round(obs.restore, 3),
            "end": round(obs.end, 3),
        },
        "requests": len(records),
        "by_zone": {z: dict(c) for z, c in sorted(by_zone.items())},
        "ok": counts[Outcome.OK],
        "failures": counts[Outcome.FAILURE],
        "failures_by_class": [
            {"zone": z, "kind": k, "class": c, "count": n}
            for (z, k, c), n in sorted(classes.items())
        ],
        "failure_samples": failure_samples,
        "fail_closed": counts[Outcome.FAIL_CLOSED],
        "violations": counts[Outcome.VIOLATION],
        "violation_samples": violation_samples,
        "detection_ms": _ms(None if obs.detection is None else obs.detection - obs.kill),
        "detected_by": obs.detected_by,
        "probe_verdict_ms": _ms(
            None if obs.probe_verdict is None else obs.probe_verdict - obs.kill
        ),
        "failover_ms": {z: _ms(v) for z, v in failover.items()},
        "dead_region_share_before_kill": before_kill,
        "first_fail_closed_ms": _ms(
            None if first_fail_closed is None else first_fail_closed - obs.kill
        ),
        "listening_ms": _ms(None if obs.listening is None else obs.listening - obs.restore),
        "recovery_ms": _ms(None if obs.recovery is None else obs.recovery - obs.restore),
        "settled": obs.settled,
        "gateway_counters": {k: round(v, 3) for k, v in sorted(obs.metrics.items()) if v},
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """One target of the issue, met or missed."""

    target: str
    passed: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "passed": self.passed, "detail": self.detail}


def judge(results: Sequence[Mapping[str, Any]], *, probe: Mapping[str, Any]) -> list[Verdict]:
    """Judge the targets of the failover issue on the scenarios that ran.

    * ``replica``: no failed (idempotent) request at all.
    * ``region``: detection within ``interval x unhealthy_threshold``, plus one probe
      ``timeout`` of slack (the last failing probe may take up to that long to give up).
    * ``zone``: no failed US or global request (EU 503s naming the zone are expected).
    * every scenario: zero residency violations, and everything available again after the
      restore.

    Args:
        results: ``summarise`` outputs.
        probe: ``{"interval_ms", "timeout_ms", "healthy_threshold", "unhealthy_threshold"}``.
    """
    verdicts: list[Verdict] = []
    by_name = {r["name"]: r for r in results}
    if (r := by_name.get("replica")) is not None:
        verdicts.append(
            Verdict(
                target="replica",
                passed=r["failures"] == 0,
                detail=f"failed idempotent requests: {r['failures']} of {r['requests']}",
            )
        )
    if (r := by_name.get("region")) is not None:
        base = probe["interval_ms"] * probe["unhealthy_threshold"]
        bound = base + probe["timeout_ms"]
        got = r["detection_ms"]
        verdicts.append(
            Verdict(
                target="region",
                passed=got is not None and got <= bound,
                detail=(
                    f"detection {'not seen' if got is None else f'{got:.0f} ms'} <= "
                    f"{bound:.0f} ms (interval {probe['interval_ms']:.0f} ms x "
                    f"unhealthy_threshold {probe['unhealthy_threshold']} = {base:.0f} ms, "
                    f"+ one probe timeout {probe['timeout_ms']:.0f} ms of slack)"
                ),
            )
        )
    if (r := by_name.get("zone")) is not None:
        others = sum(
            c["count"] for c in r["failures_by_class"] if c["zone"] not in ("eu",)
        )  # EU failures are reported, but only US/global ones break the target
        verdicts.append(
            Verdict(
                target="zone",
                passed=others == 0,
                detail=(
                    f"US/global failures: {others}; EU fail-closed 503s (expected): "
                    f"{r['fail_closed']}; EU other failures: {r['failures'] - others}"
                ),
            )
        )
    if results:
        each = ", ".join(f"{r['name']} {r['violations']}" for r in results)
        verdicts.append(
            Verdict(
                target="every scenario",
                passed=all(r["violations"] == 0 for r in results),
                detail=f"residency violations: {each}",
            )
        )
        unsettled = [r["name"] for r in results if not r["settled"]]
        verdicts.append(
            Verdict(
                target="every scenario",
                passed=not unsettled,
                detail="everything available again after the restore"
                + (f"; NOT in: {', '.join(unsettled)}" if unsettled else ""),
            )
        )
    return verdicts


# --- rendering ---------------------------------------------------------------------------------

HEADER = [
    "scenario", "fault", "detected by", "requests", "failures", "fail-closed 503",
    "violations", "detection ms", "probe verdict ms", "failover ms", "recovery ms", "retries",
]  # fmt: skip


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.0f} %"


def _failover_cell(result: Mapping[str, Any]) -> str:
    values = result["failover_ms"]
    if not values:
        return "-"
    return " / ".join(f"{z} {_fmt(v)}" for z, v in values.items())


def summary_rows(results: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Rows of the summary table, header first."""
    rows = [HEADER]
    for r in results:
        rows.append(
            [
                r["name"],
                r["fault"],
                "+".join(r["detected_by"]) or "-",
                str(r["requests"]),
                str(r["failures"]) + ("!" if r["failures"] else ""),
                str(r["fail_closed"]),
                str(r["violations"]) + ("!" if r["violations"] else ""),
                _fmt(r["detection_ms"]),
                _fmt(r["probe_verdict_ms"]),
                _failover_cell(r),
                _fmt(r["recovery_ms"]),
                _fmt(r["gateway_counters"].get("geogate_retries_total", 0.0)),
            ]
        )
    return rows


def render_table(rows: Sequence[Sequence[str]], *, markdown: bool = False) -> str:
    """Render rows (header first) as aligned text, or as a GitHub Markdown table."""
    if markdown:
        out = ["| " + " | ".join(rows[0]) + " |"]
        out.append("|" + "|".join([" --- "] * 3 + [" ---: "] * (len(rows[0]) - 3)) + "|")
        out += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        return "\n".join(out)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i < 3 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def _zone_counts(zone: str, counts: Mapping[str, int]) -> str:
    rest = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "requests")
    return f"{zone} {counts['requests']} ({rest})"


def render_scenario(r: Mapping[str, Any]) -> str:
    """A few lines on one scenario for the terminal: counts by zone, classes, times."""
    s = r["schedule_s"]
    lines = [
        f"== {r['name']}: {r['fault']} at {s['kill']:.2f} s, restore at {s['restore']:.2f} s, "
        f"load until {s['end']:.2f} s",
        "   by zone: " + "; ".join(_zone_counts(z, c) for z, c in r["by_zone"].items()),
        f"   failures {r['failures']}, expected fail-closed {r['fail_closed']}, "
        f"violations {r['violations']}",
    ]
    for c in r["failures_by_class"]:
        lines.append(f"     {c['zone']:6} {c['kind']:18} {c['class']}: {c['count']}")
    lines.append(
        f"   detection {_fmt(r['detection_ms'])} ms ({'+'.join(r['detected_by']) or '-'}); "
        f"probe verdict {_fmt(r['probe_verdict_ms'])} ms; failover {_failover_cell(r)} ms"
        + (
            f"; first fail-closed 503 {_fmt(r['first_fail_closed_ms'])} ms"
            if r["first_fail_closed_ms"] is not None
            else ""
        )
    )
    if r["dead_region_share_before_kill"]:
        lines.append(
            "   share of ok answers from the killed region(s) in the second before the kill: "
            + ", ".join(f"{z} {_pct(v)}" for z, v in r["dead_region_share_before_kill"].items())
        )
    lines.append(
        f"   restore: listening {_fmt(r['listening_ms'])} ms, available again "
        f"{_fmt(r['recovery_ms'])} ms after it; settled {r['settled']}"
    )
    if r["gateway_counters"]:
        lines.append(
            "   gateway counters: "
            + ", ".join(
                f"{k.removeprefix('geogate_')} {v:g}" for k, v in r["gateway_counters"].items()
            )
        )
    for sample in r["failure_samples"][:5]:
        lines.append(f"   failure sample (ms from kill): {sample}")
    for sample in r["violation_samples"][:5]:
        lines.append(f"   VIOLATION (ms from kill): {sample}")
    return "\n".join(lines)


_MARKDOWN_COUNTERS = {
    "geogate_retries_total",
    "geogate_retry_budget_exhausted_total",
    "geogate_upstream_ejections_total",
    "geogate_residency_blocked_total",
}


def render_markdown_section(result: Mapping[str, Any]) -> str:
    """The RESULTS.md section of one chaos run: setup, table, failure classes, verdicts."""
    m, s = result["machine"], result["settings"]
    p = s["probe"]
    lines = [
        f"## Chaos {result['started_utc'][:16].replace('T', ' ')} UTC, commit {m['git_commit']}",
        "",
        "Recorded by `bench/chaos.py --record` (see its docstring for the method).",
        "",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['kernel']}; Python {m['python']}, "
        f"aiohttp {m['aiohttp']}, uvloop {m['uvloop']}",
        f"- Load average (1, 5, 15 min) before: {' '.join(map(str, m['load_average']))}; after: "
        f"{' '.join(map(str, result['load_average_after']))}",
        f"- Command: `{result['command']}`",
        f"- Topology: {s['topology']}; gateway in us-east-1",
        f"- Probes: interval {p['interval_ms']:.0f} ms, timeout {p['timeout_ms']:.0f} ms, "
        f"healthy_threshold {p['healthy_threshold']}, unhealthy_threshold "
        f"{p['unhealthy_threshold']} (jitter ±{p['jitter'] * 100:.0f} %); outlier "
        f"{s['outlier']}; breaker {s['breaker']}; route {s['route']}",
        f"- Load: {s['concurrency']} workers, {s['rate_desc']}; zones eu/us/global and GET "
        "/ready / POST /chat/invoke + Idempotency-Key in turn; schedule x "
        f"{s['time_scale']:g} (kill at 2 s, restore at 6 s, load until 9 s)",
        "- detection / probe verdict / failover: ms from the kill; recovery: ms from the "
        "restart (or SIGCONT) until the gateway shows the victim available again; retries: "
        "the gateway's `geogate_retries_total` during the scenario. Failover for `replica` "
        "and `hang` is the first success of an affected zone after the kill (the response "
        "names the region, not the endpoint). `region` drains eu-central-1 for the first "
        "second (x scale) so that EU traffic is on eu-west-1 when it dies; the share of EU "
        "answers from it in the second before the kill is under the counters.",
        "",
        render_table(summary_rows(result["scenarios"]), markdown=True),
        "",
    ]
    classes = [(r["name"], c) for r in result["scenarios"] for c in r["failures_by_class"]]
    if classes:
        lines += ["Failures by class:", ""]
        lines += [
            f"- {name}: {c['zone']} {c['kind']}: {c['class']} x {c['count']}" for name, c in classes
        ]
        lines += ["", "Failed requests (first 5 per scenario; ms from the kill):", ""]
        for r in result["scenarios"]:
            for f in r["failure_samples"][:5]:
                lines.append(
                    f"- {r['name']}: {f['zone']} {f['kind']}: {f['class']}, sent at "
                    f"{f['sent_ms']:+.1f} ms, answered at {f['done_ms']:+.1f} ms: {f['detail']}"
                )
        lines.append("")
    lines += ["Gateway counters during each scenario (from its /metrics):", ""]
    for r in result["scenarios"]:
        counters = r["gateway_counters"]
        shown = [
            f"{k.removeprefix('geogate_').replace('_total', '')} {v:g}"
            for k, v in counters.items()
            if k.split("{")[0] in _MARKDOWN_COUNTERS
        ]
        share = r["dead_region_share_before_kill"]
        if share:
            shown.append(
                "share of ok answers from the killed region(s) in the second before the kill: "
                + ", ".join(f"{z} {_pct(v)}" for z, v in share.items())
            )
        lines.append(f"- {r['name']}: {', '.join(shown) or 'none'}")
    lines.append("")
    lines += ["Verdicts:", ""]
    lines += [f"- {v['target']}: **{'PASS' if v['passed'] else 'FAIL'}**, {v['detail']}"
              for v in result["verdicts"]]  # fmt: skip
    lines.append("")
    return "\n".join(lines)
