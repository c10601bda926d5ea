"""End-to-end smoke test of ``bench/chaos.py``: the real topology, a real kill, real load.

It checks the failover behaviour the issue requires of the ``replica`` scenario (no failed
idempotent request, no residency violation) and that the harness reports; detection and
failover times are judged by the script's own verdicts and recorded in bench/RESULTS.md,
not asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.chaos_report import Outcome, RequestRecord, classify

ROOT = Path(__file__).resolve().parents[2]
ZONE_REGIONS = {
    "eu": frozenset({"eu-west-1", "eu-central-1"}),
    "us": frozenset({"us-east-1"}),
    "global": frozenset({"us-east-1", "eu-west-1", "eu-central-1", "ap-southeast-1"}),
}


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_chaos_replica_kill_fails_nothing_and_crosses_no_zone(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--scenarios", "replica",
         "--concurrency", "4", "--time-scale", "0.5", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=50, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    result = json.loads(out.read_text())
    (replica,) = result["scenarios"]
    assert replica["name"] == "replica"
    assert replica["requests"] > 0
    assert replica["violations"] == 0
    assert replica["failures"] == 0, replica["failure_samples"]
    assert result["passed"]
    assert "PASS replica" in proc.stdout


def _record(
    zone: str, status: int, region: str | None, problem_zone: str | None = None
) -> RequestRecord:
    return RequestRecord(
        n=0, sent=0.0, done=0.0, zone=zone, kind="GET /ready", status=status,
        served_region=region, problem_zone=problem_zone,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("record", "fail_closed", "expected"),
    [
        (_record("eu", 200, "eu-central-1"), frozenset(), Outcome.OK),
        (_record("eu", 200, "us-east-1"), frozenset(), Outcome.VIOLATION),
        (_record("eu", 200, None), frozenset(), Outcome.VIOLATION),  # unproven counts against
        (_record("global", 200, "ap-southeast-1"), frozenset(), Outcome.OK),
        (_record("eu", 503, None, "eu"), frozenset({"eu"}), Outcome.FAIL_CLOSED),
        (_record("eu", 503, None, "eu"), frozenset(), Outcome.FAILURE),  # not expected here
        (_record("us", 503, None, "us"), frozenset({"eu"}), Outcome.FAILURE),
        (_record("us", 0, None), frozenset(), Outcome.FAILURE),
    ],
)
def test_classify(record: RequestRecord, fail_closed: frozenset[str], expected: Outcome) -> None:
    assert classify(record, ZONE_REGIONS, fail_closed) is expected
