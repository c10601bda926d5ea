"""The admin status page in a real headless Chromium, against a real gateway and backends.

Chromium runs the page's own script (under its Content-Security-Policy), which fetches
``/status`` with the token it took from the URL fragment; ``--dump-dom`` gives the DOM after
``--virtual-time-budget`` ms of page time. Chromium comes from scripts/install-system-deps.sh;
without it these tests fail rather than skip, so CI cannot pass without running them.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import urllib.request
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.integration.cluster import EMBEDDED_DB, EU_REGIONS, TOPOLOGY, Cluster

pytestmark = pytest.mark.integration

TOKEN = "statuspage-test-token"
GB, US, JP = "2.125.160.216", "8.8.8.8", "133.242.0.3"
WIDTH, HEIGHT = 1280, 900


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: str = ""

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        """Descendants with ``tag`` whose attributes include ``attrs`` (``data_x`` -> data-x)."""
        want = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        out = []
        for child in self.children:
            if (tag is None or child.tag == tag) and all(
                child.attrs.get(k) == v for k, v in want.items()
            ):
                out.append(child)
            out.extend(child.find_all(tag, **attrs))
        return out

    def find(self, tag: str | None = None, **attrs: str) -> Node:
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag} {attrs}> elements"
        return found[0]

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


class _TreeBuilder(HTMLParser):
    VOID = frozenset({"meta", "br", "input", "link", "img", "hr"})

    def __init__(self) -> None:
        super().__init__()
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        while len(self.stack) > 1 and self.stack.pop().tag != tag:
            pass

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(Node("#text", {}, text=data))


def parse(html: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(html)
    return builder.root


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium; fails the test (never skips) when it is not installed."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is not installed: run `bash scripts/install-system-deps.sh`"
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-extensions", "--virtual-time-budget=5000", *args],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def admin(cluster: Cluster) -> str:
    """A gateway with a token-protected admin listener that has served some traffic."""
    config = cluster.gateway_config(
        geodb=EMBEDDED_DB, trusted=["127.0.0.1/32"], name="statuspage", admin_token=TOKEN
    )
    url = cluster.start_gateway(config)
    for client, count in ((GB, 6), (US, 4), (JP, 2)):
        for _ in range(count):
            req = urllib.request.Request(f"{url}/health", headers={"X-Forwarded-For": client})
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 200
    return cluster.admin_urls[url]


def test_page_renders_regions_by_zone_with_health_and_rates(admin: str) -> None:
    dom = parse(chromium("--dump-dom", f"{admin}/#token={TOKEN}").stdout)
    assert dom.find(id="error").all_text() == ""  # /status answered, with the token
    assert dom.find("form", id="login").attrs.get("hidden") is not None
    zones = {s.attrs["data-zone"]: s for s in dom.find_all("section", class_="zone")}
    assert set(zones) == {"*", "eu", "us", "global"}
    rows = {z: {r.attrs["data-region"]: r for r in zones[z].find_all("tr")[1:]} for z in zones}
    assert set(rows["eu"]) == EU_REGIONS
    assert set(rows["us"]) == {"us-east-1"}
    assert set(rows["global"]) == {"us-east-1", "eu-west-1", "eu-central-1", "ap-southeast-1"}
    for zone, regions in rows.items():
        for region, row in regions.items():
            assert row.attrs["data-state"] == "available"
            endpoints = row.find_all("li")
            assert len(endpoints) == TOPOLOGY[region][1], (zone, region)
            assert {e.attrs["data-health"] for e in endpoints} == {"healthy"}
            assert {e.attrs["data-breaker"] for e in endpoints} == {"closed"}
            assert all(e.attrs["data-endpoint"] in e.all_text() for e in endpoints)

    def rate(node: Node) -> float:
        return float(node.all_text().removesuffix(" req/s"))

    # 6 GB requests went to the eu zone, 4 US + 2 JP to us-east-1 (own region first)
    assert rate(zones["eu"].find(class_="stat", data_field="rate").find(class_="value")) > 0
    assert rate(zones["*"].find(class_="stat", data_field="rate").find(class_="value")) > 0
    assert rate(rows["us"]["us-east-1"].find("td", data_field="rate")) > 0
    assert rate(rows["global"]["ap-southeast-1"].find("td", data_field="rate")) == 0
    assert rows["us"]["us-east-1"].find("td", data_field="p99").all_text().endswith(" ms")
    assert zones["eu"].find(class_="stat", data_field="errors").all_text().endswith("0.0 % (0)")


def test_page_without_the_token_asks_for_it_and_shows_no_data(admin: str) -> None:
    dom = parse(chromium("--dump-dom", f"{admin}/").stdout)
    assert "hidden" not in dom.find("form", id="login").attrs
    assert "token" in dom.find(id="error").all_text()
    assert dom.find_all("section", data_zone="eu") == []


def png_pixels(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """Check a PNG's structure (signature, chunk CRCs, IHDR, IDAT size) and unfilter it.

    Returns:
        (width, height, bytes per pixel, rows of raw pixel bytes).
    """
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR"
    assert chunks[-1][0] == b"IEND"
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8
    assert colour in (2, 6)
    assert interlace == 0
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = width * bpp
    assert len(raw) == height * (1 + stride)
    rows, prev = [], bytes(stride)
    for y in range(height):
        kind, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        if kind == 1:  # Sub
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:  # Up
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif kind == 3:  # Average
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:  # Paeth
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        else:
            assert kind == 0, f"unknown PNG filter {kind}"
        rows.append(bytes(line))
        prev = line
    return width, height, bpp, rows


def test_screenshot_is_a_png_of_the_window_size_with_content(admin: str, tmp_path: Path) -> None:
    shot = tmp_path / "status.png"
    chromium(f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", f"{admin}/#token={TOKEN}")
    width, height, bpp, rows = png_pixels(shot.read_bytes())
    assert (width, height) == (WIDTH, HEIGHT)
    colours = {row[x : x + 3] for row in rows[::8] for x in range(0, width * bpp, 8 * bpp)}
    assert len(colours) > 8  # header bar, cards, badges and text, not one flat colour
    # the dark header bar above the light page: the page's own CSS was applied
    assert max(rows[10][:3]) < 0x40
    assert min(rows[HEIGHT - 10][:3]) > 0xE0
