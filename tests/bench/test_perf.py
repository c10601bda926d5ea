"""Fast checks of ``bench/perf.py`` (the comparative benchmark of issue 7).

The config templates are rendered and, where nginx / HAProxy are installed, checked by the
programs themselves (``nginx -t``, ``haproxy -c``); the figures code runs on made-up runs;
one end-to-end smoke run (1 s per target) checks that the harness starts everything, measures
and reports. None of it asserts how fast anything is: that is bench/RESULTS.md's business.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import perf

ROOT = Path(__file__).resolve().parents[2]
NGINX, HAPROXY, WRK = (perf.find_program(p) for p in ("nginx", "haproxy", "wrk"))


def test_nginx_and_haproxy_configs_render_and_are_accepted(tmp_path: Path) -> None:
    values = {"SSE": "127.0.0.1:9", "CHAT_RESPONSE": perf.CHAT_RESPONSE, "UPSTREAM": "127.0.0.1:9"}
    for kind in ("upstream", "proxy"):
        conf = perf.nginx_config(tmp_path / kind, kind, {**values, "LISTEN": "127.0.0.1:9"})
        text = conf.read_text() + (conf.parent / "server.conf").read_text()
        assert not perf._PLACEHOLDER.search(text)  # no placeholder left
        if NGINX:
            check = [NGINX, "-t", "-q", "-p", str(conf.parent), "-c", str(conf), "-e",
                     str(conf.parent / "error.log")]  # fmt: skip
            proc = subprocess.run(check, capture_output=True, text=True, timeout=10)
            assert proc.returncode == 0, proc.stderr
    assert json.loads(perf.CHAT_RESPONSE)["choices"][0]["finish_reason"] == "stop"
    cfg = perf.haproxy_config(tmp_path / "haproxy", "127.0.0.1:9", "127.0.0.1:9")
    assert not perf._PLACEHOLDER.search(cfg.read_text())
    if HAPROXY:
        proc = subprocess.run([HAPROXY, "-c", "-q", "-f", str(cfg)], capture_output=True,
                              text=True, timeout=10)  # fmt: skip
        assert proc.returncode == 0, proc.stderr


def test_a_missing_value_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(perf.BenchError, match="@LISTEN@"):
        perf.nginx_config(tmp_path, "proxy", {"UPSTREAM": "127.0.0.1:9"})


def test_geogate_config_keeps_every_feature_on() -> None:
    cfg = perf.geogate_config("http://127.0.0.1:9", redis_url="redis://127.0.0.1:7/0")
    routes = {r["prefix"]: r for r in cfg["routes"]}
    assert all(r["auth"] == "required" and r["rate_limit"] == "bench" for r in routes.values())
    assert routes["/cached/"]["cache"]["policy"] == "llm-exact"
    assert "cache" not in routes["/"]
    assert cfg["gateway"]["trusted_proxies"] == ["127.0.0.0/8"]
    assert cfg["redis"]["control"] == "redis://127.0.0.1:7/0"
    assert "master_key: sk-" in perf.litellm_config("http://127.0.0.1:9")


def _run(
    scenario: str, target: str, repeat: int, cpu: float, p50: float, p99: float
) -> perf.PerfRun:
    return perf.PerfRun(
        scenario=scenario, target=target, repeat=repeat, seq=0, duration=10.0, responses=10_000,
        errors=0, cpu=cpu, metrics={"rps": 1000.0, "p50_ms": p50, "p99_ms": p99, "errors": 0.0},
        percentiles={"50": p50, "99": p99},
    )  # fmt: skip


def test_medians_ratios_and_checks() -> None:
    runs = []
    for repeat, scale in ((1, 1.0), (2, 1.2), (3, 0.9)):  # a drifting machine
        runs += [
            _run("chat", "direct", repeat, 0.03 * scale, 0.3, 0.5),
            _run("chat", "nginx", repeat, 0.2 * scale, 1.0, 2.0),
            _run("chat", "plain-aiohttp", repeat, 2.0 * scale, 5.0, 9.0),
            _run("chat", "geogate", repeat, 0.6 * scale, 2.0, 3.0),
        ]
    summary = perf.summarise(runs)
    chat = summary["chat"]
    assert chat["targets"] == ["direct", "nginx", "plain-aiohttp", "geogate"]
    geogate = chat["median"]["geogate"]
    assert geogate["cpu_us"] == pytest.approx(60.0)  # 0.6 s / 10,000 responses
    assert geogate["cpu_vs_ref"] == pytest.approx(3.0)  # the same in every repeat
    assert geogate["p50_delta_ms"] == pytest.approx(1.7)
    assert geogate["p99_vs_nginx"] == pytest.approx(1.5)
    results = {c["name"]: c for c in perf.evaluate_checks(summary, 10.0, None)}
    cpu = results["full pipeline, cache miss: CPU/req vs nginx proxy (chat c64)"]
    assert (cpu["value"], cpu["result"]) == (pytest.approx(3.0), "met")
    plain = results["plain aiohttp proxy CPU/req vs GeoGate's (chat c64)"]
    assert (plain["value"], plain["result"]) == (pytest.approx(10 / 3), "met")
    assert results["req/s per core vs LiteLLM (chat c64)"]["result"] == "not measured"
    rows = perf.table_rows(summary, sse=False, medians_only=True)
    assert rows[0] == perf.WRK_HEADER
    assert [r[2] for r in rows[1:]] == ["direct", "nginx", "plain-aiohttp", "geogate"]
    assert rows[-1][10] == "3.00"
    soak = {"growth_pct": 7.5, "seconds": 600, "rps": 1000.0}
    assert perf.evaluate_checks(summary, 10.0, soak)[-1]["result"] == "missed"


@pytest.mark.integration
@pytest.mark.skipif(not (NGINX and WRK), reason="needs nginx and wrk (install-bench-deps.sh)")
@pytest.mark.timeout(60)
def test_quick_run_measures_every_scenario_kind(tmp_path: Path) -> None:
    out = tmp_path / "perf.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "perf.py"), "--quick", "--duration", "1",
         "--warmup", "0", "--scenarios", "chat,cache-hit,rate-limited,sse",
         "--targets", "nginx-static,nginx,geogate", "--sse-streams", "2", "--sse-chunks", "3",
         "--no-plot", "--no-install", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=55, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = {(r["scenario"], r["target"]): r for r in result["runs"]}
    assert {("chat", "geogate"), ("sse", "geogate"), ("rate-limited", "geogate")} <= set(runs)
    assert all(run["errors"] == 0 for run in runs.values())
    assert all(run["responses"] > 0 for run in runs.values())
    assert runs[("cache-hit", "geogate")]["notes"]["cache_hits"] >= 1
    assert result["summary"]["chat"]["median"]["geogate"]["cpu_vs_ref"] > 0
    assert result["summary"]["sse"]["median"]["geogate"]["ttft_p50_ms"] > 0
    checks = {c["name"]: c["result"] for c in result["checks"]}
    assert checks["cache hit (llm-exact, L1): CPU/req vs nginx static"] in ("met", "missed")
    assert "target (issue 7)" in proc.stdout
