"""gateway.forwarded: who the client is, given the peer, the forwarding headers, the trust set."""

from __future__ import annotations

import random
import subprocess
import sys
from ipaddress import IPv4Network, ip_address, ip_network

import pytest

from gateway.forwarded import AddressSource, ClientAddress, TrustedProxies, client_address

__all__: list[str] = []

TRUSTED = TrustedProxies.parse(["127.0.0.1/32", "::1/128", "10.0.0.0/8", "fd00::/8"])

PEER, XFF, FWD = AddressSource.PEER, AddressSource.X_FORWARDED_FOR, AddressSource.FORWARDED

T = "10.0.0.2"  # a trusted peer
C = "198.51.100.7"  # the client, in most rows

# id: (peer, X-Forwarded-For, Forwarded, expected client, expected source)
CASES: dict[str, tuple[str | None, str | None, str | None, str | None, AddressSource]] = {
    # -- untrusted peer: headers are ignored, whatever they say
    "untrusted-peer-spoofed-xff": ("203.0.113.7", "1.2.3.4", None, "203.0.113.7", PEER),
    "untrusted-peer-spoofed-fwd": ("203.0.113.7", None, "for=1.2.3.4", "203.0.113.7", PEER),
    "mapped-untrusted-peer": ("::ffff:203.0.113.7", "1.2.3.4", None, "203.0.113.7", PEER),
    "ipv6-untrusted-peer": ("2001:db8::9", "1.2.3.4", None, "2001:db8::9", PEER),
    "no-peer": (None, "1.2.3.4", "for=1.2.3.4", None, PEER),
    "garbage-peer": ("not-an-ip", "1.2.3.4", None, None, PEER),
    # -- trusted peer without forwarding headers: the proxy's own request
    "trusted-peer-no-headers": (T, None, None, T, PEER),
    "empty-headers": (T, "", "", T, PEER),
    "only-empty-elements": (T, " , ,", " ; , ", T, PEER),
    # -- X-Forwarded-For, walked from the right
    "xff-one-hop": (T, C, None, C, XFF),
    "xff-trusted-hops-on-right": (T, f"{C}, 10.0.0.3, 10.0.0.4", None, C, XFF),
    "xff-spoofed-left-part-ignored": (T, f"6.6.6.6, {C}, 10.0.0.3", None, C, XFF),
    "xff-all-trusted-left-most": ("127.0.0.1", "10.1.1.1, 10.2.2.2", None, "10.1.1.1", XFF),
    "xff-garbage-stops": (T, f"{C}, garbage, 10.0.0.3", None, None, XFF),
    "xff-unknown": (T, "unknown", None, None, XFF),
    "xff-garbage-beyond-client": (T, f"garbage, {C}", None, C, XFF),
    "xff-empty-elements": (T, f" , {C} ,, ", None, C, XFF),
    "xff-ipv4-ports": (T, f"{C}:5678, 10.0.0.3:80", None, C, XFF),
    "xff-bracketed-ipv6-port": (T, "[2001:db8::7]:80", None, "2001:db8::7", XFF),
    "xff-bracketed-ipv6": (T, "[2001:db8::7]", None, "2001:db8::7", XFF),
    "xff-bare-ipv6": (T, "2001:db8::7, ::1", None, "2001:db8::7", XFF),
    "xff-bad-port": (T, f"{C}:99999999", None, None, XFF),
    "xff-bracketed-ipv4": (T, f"[{C}]", None, None, XFF),
    "xff-leading-zero-octet": (T, "198.051.100.7", None, None, XFF),
    "xff-mapped-entry": (T, f"::ffff:{C}", None, C, XFF),
    "xff-mapped-trusted-hop": (T, f"{C}, ::ffff:10.0.0.3", None, C, XFF),
    "mapped-trusted-peer": ("::ffff:10.0.0.2", C, None, C, XFF),
    # -- IPv6 trusted CIDRs
    "ipv6-trusted-cidr": ("::1", "2001:db8::7, fd00::3", None, "2001:db8::7", XFF),
    "ipv6-all-trusted": ("fd12::1", "fd00::1, fd99::2", None, "fd00::1", XFF),
    # -- Forwarded (RFC 7239)
    "fwd-simple": (T, None, f"for={C}", C, FWD),
    "fwd-quoted-ipv6-port": (T, None, 'for="[2001:db8:cafe::17]:4711"', "2001:db8:cafe::17", FWD),
    "fwd-quoted-ipv6": (T, None, 'for="[2001:db8::17]"', "2001:db8::17", FWD),
    "fwd-ipv4-port": (T, None, "for=192.0.2.60:8080", "192.0.2.60", FWD),
    "fwd-quoted-ipv4-port": (T, None, 'for="192.0.2.60:8080"', "192.0.2.60", FWD),
    "fwd-mixed-case": (T, None, f"For={C};Proto=https;BY=10.0.0.2", C, FWD),
    "fwd-for-not-first": (T, None, f'proto=http;FOR="{C}";by=203.0.113.43', C, FWD),
    "fwd-several-elements": (T, None, f"for=6.6.6.6, for={C};proto=https, for=10.0.0.3", C, FWD),
    "fwd-ipv6-hops": (
        "fd00::1",
        None,
        'for="[2001:db8::7]", for="[fd00::2]:443"',
        "2001:db8::7",
        FWD,
    ),
    "fwd-all-trusted": (T, None, "for=10.1.1.1, for=10.2.2.2", "10.1.1.1", FWD),
    "fwd-obfuscated": (T, None, 'for="_hidden"', None, FWD),
    "fwd-obfuscated-unquoted": (T, None, "for=_hidden, for=10.0.0.3", None, FWD),
    "fwd-unknown": (T, None, "for=unknown", None, FWD),
    "fwd-obfport": (T, None, 'for="[2001:db8::7]:_p0rt"', "2001:db8::7", FWD),
    "fwd-element-without-for": (T, None, f"for={C}, proto=https", None, FWD),
    "fwd-duplicate-for": (T, None, f"for={C};for=10.0.0.3", None, FWD),
    "fwd-empty-for": (T, None, "for=", None, FWD),
    "fwd-separators-inside-quotes": (T, None, f'for="a,b;c", for={C}', C, FWD),
    "fwd-quoted-garbage": (T, None, f'for={C}, for="x,y"', None, FWD),
    "fwd-unterminated-quote-on-left": (T, None, f'for="6.6.6.6, for={C}', C, FWD),
    "fwd-unterminated-quote": (T, None, f'for="{C}', None, FWD),
    "fwd-unclosed-bracket": (T, None, "for=[2001:db8::7:80", None, FWD),
    "fwd-junk-after-bracket": (T, None, "for=[2001:db8::7]x", None, FWD),
    # -- both headers: Forwarded wins when it has an element
    "fwd-preferred-over-xff": (T, "203.0.113.99", f"for={C}", C, FWD),
    "empty-fwd-falls-back-to-xff": (T, C, "", C, XFF),
    "blank-fwd-falls-back": (T, C, " , ", C, XFF),
}


@pytest.mark.parametrize(
    ("peer", "xff", "fwd", "expected", "source"), CASES.values(), ids=CASES.keys()
)
def test_client_address(
    peer: str | None, xff: str | None, fwd: str | None, expected: str | None, source: AddressSource
) -> None:
    result = client_address(peer, x_forwarded_for=xff, forwarded=fwd, trusted=TRUSTED)
    assert result == ClientAddress(None if expected is None else ip_address(expected), source)
    # a second call answers from the memo and must agree
    assert client_address(peer, x_forwarded_for=xff, forwarded=fwd, trusted=TRUSTED) == result


@pytest.mark.parametrize("sep", [",", ", ", " ,\t"])
def test_several_header_lines_joined(sep: str) -> None:
    lines = ["for=6.6.6.6", 'for="[2001:db8::7]:4711";proto=https', "for=10.0.0.3, for=10.0.0.4"]
    result = client_address(
        "10.0.0.2", x_forwarded_for=None, forwarded=sep.join(lines), trusted=TRUSTED
    )
    assert result == (ip_address("2001:db8::7"), FWD)
    xff_lines = ["6.6.6.6, 198.51.100.7", "10.0.0.3"]
    result = client_address(
        "10.0.0.2", x_forwarded_for=sep.join(xff_lines), forwarded=None, trusted=TRUSTED
    )
    assert result == (ip_address("198.51.100.7"), XFF)


def test_no_trusted_proxies_always_gives_the_peer() -> None:
    nobody = TrustedProxies.parse([])
    assert not nobody
    result = client_address("127.0.0.1", x_forwarded_for="1.2.3.4", forwarded=None, trusted=nobody)
    assert result == (ip_address("127.0.0.1"), PEER)


def test_source_is_a_plain_string_label() -> None:
    assert [str(s) for s in AddressSource] == ["peer", "x-forwarded-for", "forwarded"]
    assert AddressSource.FORWARDED == "forwarded"


def test_bad_header_input_never_raises() -> None:
    """Random junk over the characters the grammars care about; seeded, so reproducible."""
    rng = random.Random(7239)
    alphabet = ' \t",;=[]:_%.\\0123456789abcdefABCDEFforunknwFOR\x00\xff'
    for _ in range(3000):
        junk = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        for xff, fwd in ((junk, None), (None, junk), (junk, junk)):
            result = client_address("10.0.0.2", x_forwarded_for=xff, forwarded=fwd, trusted=TRUSTED)
            assert isinstance(result, ClientAddress)
        assert isinstance(
            client_address(junk, x_forwarded_for=junk, forwarded=junk, trusted=TRUSTED),
            ClientAddress,
        )


# ---------------------------------------------------------------- TrustedProxies


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", False),
        ("10.255.255.255", True),
        ("11.0.0.0", False),
        ("::1", True),
        ("::2", False),
        ("fd00::1", True),
        ("fe80::1", False),
        ("::ffff:10.1.2.3", True),  # RFC 4291 §2.5.5.2: checked as IPv4
        ("::ffff:11.1.2.3", False),
    ],
)
def test_contains(ip: str, expected: bool) -> None:
    assert TRUSTED.contains(ip_address(ip)) is expected


def test_mapped_cidr_is_folded_to_ipv4_and_networks_are_collapsed() -> None:
    trusted = TrustedProxies.parse(["::ffff:192.168.0.0/112", "10.0.0.0/9", "10.128.0.0/9", "::1"])
    assert trusted.networks == (
        ip_network("10.0.0.0/8"),
        ip_network("192.168.0.0/16"),
        ip_network("::1/128"),
    )
    assert isinstance(trusted.networks[1], IPv4Network)
    assert trusted.contains(ip_address("192.168.4.5"))
    assert trusted.contains(ip_address("::ffff:192.168.4.5"))
    assert repr(trusted) == "<TrustedProxies 10.0.0.0/8 192.168.0.0/16 ::1/128 memo=0/4096>"


@pytest.mark.parametrize(
    "entry", ["nope", "10.0.0.1/8", "10.0.0.0/33", "", "::1/129", "1.2.3.4/8", "fd00::1/8"]
)
def test_parse_rejects_bad_entry_with_its_text(entry: str) -> None:
    with pytest.raises(ValueError, match=f"trusted proxy {entry!r}"):
        TrustedProxies.parse(["127.0.0.1/32", entry])


def test_parse_rejects_non_string_entry_and_bare_string() -> None:
    with pytest.raises(ValueError, match="trusted proxy 10 is not a CIDR string"):
        TrustedProxies.parse([10])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="list of CIDR strings"):
        TrustedProxies.parse("10.0.0.0/8")


def test_memo_is_bounded() -> None:
    trusted = TrustedProxies.parse(["10.0.0.0/8"], memo_size=3)
    for i in range(10):
        client_address(f"10.0.0.{i}", x_forwarded_for=None, forwarded=None, trusted=trusted)
        assert repr(trusted).endswith(f"memo={i % 3 + 1}/3>")
    no_memo = TrustedProxies.parse(["10.0.0.0/8"], memo_size=0)
    result = client_address("10.0.0.1", x_forwarded_for="1.2.3.4", forwarded=None, trusted=no_memo)
    assert result == (ip_address("1.2.3.4"), XFF)
    assert repr(no_memo).endswith("memo=0/0>")
    with pytest.raises(ValueError, match="memo_size"):
        TrustedProxies([], memo_size=-1)


def test_decision_module_does_no_io() -> None:
    probe = (
        "import sys, gateway.forwarded; "
        "assert not {'aiohttp', 'asyncio', 'socket', 'maxminddb'} & set(sys.modules), "
        "sorted({'aiohttp', 'asyncio', 'socket', 'maxminddb'} & set(sys.modules))"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)
