"""Config loading: every invalid file names the file, the key and the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_config, parse_duration, parse_size
from gateway.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
ROOT = Path(__file__).resolve().parents[2]

BAD = [
    ("bad_duration.yaml", "routes[0].timeouts.connect: '5 parsecs' is not a duration"),
    ("misspelled_key.yaml", "gateway.trusted_proxy: unknown key (misspelled?)"),
    ("misspelled_section.yaml", "gatway: unknown key; did you mean 'gateway'?"),
    ("unknown_own_region.yaml", "gateway.region: region 'us-west-2' is not in regions"),
    ("undefined_zone.yaml", "regions.eu-west-1.zones[1]: zone 'mars' is not defined"),
    ("undefined_default_zone.yaml", "residency.default_zone: zone 'antarctica' is not defined"),
    ("duplicate_country.yaml", "residency.zones.us.countries[1]: DE is already in zone 'eu'"),
    ("bad_country.yaml", "residency.zones.us.countries[0]: 'USA' is not an ISO 3166-1 alpha-2"),
    ("unquoted_norway.yaml", "residency.zones.us.countries[1]: False is a boolean"),
    ("bad_cidr.yaml", "gateway.trusted_proxies[0]: '10.0.0.0/33' is not an IP network"),
    ("bad_endpoint_scheme.yaml", "regions.eu-west-1.endpoints[0]: 'ftp://127.0.0.1:9201' is not"),
    ("endpoint_with_path.yaml", "regions.eu-west-1.endpoints[0]: 'http://127.0.0.1:9201/api'"),
    ("no_endpoints.yaml", "regions.eu-west-1.endpoints: Tuple should have at least 1 item"),
    ("missing_geodb.yaml", "gateway.geodb: "),
    ("bad_listen.yaml", "gateway.listen: 'localhost' is not host:port"),
    ("bad_size.yaml", "gateway.limits.max_body_bytes: 'ten megs' is not a size"),
    ("duplicate_route.yaml", "routes[1].prefix: same host and prefix as routes[0]"),
    ("bad_prefix.yaml", "routes[0].prefix: 'v1/': a route prefix starts with '/'"),
    ("connect_method.yaml", "routes[0].methods[1]: 'CONNECT' cannot be proxied"),
    ("invalid_yaml.yaml", ": invalid YAML: line 3, column 1"),
    ("not_a_mapping.yaml", ": the top level must be a mapping of sections"),
    ("missing_policy.yaml", "residency.policy: "),
    ("plain_api_key.yaml", "tenants[0].keys[0]: API keys are stored as 'sha256:<64 hex digits>'"),
    ("tenant_unknown_zone.yaml", "tenants[0].residency: zone 'mars' is not defined"),
    ("undefined_policy.yaml", "routes[0].rate_limit: policy 'gold' is not defined"),
    ("zero_rate.yaml", "rate_limits.default.requests_per_second: Input should be greater than 0"),
]


@pytest.mark.parametrize(("name", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_file_key_and_reason(name: str, expected: str) -> None:
    path = CONFIG_DIR / name
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = [str(i) for i in info.value.issues]
    assert any(line.startswith(str(path)) and expected in line for line in lines), lines
    assert len(lines) == 1, lines  # one mistake, one message: no cascades


def test_error_in_policy_file_names_that_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG_DIR / "bad_policy.yaml")
    [issue] = info.value.issues
    assert issue.file.endswith("policies/bad_countries.yaml")
    assert issue.key == "zones.eu.countries[1]"
    assert "'xx' is not an ISO 3166-1 alpha-2 code" in issue.reason


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(CONFIG_DIR / "does-not-exist.yaml")


def test_every_config_file_in_the_folder_is_tested() -> None:
    tested = {b[0] for b in BAD} | {"good_minimal.yaml", "bad_policy.yaml"}
    assert {p.name for p in CONFIG_DIR.glob("*.yaml")} == tested


def test_good_minimal_and_units() -> None:
    cfg = load_config(CONFIG_DIR / "good_minimal.yaml")
    assert cfg.gateway.region == "us-east-1"
    assert cfg.gateway.geodb.is_absolute()
    assert cfg.gateway.geodb.is_file()
    assert cfg.routes[0].timeouts.connect == 2.0
    assert cfg.gateway.limits.max_body_bytes == 10 * 1024 * 1024


def test_shipped_demo_config_is_valid() -> None:
    cfg = load_config(ROOT / "config" / "gateway.yaml")
    eu = set(cfg.residency.zones["eu"].countries)
    assert {"DE", "FR", "GB", "CH", "NO", "IS", "LI", "SE", "IE"} <= eu
    assert len(eu & {"AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR",
                     "HU", "IE", "IT", "LV", "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK",
                     "SI", "ES", "SE"}) == 27  # fmt: skip
    assert cfg.residency.zones["us"].countries == ("US",)
    assert cfg.residency.default_zone == "global"
    assert {r: len(rc.endpoints) for r, rc in cfg.regions.items()} == {
        "us-east-1": 2, "eu-west-1": 2, "eu-central-1": 1, "ap-southeast-1": 1,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(5, 5.0), (0.25, 0.25), ("250ms", 0.25), ("2s", 2.0), ("1.5m", 90.0), ("1h", 3600.0)],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5 parsecs", "", "-1s", True, None, "1 d"])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError, match=r"duration|negative"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"), [(512, 512), ("64KiB", 65536), ("10MiB", 10485760), ("1MB", 10**6)]
)
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


def test_check_config_command_prints_every_error_and_fails() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(CONFIG_DIR / "bad_duration.yaml")],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "bad_duration.yaml:routes[0].timeouts.connect: '5 parsecs' is not a duration" in (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr


def test_check_config_command_accepts_the_demo_config() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "config/gateway.yaml"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: config/gateway.yaml: 4 regions")


def test_gateway_refuses_to_start_on_invalid_config() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "gateway", "-c", str(CONFIG_DIR / "undefined_zone.yaml")],
        capture_output=True, text=True, cwd=ROOT, check=False, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "zone 'mars' is not defined" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["gateway", "check-config"])
def test_unreadable_geoip_database_is_a_clear_error(tmp_path: Path, command: str) -> None:
    garbage = tmp_path / "broken.mmdb"
    garbage.write_bytes(b"this is not a MaxMind DB" * 100)
    text = (CONFIG_DIR / "good_minimal.yaml").read_text()
    text = text.replace("../../geodb/dbip-country.mmdb", str(garbage))
    config = tmp_path / "gw.yaml"
    config.write_text(text)
    args = ["gateway", "-c", str(config)] if command == "gateway" else [command, str(config)]
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True, text=True, cwd=ROOT, check=False, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert str(garbage) in proc.stderr
    assert "Traceback" not in proc.stderr
