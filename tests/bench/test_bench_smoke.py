"""End-to-end smoke test of ``bench/run.py``: real backend, real gateways, real wrk.

It checks that the harness runs and reports, never how fast anything is: speed is measured by
``make bench`` and recorded in bench/RESULTS.md, not asserted here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import run as bench_run
from bench.processes import BenchError
from bench.report import Target, WrkSummary

ROOT = Path(__file__).resolve().parents[2]

needs_wrk = pytest.mark.skipif(
    shutil.which("wrk") is None,
    reason="wrk is not on PATH (scripts/install-system-deps.sh installs it)",
)


@pytest.mark.integration
@needs_wrk
@pytest.mark.timeout(90)
def test_bench_runs_every_target_without_errors(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--duration", "1", "--repeats", "1",
         "--connections", "4", "--warmup", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=80, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())

    runs = result["runs"]
    expected = {"health": {"direct", "gateway"}, "chat": {"direct", "gateway", "gateway-cached"}}
    for scenario, names in expected.items():
        targets = {r["target"]: r for r in runs if r["scenario"] == scenario}
        assert set(targets) == names
        for run in targets.values():
            assert run["wrk"]["requests"] > 0
            assert run["wrk"]["error_count"] == 0
            assert not run["flagged"]
        assert targets["gateway"]["gateway_cpu_us_per_request"] is not None
    cached = next(r for r in runs if r["target"] == "gateway-cached")
    assert cached["gateway_cpu_us_per_request"] is not None
    assert cached["cache_hits"] >= cached["wrk"]["requests"]  # every response was a hit
    assert [s["scenario"] for s in result["summary"]] == ["health", "chat"]
    chat = result["summary"][1]["median"]
    assert set(chat["ratios"]) == {
        "gateway/direct",
        "gateway-cached/direct",
        "gateway-cached/gateway",
    }
    assert "cpu" in chat["ratios"]["gateway-cached/gateway"]
    assert not result["flagged"]
    assert "ratio req/s" in proc.stdout  # the table was printed
    assert "cached/gw req/s" in proc.stdout


@pytest.mark.integration
def test_a_cached_gateway_that_does_not_hit_stops_the_benchmark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_config = bench_run.gateway_config

    def no_default_temperature(backend_url: str, *, cached: bool = False) -> dict[str, Any]:
        cfg = real_config(backend_url, cached=cached)
        cfg["routes"][0]["cache"].pop("default_temperature")  # the body sends no temperature
        return cfg

    monkeypatch.setattr(bench_run, "gateway_config", no_default_temperature)
    pins = bench_run.choose_pins(
        argparse.Namespace(no_pin=True, gateway_cpus=None, backend_cpus=None, wrk_cpus=None)
    )
    with contextlib.ExitStack() as stack:
        sv = bench_run.start_services(stack, tmp_path, pins, [Target.GATEWAY_CACHED])
        assert set(sv.urls) == {Target.GATEWAY_CACHED}
        with pytest.raises(BenchError, match="not answered from the cache"):
            bench_run.check_responses([bench_run.SCENARIOS["chat"]], sv.urls)


def _summary(requests: int) -> WrkSummary:
    return WrkSummary(duration=1.0, requests=requests, bytes_read=0, p50=0.001, p90=0.001,
                      p99=0.001, p999=0.001, mean=0.001, max=0.001)  # fmt: skip


def test_only_hits_count_as_a_cached_run() -> None:
    before = {"hit": 10.0, "miss": 1.0}
    assert bench_run._hits_only(before, {"hit": 110.0, "miss": 1.0}, _summary(98)) == 100
    with pytest.raises(BenchError, match="other than hits"):
        bench_run._hits_only(before, {"hit": 100.0, "miss": 2.0}, _summary(90))
    with pytest.raises(BenchError, match="not answered from the cache"):
        bench_run._hits_only(before, {"hit": 50.0, "miss": 1.0}, _summary(90))


def test_targets_rotate_between_repeats() -> None:
    t = list(Target)
    assert [bench_run._rotated(t, r)[0] for r in (1, 2, 3, 4)] == [t[0], t[1], t[2], t[0]]
    two = t[:2]
    assert bench_run._rotated(two, 2) == [two[1], two[0]]  # as before: reversed


def test_unknown_or_unmeasurable_targets_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--targets", "nope"], ["--scenarios", "health", "--targets", "gateway-cached"]):
        with pytest.raises(SystemExit) as exc:
            bench_run.main(argv)
        assert exc.value.code == 2
    assert "health measures none of" in capsys.readouterr().err
