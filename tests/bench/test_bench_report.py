"""bench/report.py: parsing wrk's summary line, pairing repeats, medians and ratios."""

from __future__ import annotations

import json

import pytest

from bench.report import (
    SUMMARY_MARKER,
    Run,
    Target,
    WrkSummary,
    parse_wrk_output,
    render_markdown,
    render_text,
    summarise,
    table_rows,
)


def wrk_line(*, requests: int, p50_us: int, p99_us: int, status_errors: int = 0) -> str:
    raw = {
        "duration_us": 1_000_000, "requests": requests, "bytes": 100 * requests,
        "latency_us": {"min": 1, "mean": p50_us, "max": p99_us, "stdev": 1.0,
                       "percentiles": {"50": p50_us, "90": p99_us, "99": p99_us, "99.9": p99_us}},
        "errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0, "status": status_errors},
    }  # fmt: skip
    return SUMMARY_MARKER + json.dumps(raw)


def make_run(target: Target, repeat: int, rps: int, p50_us: int, *, cpu: float = 0.0) -> Run:
    summary = parse_wrk_output(wrk_line(requests=rps, p50_us=p50_us, p99_us=2 * p50_us))
    return Run(
        scenario="chat", target=target, repeat=repeat, wrk=summary,
        gateway_cpu=cpu, backend_cpu=0.5, wrk_cpu=0.1, seq=repeat * 2,
    )  # fmt: skip


def test_parse_reads_the_marker_line_and_ignores_wrk_text() -> None:
    stdout = "Running 1s test @ http://127.0.0.1:1/\n  Requests/sec: 1.0\n"
    stdout += wrk_line(requests=2000, p50_us=1500, p99_us=4000, status_errors=3) + "\n"
    s = parse_wrk_output(stdout)
    assert s.requests == 2000
    assert s.rps == pytest.approx(2000)
    assert s.p50 == pytest.approx(0.0015)
    assert s.p99 == pytest.approx(0.004)
    assert s.errors == 3
    assert s.ok_requests == 1997


@pytest.mark.parametrize("stdout", ["no summary here\n", SUMMARY_MARKER + "{not json\n"])
def test_parse_rejects_missing_or_broken_summary(stdout: str) -> None:
    with pytest.raises(ValueError, match="summary"):
        parse_wrk_output(stdout)


def test_ratios_are_per_repeat_and_their_median_is_reported() -> None:
    runs = [
        make_run(Target.DIRECT, 1, 1000, 1000),
        make_run(Target.GATEWAY, 1, 500, 2000, cpu=0.1),  # ratio 0.5
        make_run(Target.GATEWAY, 2, 900, 1000, cpu=0.09),  # ratio 0.45
        make_run(Target.DIRECT, 2, 2000, 500),
        make_run(Target.DIRECT, 3, 1000, 1000),
        make_run(Target.GATEWAY, 3, 800, 1200, cpu=0.08),  # ratio 0.8
    ]
    [chat] = summarise(runs)
    assert [round(r.rps, 3) for _, _, r in chat.pairs] == [0.5, 0.45, 0.8]
    assert chat.ratio.rps == pytest.approx(0.5)
    assert chat.ratio.p50 == pytest.approx(2.0)
    assert chat.direct.rps == 1000
    assert chat.gateway.rps == 800
    # 0.1 s of gateway CPU over 500 requests
    assert chat.pairs[0][1].gateway_us_per_request == pytest.approx(200)
    assert chat.pairs[0][0].gateway_us_per_request is None  # not reported for direct runs
    assert chat.gateway.gateway_us_per_request == pytest.approx(100)


def test_a_repeat_missing_a_target_is_left_out() -> None:
    runs = [make_run(Target.DIRECT, 1, 1000, 1000), make_run(Target.GATEWAY, 1, 500, 2000),
            make_run(Target.DIRECT, 2, 1000, 1000)]  # fmt: skip
    [chat] = summarise(runs)
    assert len(chat.pairs) == 1


def test_tables_flag_errors_and_show_medians() -> None:
    bad = WrkSummary(duration=1.0, requests=10, bytes_read=0, p50=0.001, p90=0.001, p99=0.002,
                     p999=0.002, mean=0.001, max=0.002, errors_status=2)  # fmt: skip
    runs = [
        make_run(Target.DIRECT, 1, 1000, 1000),
        Run(scenario="chat", target=Target.GATEWAY, repeat=1, wrk=bad, gateway_cpu=0.0,
            backend_cpu=0.0, wrk_cpu=0.0, seq=3),
    ]  # fmt: skip
    rows = table_rows(summarise(runs))
    assert rows[2][6] == "2 !"
    assert [r[1] for r in rows[1:]] == ["1", "1", "median", "median"]
    assert "ratio req/s" in render_text(rows)
    assert render_markdown(rows).splitlines()[-1].startswith("| **chat** | **median**")
