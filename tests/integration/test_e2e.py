"""End to end: real backends of four regions behind real gateway processes, on loopback.

The residency table uses addresses with known answers: the README checks of the embedded
DB-IP database (geodb/), and MaxMind's test databases (tests/data/geodb, known answers in
their README) in both the Country and the City schema.
"""

from __future__ import annotations

import time

import aiohttp
import orjson
import pytest

from tests.integration.cluster import EMBEDDED_DB, EU_REGIONS, TEST_DB_DIR, Cluster

pytestmark = pytest.mark.integration

US, EU, GLOBAL = "us", "eu", "global"
OWN = "us-east-1"


@pytest.fixture(scope="module")
def gateways(cluster: Cluster) -> dict[str, str]:
    trusted = ["127.0.0.1/32", "::1/128"]
    return {
        "dbip": cluster.start_gateway(
            cluster.gateway_config(geodb=EMBEDDED_DB, trusted=trusted, name="dbip")
        ),
        "country-test": cluster.start_gateway(
            cluster.gateway_config(
                geodb=TEST_DB_DIR / "GeoIP2-Country-Test.mmdb", trusted=trusted, name="country"
            )
        ),
        "city-test": cluster.start_gateway(
            cluster.gateway_config(
                geodb=TEST_DB_DIR / "GeoLite2-City-Test.mmdb", trusted=trusted, name="city"
            )
        ),
    }


# (database, client address, expected zone); the region follows from the zone
TABLE = [
    ("dbip", "8.8.8.8", US),  # US
    ("dbip", "1.1.1.1", GLOBAL),  # AU
    ("dbip", "81.2.69.142", EU),  # GB: Europe, not EU, still the eu zone
    ("dbip", "2.125.160.216", EU),  # GB
    ("dbip", "89.160.20.112", EU),  # SE
    ("dbip", "193.0.6.139", EU),  # NL
    ("dbip", "151.101.1.69", GLOBAL),  # CA
    ("dbip", "133.242.0.3", GLOBAL),  # JP
    ("dbip", "77.88.55.242", GLOBAL),  # RU
    ("dbip", "10.0.0.1", GLOBAL),  # private: no country
    ("dbip", "203.0.113.5", GLOBAL),  # documentation range: no country
    ("dbip", "::ffff:8.8.8.8", US),  # IPv4-mapped IPv6 unwrapped
    ("country-test", "81.2.69.160", EU),  # GB
    ("country-test", "89.160.20.200", EU),  # SE
    ("country-test", "216.160.83.56", US),  # US
    ("country-test", "50.114.0.1", US),  # US
    ("country-test", "175.16.199.1", GLOBAL),  # CN
    ("country-test", "217.65.48.1", GLOBAL),  # GI (Gibraltar): not in the eu policy
    ("country-test", "2a02:d180::1", EU),  # DE, IPv6
    ("country-test", "2001:220::", EU),  # SE /128 inside a KR range
    ("country-test", "2001:220::1", GLOBAL),  # KR
    ("country-test", "214.1.1.1", GLOBAL),  # record without a country
    ("country-test", "::ffff:81.2.69.142", EU),  # IPv4-mapped
    ("city-test", "81.2.69.142", EU),  # London
    ("city-test", "216.160.83.56", US),  # Milton, WA
    ("city-test", "2001:218::1", GLOBAL),  # JP
    ("city-test", "1.1.1.1", GLOBAL),  # not in the test database
]


def expected_regions(zone: str) -> set[str]:
    return EU_REGIONS if zone == EU else {OWN}  # own region first for us and global


@pytest.mark.parametrize(("db", "ip", "zone"), TABLE, ids=[f"{d}-{i}" for d, i, _ in TABLE])
async def test_residency_table(gateways: dict[str, str], db: str, ip: str, zone: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{gateways[db]}/health", headers={"X-Forwarded-For": ip}) as resp,
    ):
        body = await resp.read()
        assert resp.status == 200, body
        assert resp.headers["X-Residency-Zone"] == zone
        assert resp.headers["X-Served-Region"] in expected_regions(zone)


async def test_rag_answer_comes_from_the_users_zone(gateways: dict[str, str]) -> None:
    question = {"input": {"question": "Where is my data stored?"}}
    answers = {}
    async with aiohttp.ClientSession() as session:
        for ip in ("2.125.160.216", "8.8.8.8"):
            async with session.post(
                f"{gateways['dbip']}/rag/invoke", json=question, headers={"X-Forwarded-For": ip}
            ) as resp:
                assert resp.status == 200
                answers[ip] = (resp.headers["X-Served-Region"], (await resp.json())["output"])
    assert answers["2.125.160.216"][0] in EU_REGIONS
    assert answers["8.8.8.8"][0] == OWN
    assert answers["2.125.160.216"][1] != answers["8.8.8.8"][1]  # different regional documents


async def test_spoofed_forwarded_for_from_untrusted_peer_is_ignored(
    gateways: dict[str, str],
) -> None:
    # The gateways trust only 127.0.0.1; this client speaks from 127.0.0.2.
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"{gateways['dbip']}/health", headers={"X-Forwarded-For": "2.125.160.216"})
        as resp,
    ):  # fmt: skip
        assert resp.status == 200
        assert resp.headers["X-Residency-Zone"] == GLOBAL  # 127.0.0.2 has no country
        assert resp.headers["X-Served-Region"] == OWN


async def test_streamed_chat_completion_arrives_incrementally(gateways: dict[str, str]) -> None:
    body = {
        "model": "geogate-chat",
        "stream": True,
        "messages": [{"role": "user", "content": "Explain data residency in a few sentences."}],
    }
    arrivals: list[float] = []
    payloads: list[bytes] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{gateways['dbip']}/v1/chat/completions", json=body,
            headers={"X-Forwarded-For": "89.160.20.112"},
        ) as resp,
    ):  # fmt: skip
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["X-Served-Region"] in EU_REGIONS
        async for line in resp.content:
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic())
                payloads.append(line[6:].strip())
    assert payloads[-1] == b"[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len(chunks) >= 10
    assert text
    # the backend emits ~100 tokens/s: a buffering proxy would deliver them all at once
    assert arrivals[-1] - arrivals[0] > 0.05


def test_openai_client_through_the_gateway(gateways: dict[str, str]) -> None:
    from openai import OpenAI

    client = OpenAI(
        base_url=f"{gateways['dbip']}/v1",
        api_key="unused",
        default_headers={"X-Forwarded-For": "2.125.160.216"},
        max_retries=0,
    )
    raw = client.chat.completions.with_raw_response.create(
        model="geogate-rag", messages=[{"role": "user", "content": "Where is my data stored?"}]
    )
    assert raw.headers["X-Served-Region"] in EU_REGIONS
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="geogate-chat",
        messages=[{"role": "user", "content": "Hello there"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    assert chunks[-1].usage is not None
    assert [m.id for m in client.models.list()] == ["geogate-chat", "geogate-rag"]
    client.close()


def test_remote_runnable_through_the_gateway(gateways: dict[str, str]) -> None:
    from langserve import RemoteRunnable

    rag = RemoteRunnable(f"{gateways['dbip']}/rag/", headers={"X-Forwarded-For": "8.8.8.8"})
    answer = rag.invoke({"question": "Where is my data stored?"})
    assert isinstance(answer, str)
    assert answer
    streamed = list(rag.stream({"question": "Where is my data stored?"}))
    assert len(streamed) > 1
    assert "".join(streamed) == answer
    assert rag.batch([{"question": "a"}, {"question": "b"}]) == [
        rag.invoke({"question": "a"}), rag.invoke({"question": "b"}),
    ]  # fmt: skip
