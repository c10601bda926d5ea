#!/usr/bin/env bash
# Installs the system programs the tests and benchmarks need (wrk, redis-server, and chromium
# for the admin status page's headless-browser test), from Debian's packages, when they are
# missing. Idempotent; does nothing when everything is present. chromium is the largest
# (about 80 MB with its libraries) and is only fetched when no chromium binary is on PATH.
# The tests start their own redis-server processes on free loopback ports; the package's own
# service, if the machine starts one, is not used.
set -euo pipefail
# nginx and HAProxy for bench/perf.py (its smoke test runs them), without their services
bash "$(dirname "$0")/install-bench-deps.sh"
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "install-system-deps: missing ${need[*]} and not root (no sudo): install them with your package manager" >&2
    exit 1
  fi
else SUDO=""; fi
echo "install-system-deps: installing ${need[*]}" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
