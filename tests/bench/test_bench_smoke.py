"""End-to-end smoke test of ``bench/run.py``: real backend, real gateway, real wrk.

It checks that the harness runs and reports, never how fast anything is: speed is measured by
``make bench`` and recorded in bench/RESULTS.md, not asserted here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("wrk") is None,
        reason="wrk is not on PATH (scripts/install-system-deps.sh installs it)",
    ),
]


@pytest.mark.timeout(90)
def test_bench_runs_both_targets_without_errors(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--duration", "1", "--repeats", "1",
         "--connections", "4", "--warmup", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=80, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())

    runs = result["runs"]
    for scenario in ("health", "chat"):
        targets = {r["target"]: r for r in runs if r["scenario"] == scenario}
        assert set(targets) == {"direct", "gateway"}
        for run in targets.values():
            assert run["wrk"]["requests"] > 0
            assert run["wrk"]["error_count"] == 0
            assert not run["flagged"]
        assert targets["gateway"]["gateway_cpu_us_per_request"] is not None
    assert [s["scenario"] for s in result["summary"]] == ["health", "chat"]
    assert not result["flagged"]
    assert "ratio req/s" in proc.stdout  # the table was printed
