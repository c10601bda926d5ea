"""``geogate demo`` as a new user runs it (on free ports instead of 8080/91xx)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.integration.cluster import ROOT, free_port, wait_for_line

pytestmark = pytest.mark.integration


def post_json(url: str, body: dict[str, object], headers: dict[str, str]) -> tuple[dict, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", **headers},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as resp:
        return dict(resp.headers), json.loads(resp.read())


def test_demo_starts_serves_and_stops_cleanly(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "config" / "gateway.yaml").read_text())
    raw["gateway"]["listen"] = f"127.0.0.1:{free_port()}"
    raw["admin"]["listen"] = f"127.0.0.1:{free_port()}"
    raw["gateway"]["geodb"] = str(ROOT / "geodb" / "dbip-country.mmdb")
    raw["residency"]["policy"] = str(ROOT / "config" / "residency.yaml")
    for region in raw["regions"].values():
        region["endpoints"] = [f"http://127.0.0.1:{free_port()}" for _ in region["endpoints"]]
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "-c", str(config), "--ttft-ms", "0",
         "--tokens-per-second", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ},
    )  # fmt: skip
    try:
        ready = wait_for_line(proc, b"GeoGate demo ready")
        base = re.search(rb"http://[0-9.:]+", ready).group().decode()  # type: ignore[union-attr]
        key_line = wait_for_line(proc, b"GEOGATE_DEMO_KEY=").decode().strip()
        assert re.fullmatch(r"GEOGATE_DEMO_KEY=gg_[A-Za-z0-9_-]{40,}", key_line)  # own line
        auth = {"Authorization": f"Bearer {key_line.split('=', 1)[1]}"}
        token_line = wait_for_line(proc, b"GEOGATE_ADMIN_TOKEN=").decode().strip()
        assert re.fullmatch(r"GEOGATE_ADMIN_TOKEN=[A-Za-z0-9_-]{32}", token_line)  # own line
        admin_token = token_line.split("=", 1)[1]
        page_line = wait_for_line(proc, b"Status page").decode()
        page = re.search(r"(http://[0-9.:]+)/#token=(\S+)", page_line)
        assert page is not None
        admin, fragment = page.groups()
        assert admin == f"http://{raw['admin']['listen']}"
        assert fragment == admin_token
        wait_for_line(proc, b"Press Ctrl-C")
        admin_auth = {"Authorization": f"Bearer {admin_token}"}
        with urllib.request.urlopen(
            urllib.request.Request(f"{admin}/status", headers=admin_auth), timeout=10
        ) as resp:
            assert set(json.loads(resp.read())["regions"]) == set(raw["regions"])
        for headers in ({}, {"Authorization": f"Bearer {admin_token}x"}):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(
                    urllib.request.Request(f"{admin}/status", headers=headers), timeout=10
                )
            info.value.close()
            assert info.value.code == 401
        question = {"input": {"question": "Where is my data stored?"}}
        gb_headers, gb = post_json(
            f"{base}/rag/invoke", question, {"X-Forwarded-For": "2.125.160.216", **auth}
        )
        us_headers, _ = post_json(
            f"{base}/rag/invoke", question, {"X-Forwarded-For": "8.8.8.8", **auth}
        )
        with pytest.raises(urllib.error.HTTPError) as info:  # the demo's routes need a key
            post_json(f"{base}/rag/invoke", question, {})
        info.value.close()
        assert info.value.code == 401
        assert gb_headers["X-Served-Region"].startswith("eu-")
        assert "eu-" in gb["output"]
        assert us_headers["X-Served-Region"] == "us-east-1"
        backend_pids = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        assert len(backend_pids) == 6
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(timeout=30) == 0
        for pid in backend_pids:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "zombie" in Path(f"/proc/{pid}/status").read_text()
            )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
