"""The deployment artefacts: Dockerfile, Kubernetes manifests, Compose, Prometheus, Grafana.

Docker, kubectl and Grafana are not available to the tests, so each artefact is checked for
what can be checked without them, against the real code wherever the two must agree:

* every gateway config that ships is laid out as the container sees it (the Dockerfile's COPY
  lines, a ConfigMap mounted over /app/config, a Compose bind mount) and must pass
  ``load_config`` and ``geogate check-config``;
* every container command line must parse with geogate's own argument parsers;
* every PromQL expression of the dashboard and the alerts may name only the metrics and labels
  of ``METRICS``, and a live gateway's ``/metrics`` must expose each of them.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import AsyncIterator, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from backend.server import build_parser as backend_parser
from gateway import cli
from gateway.config import GatewayConfig, load_config
from gateway.server import GatewayServer
from gateway.tenants import hash_key

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "geogate-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
K8S_REGIONS = sorted((DEPLOY / "kubernetes").glob("*-*-[0-9].yaml"))
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
TEST_DB = ROOT / "tests" / "data" / "geodb" / "GeoIP2-Country-Test.mmdb"
GB, US = "81.2.69.142", "216.160.83.56"  # in the MaxMind test database

# The metrics the dashboard and alerts may use, with the labels they may rely on. Gauges get a
# `worker` label from the multi-worker supervisor; Prometheus adds the target's labels.
METRICS: dict[str, frozenset[str]] = {
    name: frozenset(labels.split())
    for name, labels in {
        "geogate_requests_total": "route zone region status_class",
        "geogate_request_duration_seconds": "route zone",
        "geogate_request_first_byte_seconds": "route zone",
        "geogate_upstream_duration_seconds": "region",
        "geogate_upstream_first_byte_seconds": "region",
        "geogate_gateway_overhead_seconds": "route",
        "geogate_endpoint_healthy": "region endpoint",
        "geogate_endpoint_ejected": "region endpoint",
        "geogate_endpoint_breaker_state": "region endpoint state",
        "geogate_endpoint_in_flight": "region endpoint",
        "geogate_region_available": "region",
        "geogate_region_drained": "region",
        "geogate_region_latency_seconds": "region",
        "geogate_upstream_ejections_total": "region endpoint",
        "geogate_breaker_transitions_total": "region endpoint state",
        "geogate_retries_total": "route reason",
        "geogate_retry_budget_exhausted_total": "route",
        "geogate_ratelimit_decisions_total": "route policy result",
        "geogate_cache_lookups_total": "result zone",
        "geogate_cache_stored_bytes": "tier",
        "geogate_residency_blocked_total": "zone",
        "geogate_geoip_lookups_total": "result",
        "geogate_geoip_database_build_timestamp_seconds": "",
        "geogate_config_info": "version",
        "geogate_config_reloads_total": "result",
    }.items()
}
HISTOGRAMS = {n for n in METRICS if n.endswith("_seconds") and "latency" not in n} - {
    "geogate_geoip_database_build_timestamp_seconds"
}
TARGET_LABELS = frozenset({"instance", "job", "worker", "pod", "gateway_region"})

_METRIC_RE = re.compile(r"\bgeogate_[a-z0-9_]+")
_MATCHERS_RE = re.compile(r"(geogate_[a-z0-9_]+)\{([^}]*)\}")
_MATCHER_LABEL_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def base_metric(name: str) -> str:
    """The METRICS entry a series name belongs to (histogram series -> the histogram)."""
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
            return name.removesuffix(suffix)
    return name


def promql_problems(expr: str) -> list[str]:
    """What in ``expr`` names a metric or label outside METRICS (empty: nothing)."""
    problems = []
    names = _METRIC_RE.findall(expr)
    if not names:
        problems.append("names no geogate metric")
    bases = set()
    for name in names:
        base = base_metric(name)
        if base not in METRICS:
            problems.append(f"unknown metric {name}")
            continue
        if base in HISTOGRAMS and name == base:
            problems.append(f"{name} is a histogram: use _bucket, _sum or _count")
        bases.add(base)
    for name, matchers in _MATCHERS_RE.findall(expr):
        allowed = METRICS.get(base_metric(name), frozenset()) | TARGET_LABELS
        for label in _MATCHER_LABEL_RE.findall(matchers):
            if label not in allowed:
                problems.append(f"{name} has no label {label!r}")
    usable = frozenset().union(*(METRICS[b] for b in bases)) | TARGET_LABELS | {"le"}
    for group in _GROUPING_RE.findall(expr):
        for label in filter(None, (g.strip() for g in group.split(","))):
            if label not in usable:
                problems.append(f"grouping by {label!r}, which none of {sorted(bases)} has")
    if expr.count("(") != expr.count(")") or expr.count("{") != expr.count("}"):
        problems.append("unbalanced brackets")
    return problems


def test_promql_checker_catches_unknown_metrics_and_labels() -> None:
    assert promql_problems("sum by (zone) (rate(geogate_requests_total[5m]))") == []
    assert promql_problems("rate(geogate_request_total[5m])") == [
        "unknown metric geogate_request_total"
    ]
    assert promql_problems("sum by (zone) (rate(geogate_upstream_duration_seconds_bucket[1m]))")
    assert promql_problems('geogate_endpoint_healthy{zone="eu"}')
    assert promql_problems("rate(geogate_upstream_duration_seconds[1m])")
    assert promql_problems("sum(rate(up[5m]))") == ["names no geogate metric"]


# --- Grafana dashboard ------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    for panel in load_dashboard()["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def alert_exprs() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]:
        for rule in group["rules"]:
            yield rule["alert"], rule["expr"]


def test_dashboard_model_variables_and_panels() -> None:
    d = load_dashboard()
    assert d["schemaVersion"] >= 39
    assert d["uid"]
    assert d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("zone", "region"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"]["uid"] == "${datasource}"
        m = re.fullmatch(rf"label_values\((geogate_[a-z_]+), {name}\)", var["query"]["query"])
        assert m, var["query"]
        assert name in METRICS[base_metric(m.group(1))], var["query"]
    core = {"row", "timeseries", "stat", "table", "state-timeline", "gauge", "bargauge", "text"}
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in d["panels"]:
        assert panel["type"] in core, f"{panel['title']}: not a core panel"
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(pos["x"] + i, pos["y"] + j) for i in range(pos["w"]) for j in range(pos["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_dashboard_filters_by_zone_and_region() -> None:
    exprs = [e for _, e in dashboard_exprs()]
    zone_metrics = {"geogate_requests_total", "geogate_cache_lookups_total"}
    for expr in exprs:
        for name, matchers in _MATCHERS_RE.findall(expr):
            if base_metric(name) in zone_metrics:
                assert 'zone=~"$zone"' in matchers, expr
    assert any('region=~"$region"' in e for e in exprs)


@pytest.mark.parametrize(("title", "expr"), list(dashboard_exprs()) + list(alert_exprs()))
def test_promql_names_only_known_metrics_and_labels(title: str, expr: str) -> None:
    assert promql_problems(expr) == [], title


def test_dashboard_covers_the_issue() -> None:
    used = {base_metric(n) for _, e in dashboard_exprs() for n in _METRIC_RE.findall(e)}
    required = {
        "geogate_requests_total", "geogate_request_duration_seconds",
        "geogate_upstream_first_byte_seconds", "geogate_gateway_overhead_seconds",
        "geogate_endpoint_healthy", "geogate_endpoint_ejected",
        "geogate_endpoint_breaker_state", "geogate_cache_lookups_total",
        "geogate_ratelimit_decisions_total", "geogate_residency_blocked_total",
        "geogate_retries_total", "geogate_retry_budget_exhausted_total", "geogate_config_info",
    }  # fmt: skip
    assert required <= used, required - used
    exprs = " ".join(e for _, e in dashboard_exprs())
    for q in ("0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (zone, le)" in exprs
        assert f"histogram_quantile({q}, sum by (region, le)" in exprs
    assert 'geogate_cache_lookups_total{result="hit"' in exprs
    assert 'geogate_ratelimit_decisions_total{result="limited"' in exprs


# --- the metrics, against a live gateway ------------------------------------------------------


async def _origin(request: web.BaseRequest) -> web.Response:
    return web.json_response(
        {"path": request.path}, headers={"Cache-Control": "max-age=60", "X-Served-Region": "x"}
    )


@pytest.fixture
async def live_metrics(aiohttp_raw_server: Any, tmp_path: Path) -> AsyncIterator[str]:
    """A gateway in front of one origin after a few scripted requests: its /metrics text."""
    origin = await aiohttp_raw_server(_origin)
    url = f"http://127.0.0.1:{origin.port}"
    raw = {
        "gateway": {"region": "us-east-1", "listen": "127.0.0.1:0", "geodb": str(TEST_DB),
                    "trusted_proxies": ["127.0.0.0/8"]},
        "residency": {"default_zone": "global", "zones": {"eu": {"countries": ["GB"]},
                      "us": {"countries": ["US"]}, "global": {}}},
        "regions": {"us-east-1": {"zones": ["us", "global"], "endpoints": [url]},
                    # drained: a request of zone eu is refused (residency block)
                    "eu-west-1": {"zones": ["eu"], "endpoints": [url], "drained": True}},
        "routes": [{"prefix": "/", "auth": "required", "rate_limit": "default",
                    "cache": {"policy": "http"}}],
        "rate_limits": {"default": {"requests_per_second": 100}},
        "tenants": [{"id": "t1", "keys": [hash_key("deploy-test-key")]}],
        "upstream": {"health": {"enabled": False}},
        "admin": {"listen": "127.0.0.1:0"},
    }  # fmt: skip
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    server = GatewayServer(load_config(path))
    await server.start()
    try:
        host, port = server.bound[0]
        admin_host, admin_port = server.admin_bound[0]
        auth = {"Authorization": "Bearer deploy-test-key"}
        async with aiohttp.ClientSession() as session:
            statuses = []
            for client in (US, US, GB):
                async with session.get(
                    f"http://{host}:{port}/doc", headers={**auth, "X-Forwarded-For": client}
                ) as resp:
                    statuses.append(resp.status)
            assert statuses == [200, 200, 503]
            async with session.get(f"http://{admin_host}:{admin_port}/metrics") as resp:
                assert resp.status == 200
                yield await resp.text()
    finally:
        await server.stop(0)


def exposed_series(text: str) -> dict[str, set[str]]:
    """Series names the exposition declares -> label names seen on their samples."""
    out: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count"), "info": ("_info",)}  # fmt: skip
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            out.setdefault(family.name + suffix, set())
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


async def test_live_gateway_exposes_every_metric_the_dashboard_uses(live_metrics: str) -> None:
    exposed = exposed_series(live_metrics)
    used = {n for _, e in [*dashboard_exprs(), *alert_exprs()] for n in _METRIC_RE.findall(e)}
    missing = sorted(n for n in used if n not in exposed)
    assert not missing, f"used by the dashboard or alerts, not exposed: {missing}"
    wrong_labels = {
        n: sorted(METRICS[base_metric(n)] - exposed[n])
        for n in used
        if exposed[n] and not METRICS[base_metric(n)] <= exposed[n]
    }
    assert not wrong_labels, f"samples lack the labels the dashboard relies on: {wrong_labels}"
    # the scripted requests left samples where the dashboard's headline panels look
    for name in ("geogate_requests_total", "geogate_cache_lookups_total",
                 "geogate_residency_blocked_total", "geogate_ratelimit_decisions_total",
                 "geogate_request_duration_seconds_bucket"):  # fmt: skip
        assert exposed[name], f"{name}: no sample after the scripted requests"


# --- container image --------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in logical]


def runtime_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"{args}: use the exec (JSON) form"
    return [str(v) for v in value]


def test_dockerfile_is_multi_stage_non_root_with_healthcheck() -> None:
    instructions = dockerfile_instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for op, a in instructions if op == "ARG"}
    froms = [a for op, a in instructions if op == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    base = froms[-1].split()[0]
    base = args.get(base.strip("${}"), base) if base.startswith("$") else base
    assert base == "python:3.11-slim"
    stage = runtime_stage()
    ops = dict(stage)  # the last of each instruction wins, as in Docker
    user = ops["USER"].split(":")[0]
    assert user not in ("root", "0"), "runs as a non-root user"
    assert exec_form(ops["ENTRYPOINT"]) == ["geogate"]
    assert ops["STOPSIGNAL"] == "SIGTERM"
    assert set(ops["EXPOSE"].split()) >= {"8080", "9901"}
    health = ops["HEALTHCHECK"]
    assert "CMD" in health
    assert "http://127.0.0.1:9901/ready" in health
    env = " ".join(a for op, a in stage if op == "ENV")
    assert "PYTHONUNBUFFERED=1" in env
    assert any(op == "RUN" and "from=build" in a and ".whl" in a for op, a in stage), (
        "the runtime installs the wheel built by the build stage"
    )
    cmd = exec_form(ops["CMD"])
    parsed = cli._parser().parse_args(cmd)
    assert str(parsed.config).startswith("/app/config/")


def image_files() -> dict[str, Path]:
    """What the runtime stage COPYs from the context: absolute path in the image -> source."""
    workdir = PurePosixPath("/")
    files: dict[str, Path] = {}
    for op, args in runtime_stage():
        if op == "WORKDIR":
            workdir = workdir / args
        if op != "COPY" or "--from" in args:
            continue
        *sources, dest = shlex.split(args)
        target = workdir / dest
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"COPY {src}: not in the repository"
            to = target / path.name if dest.endswith("/") or len(sources) > 1 else target
            if path.is_dir():
                for f in path.rglob("*"):
                    if f.is_file():
                        files[str(to / f.relative_to(path))] = f
            else:
                files[str(to)] = path
    return files


def lay_out(root: Path, files: dict[str, Path | str]) -> None:
    """Files at their container paths under ``root`` (sources linked, text written)."""
    for dest, src in files.items():
        path = root / dest.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            path.unlink()
        if isinstance(src, Path):
            path.symlink_to(src)
        else:
            path.write_text(src, encoding="utf-8")


def check_config(path: Path, capsys: pytest.CaptureFixture[str]) -> GatewayConfig:
    """``geogate check-config`` must accept it (it opens the GeoIP database too)."""
    capsys.readouterr()
    code = cli.main(["check-config", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("ok: ")
    return load_config(path)


def test_image_ships_config_geodb_and_licence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = image_files()
    assert {"/app/geodb/dbip-country.mmdb", "/app/geodb/DBIP-LICENSE"} <= set(files)
    lay_out(tmp_path, dict(files))
    config = check_config(tmp_path / "app/config/gateway.yaml", capsys)
    assert config.gateway.listen.host == "0.0.0.0"
    assert config.admin.listen is not None
    assert config.admin.listen.port == 9901  # where HEALTHCHECK looks


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert {".venv", ".git", "bench/out"} <= set(patterns)
    copied = ["pyproject.toml", "README.md", "gateway/cli.py", "backend/server.py"]
    copied += [str(p.relative_to(ROOT)) for p in image_files().values()]
    for path in copied:
        parts = PurePosixPath(path).parts
        prefixes = {"/".join(parts[: i + 1]) for i in range(len(parts))}
        for pattern in patterns:
            pat = pattern.removeprefix("**/")
            assert not any(
                PurePosixPath(p).match(pat) or PurePosixPath(p).name == pat for p in prefixes
            ), f".dockerignore {pattern!r} drops {path}, which the Dockerfile needs"


# --- Kubernetes -------------------------------------------------------------------------------


def k8s_docs(path: Path) -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        if doc:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
            by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def parse_command(args: list[str]) -> Any:
    """A container's args through geogate's own parsers (SystemExit on an unknown flag)."""
    if args[0] == "backend":
        return backend_parser().parse_args(args[1:])
    return cli._parser().parse_args(args)


def prestop_seconds(container: dict[str, Any]) -> float:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return float(command[1])


def test_kubernetes_manifests_exist_for_two_regions() -> None:
    assert [p.stem for p in K8S_REGIONS] == ["eu-west-1", "us-east-1"]
    namespace = k8s_docs(DEPLOY / "kubernetes" / "namespace.yaml")["Namespace"][0]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("manifest", K8S_REGIONS, ids=lambda p: p.stem)
def test_kubernetes_region_pod(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = k8s_docs(manifest)
    region = manifest.stem
    (deployment,) = docs["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"gateway", "backend"}
    for c in containers.values():
        assert c["readinessProbe"], c["name"]
        assert c["livenessProbe"], c["name"]
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
        assert "memory" in c["resources"]["limits"], c["name"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    gw, be = containers["gateway"], containers["backend"]
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    assert gw["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "admin"}
    assert gw["livenessProbe"]["httpGet"] == {"path": "/live", "port": "admin"}

    # the gateway's config: the ConfigMap over /app/config, the rest of the image beside it
    (configmap,) = docs["ConfigMap"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    files: dict[str, Path | str] = {
        k: v for k, v in image_files().items() if not k.startswith("/app/config/")
    }
    for mount in gw["volumeMounts"]:
        source = volumes[mount["name"]].get("configMap")
        if source:
            assert source["name"] == configmap["metadata"]["name"]
            assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
            for key, text in configmap["data"].items():
                files[f"{mount['mountPath']}/{key}"] = text
    lay_out(tmp_path, files)
    gw_args = parse_command(gw["args"])
    assert gw_args.command == "gateway"
    config = check_config(tmp_path / str(gw_args.config).lstrip("/"), capsys)
    assert config.gateway.region == region
    assert config.gateway.listen.port == ports["http"]
    assert config.admin.listen is not None
    assert (config.admin.listen.host, config.admin.listen.port) == ("0.0.0.0", ports["admin"])
    shipped = yaml.safe_load((ROOT / "config" / "residency.yaml").read_text(encoding="utf-8"))
    assert yaml.safe_load(configmap["data"]["residency.yaml"]) == shipped

    # the backend beside it: the region's own endpoint, over localhost
    be_args = parse_command(be["args"])
    assert be_args.region == region
    assert be_args.zones.split(",") == list(config.regions[region].zones)
    assert config.regions[region].endpoints == (f"http://127.0.0.1:{be_args.port}",)
    assert {p["containerPort"] for p in be["ports"]} == {be_args.port}

    # shutdown: the endpoints drop the pod, the gateway drains, the backend outlives it
    drain = config.gateway.drain
    gateway_done = prestop_seconds(gw) + drain.grace + drain.timeout
    backend_done = prestop_seconds(be) + be_args.drain_timeout
    assert prestop_seconds(be) >= gateway_done
    assert pod["terminationGracePeriodSeconds"] > max(gateway_done, backend_done)

    # Services select this pod; scraping is announced on the admin port
    for service in docs["Service"]:
        assert service["spec"]["selector"].items() <= labels.items()
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["admin"])


def test_kubernetes_regions_agree_on_the_zones() -> None:
    """Every region's config lists every region with the same zones as its own manifest."""
    regions: dict[str, dict[str, list[str]]] = {}
    for manifest in K8S_REGIONS:
        (configmap,) = k8s_docs(manifest)["ConfigMap"]
        raw = yaml.safe_load(configmap["data"]["gateway.yaml"])
        regions[manifest.stem] = {r: v["zones"] for r, v in raw["regions"].items()}
    first = next(iter(regions.values()))
    assert all(r == first for r in regions.values()), regions


# --- Docker Compose ---------------------------------------------------------------------------


def test_compose_two_regions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services = compose["services"]
    backends = {}
    for name, svc in services.items():
        if svc.get("image", "").startswith("geogate") and svc["command"][0] == "backend":
            args = parse_command(svc["command"])
            backends[f"http://{name}:{args.port}"] = (args.region, args.zones.split(","))
    gateways = [n for n, s in services.items() if s.get("command", [""])[0] == "gateway"]
    assert len(gateways) == 2
    seen_regions = set()
    for name in gateways:
        svc = services[name]
        files: dict[str, Path | str] = dict(image_files())
        for volume in svc["volumes"]:
            src, dest, *_ = volume.split(":")
            files[dest] = (COMPOSE.parent / src).resolve()
        root = tmp_path / name
        lay_out(root, files)
        args = parse_command(svc["command"])
        config = check_config(root / str(args.config).lstrip("/"), capsys)
        seen_regions.add(config.gateway.region)
        for region, rc in config.regions.items():
            for endpoint in rc.endpoints:
                assert backends[endpoint] == (region, list(rc.zones)), endpoint
        assert config.upstream.health.enabled
        grace = float(svc["stop_grace_period"].removesuffix("s"))
        assert grace > config.gateway.drain.grace + config.gateway.drain.timeout
    assert seen_regions == {"eu-west-1", "us-east-1"}
    scrape = yaml.safe_load((COMPOSE.parent / "prometheus.yml").read_text(encoding="utf-8"))
    targets = {t for job in scrape["scrape_configs"] for s in job["static_configs"]
               for t in s["targets"]}  # fmt: skip
    assert targets == {f"{g}:9901" for g in gateways}
