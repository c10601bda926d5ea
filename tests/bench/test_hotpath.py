"""``bench/hotpath.py``: folding py-spy's raw output (the profiling run itself needs ptrace
and a quiet machine, so it is not run here; see bench/RESULTS.md for its use)."""

from __future__ import annotations

import pytest

from bench import hotpath


def test_aggregate_folds_self_time_and_modules() -> None:
    root = str(hotpath.ROOT)
    raw = [
        f"main (x.py:1);handle ({root}/gateway/server.py:10);"
        f"encode ({root}/gateway/headers.py:5) 3",
        f"main (x.py:1);handle ({root}/gateway/server.py:10) 1",
        "main (x.py:1);read (/v/lib/python3.11/site-packages/aiohttp/streams.py:9) 4",
        "",
    ]
    prof = hotpath.aggregate(raw)
    assert prof.samples == 8
    assert prof.self_share == {
        "encode (gateway/headers.py)": 3 / 8,
        "handle (gateway/server.py)": 1 / 8,
        "read (aiohttp/streams.py)": 4 / 8,
    }
    assert prof.module_share["x.py"] == 1.0
    assert prof.module_share["gateway/server.py"] == 4 / 8
    assert prof.to_json(1) == {
        "samples": 8,
        "self": [["read (aiohttp/streams.py)", 0.5]],
        "modules": [["x.py", 1.0]],
    }


def test_aggregate_refuses_what_is_not_py_spy_raw_output() -> None:
    with pytest.raises(ValueError, match="not a py-spy raw line"):
        hotpath.aggregate(["main (x.py:1) lots"])
    assert hotpath.aggregate([]).samples == 0
