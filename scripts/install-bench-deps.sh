#!/usr/bin/env bash
# What bench/perf.py compares GeoGate with (nginx, HAProxy, wrk, redis-server), from Debian's
# packages when missing: install-system-deps.sh's "bench" set.
exec bash "$(dirname "$0")/install-system-deps.sh" bench "$@"
