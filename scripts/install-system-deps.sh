#!/usr/bin/env bash
# Installs the system programs the tests and benchmarks need, from Debian's packages, when
# they are missing. Idempotent; does nothing when everything is present.
#
#   install-system-deps.sh          everything `make test` needs: the bench set below, plus
#                                   chromium (the status page's headless-browser test; the
#                                   largest, about 80 MB with its libraries)
#   install-system-deps.sh bench    only what bench/perf.py compares GeoGate with: wrk,
#                                   redis-server, nginx (1.22, the "light" build: proxy,
#                                   upstream keepalive, return) and HAProxy (2.6)
#
# The tests and benchmarks run each program with their own config on ephemeral loopback
# ports and stop it; the packages' own services are never used, and are kept from starting at
# install time (policy-rc.d exit 101) so that nothing binds port 80 behind our back.
set -euo pipefail
name=$(basename "$0" .sh)
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if [ "${1:-all}" != bench ]; then
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "$name: missing ${need[*]} and not root (no sudo): install them with your package manager" >&2
    exit 1
  fi
else SUDO=""; fi
echo "$name: installing ${need[*]}" >&2
policy=/usr/sbin/policy-rc.d
added_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  added_policy=1
fi
cleanup() { if [ -n "$added_policy" ]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
