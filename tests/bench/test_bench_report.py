"""bench/report.py: parsing wrk's summary line, grouping repeats, medians and ratios."""

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


def make_run(
    target: Target, repeat: int, rps: int, p50_us: int, *, cpu: float = 0.0, seq: int = 0
) -> Run:
    summary = parse_wrk_output(wrk_line(requests=rps, p50_us=p50_us, p99_us=2 * p50_us))
    return Run(
        scenario="chat", target=target, repeat=repeat, wrk=summary,
        gateway_cpu=cpu, backend_cpu=0.5, wrk_cpu=0.1, seq=seq or repeat * 3,
    )  # fmt: skip


GW, DIRECT, CACHED = Target.GATEWAY, Target.DIRECT, Target.GATEWAY_CACHED


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
    assert chat.targets == (DIRECT, GW)
    assert list(chat.ratios) == [(GW, DIRECT)]  # no gateway-cached: no other comparison
    assert [round(r.ratios[GW, DIRECT].rps, 3) for r in chat.repeats] == [0.5, 0.45, 0.8]
    assert chat.ratios[GW, DIRECT].rps == pytest.approx(0.5)
    assert chat.ratios[GW, DIRECT].p50 == pytest.approx(2.0)
    assert chat.ratios[GW, DIRECT].cpu is None  # direct runs have no gateway CPU per request
    assert chat.medians[DIRECT].rps == 1000
    assert chat.medians[GW].rps == 800
    # 0.1 s of gateway CPU over 500 requests
    assert chat.repeats[0].runs[GW].gateway_us_per_request == pytest.approx(200)
    assert chat.repeats[0].runs[DIRECT].gateway_us_per_request is None  # not for direct runs
    assert chat.medians[GW].gateway_us_per_request == pytest.approx(100)
    assert "gateway-cached/gateway" not in json.dumps(chat.to_json())


def test_cached_gateway_is_compared_with_direct_and_with_the_uncached_gateway() -> None:
    runs = [
        make_run(DIRECT, 1, 1000, 1000, seq=1),
        make_run(GW, 1, 500, 2000, cpu=0.1, seq=2),  # 200 µs/req
        make_run(CACHED, 1, 2000, 500, cpu=0.1, seq=3),  # 50 µs/req
        make_run(GW, 2, 600, 2000, cpu=0.12, seq=4),  # 200 µs/req
        make_run(CACHED, 2, 3000, 400, cpu=0.12, seq=5),  # 40 µs/req
        make_run(DIRECT, 2, 1000, 1000, seq=6),
    ]
    [chat] = summarise(runs)
    assert chat.targets == (DIRECT, GW, CACHED)
    assert list(chat.ratios) == [(GW, DIRECT), (CACHED, DIRECT), (CACHED, GW)]
    assert chat.ratios[CACHED, DIRECT].rps == pytest.approx(2.5)  # median of 2 and 3
    assert chat.ratios[CACHED, GW].rps == pytest.approx((4 + 5) / 2)
    assert chat.ratios[CACHED, GW].cpu == pytest.approx((0.25 + 0.2) / 2)
    assert chat.ratios[CACHED, DIRECT].cpu is None
    median = chat.to_json()["median"]
    assert median["ratios"]["gateway-cached/gateway"]["cpu"] == pytest.approx(0.225)
    assert median["gateway-cached"]["gateway_cpu_us_per_request"] == pytest.approx(45)

    rows = table_rows([chat])
    header = rows[0]
    assert header[-4:] == ["cached/gw req/s", "cached/gw p50", "cached/gw p99", "cached/gw CPU"]
    assert [(r[1], r[2]) for r in rows[1:]] == [
        ("1", "direct"), ("1", "gateway"), ("1", "gateway-cached"),
        ("2", "gateway"), ("2", "gateway-cached"), ("2", "direct"),  # in the order they ran
        ("median", "direct"), ("median", "gateway"), ("median", "gateway-cached"),
    ]  # fmt: skip
    cached_median = rows[-1]
    assert cached_median[header.index("ratio req/s")] == "2.50"
    assert cached_median[header.index("cached/gw req/s")] == "4.50"
    assert cached_median[header.index("cached/gw CPU")] == "0.23"
    assert rows[-2][header.index("cached/gw req/s")] == "-"  # the uncached gateway's row


def test_a_repeat_missing_a_target_is_left_out() -> None:
    runs = [make_run(Target.DIRECT, 1, 1000, 1000), make_run(Target.GATEWAY, 1, 500, 2000),
            make_run(Target.DIRECT, 2, 1000, 1000)]  # fmt: skip
    [chat] = summarise(runs)
    assert [r.repeat for r in chat.repeats] == [1]


def test_tables_flag_errors_and_show_medians() -> None:
    bad = WrkSummary(duration=1.0, requests=10, bytes_read=0, p50=0.001, p90=0.001, p99=0.002,
                     p999=0.002, mean=0.001, max=0.002, errors_status=2)  # fmt: skip
    runs = [
        make_run(Target.DIRECT, 1, 1000, 1000),
        Run(scenario="chat", target=Target.GATEWAY, repeat=1, wrk=bad, gateway_cpu=0.0,
            backend_cpu=0.0, wrk_cpu=0.0, seq=3),
    ]  # fmt: skip
    rows = table_rows(summarise(runs))
    assert len(rows[0]) == 13  # no gateway-cached columns without gateway-cached runs
    assert rows[2][6] == "2 !"
    assert [r[1] for r in rows[1:]] == ["1", "1", "median", "median"]
    assert "ratio req/s" in render_text(rows)
    assert render_markdown(rows).splitlines()[-1].startswith("| **chat** | **median**")
