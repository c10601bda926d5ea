"""gateway.geo against real MaxMind DB files: MaxMind's test databases, the embedded DB-IP one,
and tiny databases written byte by byte here for the cases the others cannot show.

Known answers come from tests/data/geodb/README.md (MaxMind test DBs, with source-data JSON)
and geodb/README.md (DB-IP, "Checked answers").
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import pytest
from blockbuster import BlockBuster, BlockingError, blockbuster_ctx

from gateway.geo import GeoDatabase, GeoDatabaseError, GeoSchema, is_special_purpose

__all__: list[str] = []

ROOT = Path(__file__).resolve().parents[2]
TEST_DBS = ROOT / "tests" / "data" / "geodb"
DBIP = ROOT / "geodb" / "dbip-country.mmdb"
PATHS = {
    "GeoIP2-Country": TEST_DBS / "GeoIP2-Country-Test.mmdb",
    "GeoLite2-Country": TEST_DBS / "GeoLite2-Country-Test.mmdb",
    "GeoIP2-City": TEST_DBS / "GeoIP2-City-Test.mmdb",
    "GeoLite2-City": TEST_DBS / "GeoLite2-City-Test.mmdb",
    "DB-IP": DBIP,
}
ANONYMOUS_IP = TEST_DBS / "GeoIP2-Anonymous-IP-Test.mmdb"


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Fail any test that makes a blocking call on the event loop (aiohttp's conftest)."""
    with blockbuster_ctx() as bb:
        yield bb


@pytest.fixture(scope="module")
def dbs() -> Iterator[dict[str, GeoDatabase]]:
    opened = {name: GeoDatabase.open_sync(path) for name, path in PATHS.items()}
    yield opened
    for db in opened.values():
        db.close()


KNOWN = [
    # GeoIP2-Country-Test: the README's verified table
    ("GeoIP2-Country", "81.2.69.142", "GB"),
    ("GeoIP2-Country", "81.2.69.160", "GB"),
    ("GeoIP2-Country", "2.125.160.216", "GB"),  # country GB, registered_country FR
    ("GeoIP2-Country", "89.160.20.112", "SE"),
    ("GeoIP2-Country", "89.160.20.200", "SE"),
    ("GeoIP2-Country", "216.160.83.56", "US"),  # registered_country GB
    ("GeoIP2-Country", "50.114.0.1", "US"),
    ("GeoIP2-Country", "175.16.199.1", "CN"),
    ("GeoIP2-Country", "67.43.156.1", "BT"),
    ("GeoIP2-Country", "202.196.224.1", "PH"),  # represented_country US
    ("GeoIP2-Country", "217.65.48.1", "GI"),
    ("GeoIP2-Country", "2001:218::1", "JP"),
    ("GeoIP2-Country", "2a02:d180::1", "DE"),
    ("GeoIP2-Country", "2a02:d3c0::1", "GB"),
    ("GeoIP2-Country", "2001:220::1", "KR"),
    ("GeoIP2-Country", "2001:220::", "SE"),  # /128 override inside a KR range
    ("GeoIP2-Country", "::ffff:81.2.69.142", "GB"),  # IPv4-mapped
    ("GeoIP2-Country", "214.1.1.1", None),  # anycast record, no country
    ("GeoIP2-Country", "2a02:d500::1", None),  # continent only
    ("GeoIP2-Country", "1.1.1.1", None),  # not in the DB
    ("GeoIP2-Country", "8.8.8.8", None),  # not in the DB
    ("GeoIP2-Country", "10.0.0.1", None),
    ("GeoIP2-Country", "127.0.0.1", None),
    ("GeoIP2-Country", "192.168.1.1", None),
    ("GeoIP2-Country", "2001:db8::1", None),
    ("GeoIP2-Country", "::1", None),
    # GeoLite2-Country-Test agrees, except 175.16.199.1 (absent)
    ("GeoLite2-Country", "81.2.69.142", "GB"),
    ("GeoLite2-Country", "89.160.20.112", "SE"),
    ("GeoLite2-Country", "216.160.83.56", "US"),
    ("GeoLite2-Country", "50.114.0.1", "US"),
    ("GeoLite2-Country", "2001:218::1", "JP"),
    ("GeoLite2-Country", "2a02:d180::1", "DE"),
    ("GeoLite2-Country", "175.16.199.1", None),
    ("GeoLite2-Country", "::ffff:89.160.20.112", "SE"),
    # GeoIP2-City-Test ("Other verified facts")
    ("GeoIP2-City", "81.2.69.142", "GB"),
    ("GeoIP2-City", "89.160.20.112", "SE"),
    ("GeoIP2-City", "216.160.83.56", "US"),
    ("GeoIP2-City", "175.16.199.1", "CN"),
    ("GeoIP2-City", "2001:218::1", "JP"),
    ("GeoIP2-City", "214.1.1.1", None),
    ("GeoIP2-City", "203.0.113.5", None),
    # GeoLite2-City-Test (source-data/GeoLite2-City-Test.json; 50.114.0.0/22 is not in it)
    ("GeoLite2-City", "81.2.69.142", "GB"),
    ("GeoLite2-City", "89.160.20.112", "SE"),
    ("GeoLite2-City", "175.16.199.1", "CN"),
    ("GeoLite2-City", "2a02:d180::1", "DE"),
    ("GeoLite2-City", "2a02:d500::1", None),
    ("GeoLite2-City", "50.114.0.1", None),
    ("GeoLite2-City", "::ffff:216.160.83.56", "US"),
    # embedded DB-IP (geodb/README.md "Checked answers")
    ("DB-IP", "8.8.8.8", "US"),
    ("DB-IP", "1.1.1.1", "AU"),
    ("DB-IP", "81.2.69.142", "GB"),
    ("DB-IP", "2.125.160.216", "GB"),
    ("DB-IP", "89.160.20.112", "SE"),
    ("DB-IP", "193.0.6.139", "NL"),
    ("DB-IP", "91.198.174.192", "NL"),
    ("DB-IP", "151.101.1.69", "CA"),
    ("DB-IP", "77.88.55.242", "RU"),
    ("DB-IP", "133.242.0.3", "JP"),
    ("DB-IP", "::ffff:8.8.8.8", "US"),  # raw maxminddb says None: unwrapped first
    ("DB-IP", "10.0.0.1", None),
    ("DB-IP", "192.168.1.1", None),
    ("DB-IP", "203.0.113.5", None),
    ("DB-IP", "fe80::1", None),
]


@pytest.mark.parametrize(("db", "ip", "expected"), KNOWN, ids=[f"{d}-{i}" for d, i, _ in KNOWN])
def test_lookup_known_answers(
    dbs: dict[str, GeoDatabase], db: str, ip: str, expected: str | None
) -> None:
    assert dbs[db].lookup(ip_address(ip)) == expected
    assert dbs[db].lookup(ip) == expected  # the text form gives the same answer


@pytest.mark.parametrize(
    ("name", "database_type", "schema", "build_epoch"),
    [
        ("GeoIP2-Country", "GeoIP2-Country", GeoSchema.GEOIP2, 1770245369),
        ("GeoLite2-Country", "GeoLite2-Country", GeoSchema.GEOIP2, 1770245369),
        ("GeoIP2-City", "GeoIP2-City", GeoSchema.GEOIP2, 1770245369),
        ("GeoLite2-City", "GeoLite2-City", GeoSchema.GEOIP2, 1770245369),
        ("DB-IP", "country ipvAll", GeoSchema.COUNTRY_CODE, 1780345978),
    ],
)
def test_metadata(
    dbs: dict[str, GeoDatabase], name: str, database_type: str, schema: GeoSchema, build_epoch: int
) -> None:
    db = dbs[name]
    assert (db.database_type, db.schema, db.build_epoch) == (database_type, schema, build_epoch)
    assert db.path == str(PATHS[name])
    assert db.ip_version == 6
    assert db.node_count > 0
    assert db.size_bytes == PATHS[name].stat().st_size


# ---------------------------------------------------------------- special-purpose addresses


@pytest.mark.parametrize(
    "ip",
    [
        "0.0.0.0",  # unspecified
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",  # RFC 1918
        "100.64.0.1",  # shared address space: is_private False, is_global False
        "127.0.0.1",
        "169.254.1.1",  # loopback, link-local
        "192.0.2.1",
        "198.51.100.1",
        "203.0.113.1",  # RFC 5737 documentation
        "198.18.0.1",  # benchmarking
        "224.0.0.1",
        "239.255.255.250",  # multicast: Python calls these is_global
        "240.0.0.1",
        "255.255.255.255",  # reserved, broadcast
        "::",
        "::1",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "2001:db8::1",  # RFC 3849 documentation
        "3fff::1",  # RFC 9637 documentation (not in Python 3.11's private list)
        "ff02::1",
        "ff0e::1",  # multicast: Python calls ff0e::1 is_global
        "fec0::1",  # site-local, deprecated (RFC 3879); Python calls it is_global
        "::ffff:8.8.8.8",  # IPv4-mapped is "private" to Python: callers unwrap first
    ],
)
def test_special_purpose(ip: str) -> None:
    assert is_special_purpose(ip_address(ip))


@pytest.mark.parametrize(
    "ip", ["8.8.8.8", "81.2.69.142", "1.1.1.1", "100.128.0.1", "2001:218::1", "2a02:d180::1"]
)
def test_not_special_purpose(ip: str) -> None:
    assert not is_special_purpose(ip_address(ip))


def test_python_is_global_specifics_this_module_compensates_for() -> None:
    """If CPython ever changes these, is_special_purpose still holds (tested above)."""
    assert ip_address("224.0.0.1").is_global
    assert ip_address("ff0e::1").is_global
    assert ip_address("fec0::1").is_global
    assert not ip_address("100.64.0.1").is_private
    assert not ip_address("100.64.0.1").is_global


# ---------------------------------------------------------------- hand-written databases
# A one-node IPv4 search tree: 0.0.0.0/1 -> low record, 128.0.0.0/1 -> high record. Every IPv4
# address has a record, so a None for 10.0.0.1 proves no read happened.


def _ctrl(type_: int, size: int) -> bytes:
    assert size < 29
    return bytes([type_ << 5 | size]) if type_ <= 7 else bytes([size, type_ - 7])


def _encode(value: object) -> bytes:
    """MaxMind DB data section encoding: utf8, map, array, (type, uint) pairs."""
    if isinstance(value, str):
        raw = value.encode()
        return _ctrl(2, len(raw)) + raw
    if isinstance(value, dict):
        return _ctrl(7, len(value)) + b"".join(_encode(k) + _encode(v) for k, v in value.items())
    if isinstance(value, list):
        return _ctrl(11, len(value)) + b"".join(_encode(v) for v in value)
    if isinstance(value, tuple):
        type_, number = value
        raw = number.to_bytes(8, "big").lstrip(b"\0")
        return _ctrl(type_, len(raw)) + raw
    raise TypeError(value)


def write_mmdb(path: Path, database_type: str, low: object, high: object) -> Path:
    low_data = _encode(low)
    node_count, record_size = 1, 24
    left = node_count + 16  # record values past the tree point into the data section
    right = left + len(low_data)
    metadata = {
        "node_count": (6, node_count),
        "record_size": (5, record_size),
        "ip_version": (5, 4),
        "binary_format_major_version": (5, 2),
        "binary_format_minor_version": (5, 0),
        "build_epoch": (9, 1_700_000_000),
        "database_type": database_type,
        "languages": [],
        "description": {},
    }
    path.write_bytes(
        left.to_bytes(3, "big")
        + right.to_bytes(3, "big")
        + b"\0" * 16
        + low_data
        + _encode(high)
        + b"\xab\xcd\xefMaxMind.com"
        + _encode(metadata)
    )
    return path


@pytest.fixture
def everywhere_db(tmp_path: Path) -> Iterator[GeoDatabase]:
    """Unknown database_type, one record shape per half of the IPv4 space."""
    path = write_mmdb(
        tmp_path / "everywhere.mmdb",
        "GeoGate-Test",
        {"country": {"iso_code": "de"}},
        {"country_code": "FR"},
    )
    with GeoDatabase.open_sync(path, cache_size=8) as db:
        yield db


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("8.8.8.8", "DE"),  # low half, GeoIP2 shape, lower case upper-cased
        ("151.101.1.69", "FR"),  # high half, country_code shape
        ("::ffff:8.8.8.8", "DE"),
        ("10.0.0.1", None),  # all of these have a record: no read happened
        ("127.0.0.1", None),
        ("100.64.0.1", None),
        ("192.0.2.1", None),
        ("198.51.100.1", None),
        ("203.0.113.5", None),
        ("224.0.0.1", None),
        ("240.0.0.1", None),
        ("2606:4700::1111", None),  # IPv6 in an IPv4-only database: no ValueError
    ],
)
def test_special_purpose_addresses_are_not_read(
    everywhere_db: GeoDatabase, ip: str, expected: str | None
) -> None:
    assert everywhere_db.schema is GeoSchema.SHAPE
    assert everywhere_db.lookup(ip_address(ip)) == expected


def test_schema_falls_back_to_record_shape(tmp_path: Path) -> None:
    path = write_mmdb(
        tmp_path / "odd.mmdb",
        "country ipvAll",
        {"country_code": "Germany"},  # not an ISO 3166-1 alpha-2 code
        {"country": {"iso_code": "JP"}},  # the other shape, in a country_code database
    )
    with GeoDatabase.open_sync(path) as db:
        assert db.schema is GeoSchema.COUNTRY_CODE
        assert db.lookup(ip_address("8.8.8.8")) is None
        assert db.lookup(ip_address("151.101.1.69")) == "JP"


# ---------------------------------------------------------------- open errors


@pytest.fixture
def garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.mmdb"
    path.write_bytes(b"this is not a MaxMind DB\n" * 100)
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda tmp: tmp / "missing.mmdb", "no such file"),
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: (tmp / "empty.mmdb", (tmp / "empty.mmdb").touch())[0], "empty file"),
        (
            lambda tmp: (tmp / "g.mmdb", (tmp / "g.mmdb").write_bytes(b"garbage" * 99))[0],
            "not a MaxMind DB file",
        ),
        (lambda tmp: Path("/dev/null"), "not a regular file"),
        (lambda tmp: ANONYMOUS_IP, "database_type 'GeoIP2-Anonymous-IP' holds no country data"),
        (
            lambda tmp: write_mmdb(tmp / "asn.mmdb", "GeoLite2-ASN", {}, {}),
            "database_type 'GeoLite2-ASN' holds no country data",
        ),
    ],
    ids=["missing", "directory", "empty", "garbage", "device", "anonymous-ip", "asn"],
)
def test_open_sync_errors(tmp_path: Path, make, reason: str) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path)
    with pytest.raises(GeoDatabaseError) as info:
        GeoDatabase.open_sync(path)
    assert str(info.value) == f"{path}: {info.value.reason}"
    assert info.value.path == str(path)
    assert info.value.reason.startswith(reason)


def test_error_message_uses_the_path_as_given() -> None:
    with pytest.raises(GeoDatabaseError, match=r"^geodb/x\.mmdb: no such file$"):
        GeoDatabase.open_sync("geodb/x.mmdb")


# ---------------------------------------------------------------- async open and the loop


async def test_open_does_not_block_the_loop() -> None:
    db = await GeoDatabase.open(DBIP)
    try:
        assert db.lookup(ip_address("8.8.8.8")) == "US"
    finally:
        db.close()


async def test_open_errors_arrive_as_geo_database_error(garbage: Path) -> None:
    with pytest.raises(GeoDatabaseError, match="not a MaxMind DB file"):
        await GeoDatabase.open(garbage)
    with pytest.raises(GeoDatabaseError, match="holds no country data"):
        await GeoDatabase.open(ANONYMOUS_IP)


async def test_blockbuster_would_catch_a_sync_open_on_the_loop() -> None:
    """The guard above can fail: open_sync stats the file (the C reader's own fopen/mmap is
    invisible to blockbuster, the stat is not), and on the loop thread that is caught."""
    with pytest.raises(BlockingError, match=r"os\.stat"):
        GeoDatabase.open_sync(DBIP)


async def test_lookup_on_the_loop_does_not_await_or_block(dbs: dict[str, GeoDatabase]) -> None:
    result = dbs["GeoIP2-City"].lookup(ip_address("89.160.20.112"))
    assert not asyncio.iscoroutine(result)
    assert result == "SE"


# ---------------------------------------------------------------- cache, close, repr


def test_repeated_lookup_hits_the_lru(everywhere_db: GeoDatabase) -> None:
    ip = ip_address("8.8.8.8")
    assert everywhere_db.lookup(ip) == "DE"
    assert everywhere_db.cache_info()[:2] == (0, 1)  # hits, misses
    assert everywhere_db.lookup(ip) == "DE"
    assert everywhere_db.lookup(IPv4Address("8.8.8.8")) == "DE"
    info = everywhere_db.cache_info()
    assert (info.hits, info.misses, info.maxsize) == (2, 1, 8)


def test_lru_is_bounded(everywhere_db: GeoDatabase) -> None:
    for n in range(100):
        everywhere_db.lookup(IPv4Address(0x08000000 + n))
    assert everywhere_db.cache_info().currsize == 8


def test_cache_size_zero_disables_the_lru(tmp_path: Path) -> None:
    with GeoDatabase.open_sync(DBIP, cache_size=0) as db:
        db.lookup(ip_address("8.8.8.8"))
        db.lookup(ip_address("8.8.8.8"))
        assert db.cache_info()[:2] == (0, 2)
    with pytest.raises(ValueError, match="cache_size"):
        GeoDatabase.open_sync(DBIP, cache_size=-1)


def test_lookup_rejects_a_non_address_string(dbs: dict[str, GeoDatabase]) -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        dbs["DB-IP"].lookup("not-an-ip")


def test_close(tmp_path: Path) -> None:
    db = GeoDatabase.open_sync(PATHS["GeoLite2-Country"])
    assert db.lookup(ip_address("81.2.69.142")) == "GB"
    db.close()
    db.close()  # idempotent
    with pytest.raises(GeoDatabaseError, match=r"GeoLite2-Country-Test\.mmdb: database is closed$"):
        db.lookup(ip_address("81.2.69.142"))
    assert " closed " in repr(db)


def test_repr_shows_path_type_and_cache_stats(everywhere_db: GeoDatabase) -> None:
    everywhere_db.lookup(IPv6Address("::ffff:8.8.8.8"))
    everywhere_db.lookup(IPv6Address("::ffff:8.8.8.8"))
    assert repr(everywhere_db) == (
        f"<GeoDatabase {everywhere_db.path} type='GeoGate-Test' schema=shape"
        " cache hits=1 misses=1 size=1/8>"
    )
