"""Smoke test of ``bench/ratelimit_bench.py``: real redis-server, backend and gateways.

It checks that the harness runs, limits and reports, never how accurate the limits are:
the 1 % target is judged by the benchmark itself and recorded in bench/RESULTS.md (on a
two-second run one request is already 0.8 %, and the machine is shared).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.ratelimit_bench import stream_usage
from bench.ratelimit_report import LimitSpec, Outcome, accuracy_of

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
@pytest.mark.redis
@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_ratelimit_bench_limits_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "ratelimit.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ratelimit_bench.py"),
         "--scenarios", "accuracy-local,accuracy", "--duration", "2", "--gateways", "2",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=50, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    result = json.loads(out.read_text())

    by_name = {a["scenario"]: a for a in result["accuracy"]}
    assert set(by_name) == {"accuracy", "accuracy-local"}
    assert by_name["accuracy"]["store"] == "redis"
    assert by_name["accuracy-local"]["store"] == "memory"
    assert len(by_name["accuracy"]["per_gateway"]) == 2
    for a in by_name.values():
        assert a["admitted"] > 0
        assert a["limited"] > 0
        assert a["errors"] == 0, a["error_kinds"]
        assert a["sent"] == a["admitted"] + a["limited"]
    assert not result["flagged"]
    assert "verdict" in proc.stdout  # the table was printed


def _outcome(
    sent: float, status: int, tokens: int | None = None, error: str | None = None
) -> Outcome:
    return Outcome(gateway=0, sent=sent, latency=0.001, status=status, tokens=tokens, error=error)


def test_accuracy_counts_admitted_against_burst_plus_rate_times_span() -> None:
    limit = LimitSpec(unit="requests", rate=50, burst=20, label="50 req/s, burst 20")
    outcomes = [_outcome(i / 150, 200 if i % 3 == 0 else 429) for i in range(1501)]
    a = accuracy_of("accuracy", store="redis", limit=limit, offered_rate=150, gateways=1,
                    outcomes=outcomes)  # fmt: skip
    assert a.span == pytest.approx(10.0)
    assert a.expected == pytest.approx(520.0)
    assert (a.admitted, a.limited, a.errors) == (501, 1000, 0)
    assert a.tolerance == pytest.approx(5.2)  # 1 % beats one request
    assert not a.is_within
    assert a.error_pct == pytest.approx(-3.65, abs=0.01)


def test_token_accuracy_sums_usage_and_tolerates_one_answer() -> None:
    limit = LimitSpec(unit="tokens", rate=1, burst=60, label="60 tokens/min")
    outcomes = [
        _outcome(0.0, 200, 46),
        _outcome(1.0, 200, 46),
        _outcome(1.5, 200, error="2xx stream without usage"),
        _outcome(2.0, 429),
    ]
    a = accuracy_of("accuracy-tokens", store="redis", limit=limit, offered_rate=2, gateways=1,
                    outcomes=outcomes)  # fmt: skip
    assert a.admitted_units == 92
    assert a.expected == pytest.approx(62)
    assert a.tolerance == 46  # one answer's tokens beat 1 % of 62
    assert a.is_within
    assert a.error_pct > 0
    assert (a.admitted, a.limited, a.errors) == (2, 1, 1)
    assert a.error_kinds == {"2xx stream without usage": 1}


def test_stream_usage_reads_the_last_usage_chunk() -> None:
    body = (
        b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":31,"completion_tokens":15,'
        b'"total_tokens":46}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert stream_usage(body) == 46
    assert stream_usage(b"data: [DONE]\n\n") is None
