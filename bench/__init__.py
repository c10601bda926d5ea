"""GeoGate benchmarks: the gateway against its own backend, measured in the same run.

``python bench/run.py`` (or ``make bench``) is the entry point; ``bench/processes.py`` starts,
measures and stops the backend and gateway; ``bench/report.py`` turns wrk summaries into
medians, ratios and tables; ``bench/wrk/*.lua`` are the wrk scripts.
"""

from __future__ import annotations

__all__: list[str] = []
