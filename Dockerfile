# GeoGate container: the gateway (default) or a regional backend (`geogate backend ...`).
# Build:  docker build -t geogate .
# Run:    docker run -p 8080:8080 -v $PWD/config:/app/config:ro geogate
#         (mount your own config and, at /app/geodb, a current GeoIP database)
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY backend ./backend
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /app geogate
WORKDIR /app
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config ./config
COPY geodb ./geodb
USER geogate
EXPOSE 8080
# The listener accepts connections: enough for a liveness check until the admin listener lands.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
  CMD python -c "import socket; socket.create_connection(('127.0.0.1', 8080), 2).close()"
ENTRYPOINT ["geogate"]
CMD ["gateway", "-c", "/app/config/gateway.yaml"]
