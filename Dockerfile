# syntax=docker/dockerfile:1
# GeoGate container: the gateway (default: a one-container demo) or a regional backend.
#
#   docker build -t geogate .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9901:9901 geogate            # demo on embedded defaults
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9901:9901 \
#       -v "$PWD/my-config:/app/config:ro" -v "$PWD/my-geodb:/app/geodb:ro" \
#       geogate gateway -c /app/config/gateway.yaml --drain-timeout 20     # your config
#   docker run --rm geogate backend --region eu-west-1 --zones eu,global --host 0.0.0.0 --port 9000
#
# Mount points: /app/config (gateway.yaml + residency.yaml; relative paths resolve from there)
# and /app/geodb (dbip-country.mmdb, or a GeoIP2/GeoLite2 Country/City file your config names).
# README.md "Deploy" has the details; deploy/ has Kubernetes, Compose, Prometheus and Grafana.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: a wheel of geogate plus wheels of every dependency --------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY backend ./backend
RUN pip wheel --wheel-dir /wheels .

# --- runtime: the wheels installed offline, config and GeoIP database alongside ---------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="geogate" \
      org.opencontainers.image.description="Residency-aware edge gateway for LLM applications" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it without a runAsUser.
RUN groupadd --system --gid 10001 geogate \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
            --shell /usr/sbin/nologin geogate
WORKDIR /app
# The wheels are bind-mounted from the build stage (BuildKit), so no layer keeps them.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/geogate-*.whl
# Embedded defaults, owned by root and read-only to the runtime user: the residency policy,
# the container config (the demo topology, listening on all interfaces) and DB-IP's
# country database with its CC BY 4.0 licence file. Mount over /app/config and /app/geodb.
COPY config/residency.yaml ./config/residency.yaml
COPY deploy/docker/gateway.yaml ./config/gateway.yaml
COPY geodb/dbip-country.mmdb geodb/DBIP-LICENSE ./geodb/
USER 10001:10001
# 8080: the proxy listener; 9901: the admin listener (/ready, /live, /metrics, admin API).
EXPOSE 8080 9901
# Readiness on the admin listener: 503 while starting or draining, so a draining container
# is reported unhealthy. urlopen raises (exit 1) on any non-2xx answer or refused connection.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/ready', timeout=2)"]
# geogate drains on SIGTERM: readiness fails, in-flight requests and streams finish (up to
# --drain-timeout), then it exits. Give `docker stop -t` more than the drain timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["geogate"]
CMD ["demo", "-c", "/app/config/gateway.yaml"]
