"""Client address resolution: the socket peer, or the forwarding chain behind trusted proxies.

Rule: this module decides; it never reads a socket or a file. The caller hands over the peer
address and the raw header values (several header lines joined with ``", "``, RFC 9110 §5.3);
the answer is a plain value. No aiohttp, no asyncio: ``test_forwarded.py`` checks the imports.

Trust model (the one nginx ``real_ip_recursive`` and Envoy ``xff_num_trusted_hops`` share):
headers are believed only when the socket peer is a trusted proxy, and the chain is walked from
the right, because each proxy appends the address it saw and only the right-most entries were
written by proxies we run. Anything left of the first untrusted hop is client-controlled.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    collapse_addresses,
    ip_address,
    ip_network,
)
from typing import NamedTuple

__all__ = [
    "DEFAULT_MEMO_SIZE",
    "AddressSource",
    "ClientAddress",
    "TrustedProxies",
    "client_address",
]

DEFAULT_MEMO_SIZE = 4096  # distinct address strings remembered per TrustedProxies
# Longer strings are parsed but not remembered, so the memo stays small (4096 x 64 bytes):
# "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535" is 53 characters.
_MEMO_MAX_NODE_LEN = 64

# RFC 4291 §2.5.5.2: ::ffff:0:0/96 carries an IPv4 address; dual-stack sockets report IPv4
# clients this way, so trusted CIDRs written in that form are folded to plain IPv4.
_IPV4_MAPPED = IPv6Network("::ffff:0:0/96")

# RFC 7239 §6: node-port = port / obfport; port = 1*5DIGIT;
# obfport = "_" 1*(ALPHA / DIGIT / "." / "_" / "-").
_NODE_PORT = re.compile(r"[0-9]{1,5}|_[A-Za-z0-9._-]+")

# Forwarded tokenizer for values that contain a double quote: a terminated quoted-string
# (RFC 9110 §5.6.4, with quoted-pairs), a run of ordinary characters, a separator, or a lone
# quote. A lone (unterminated) quote is kept as an ordinary character, so that it spoils only
# its own element and not the elements our proxies appended to its right.
_FORWARDED_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[^,;"]+|[,;]|"')


class AddressSource(enum.StrEnum):
    """Where the client address came from; a bounded label for logs and metrics."""

    PEER = "peer"
    X_FORWARDED_FOR = "x-forwarded-for"
    FORWARDED = "forwarded"


class ClientAddress(NamedTuple):
    """The resolved client address and the source it was read from.

    A NamedTuple rather than a frozen dataclass: it is built once per request, and a tuple is
    immutable and about three times cheaper to construct.

    Attributes:
        ip: the client address, IPv4-mapped IPv6 already unwrapped (RFC 4291 §2.5.5.2); None
            when the client is unknown (no peer address, or the chain reached ``unknown``, an
            obfuscated identifier (RFC 7239 §6.3) or garbage before an untrusted hop).
        source: ``peer`` when the peer is untrusted or no forwarding header was sent, else the
            header the chain was read from (also when ``ip`` is None because of that header).
    """

    ip: IPv4Address | IPv6Address | None
    source: AddressSource


class TrustedProxies:
    """A set of networks whose members may tell us who the client is.

    ``contains`` runs several times per request, so the networks are collapsed once into
    ``(network int, mask int)`` pairs per IP version, and ``client_address`` remembers the
    verdict for each address string it has parsed (bounded: the memo is dropped when full, as
    an attacker controls the strings left of the first untrusted hop).

    Usage::

        trusted = TrustedProxies.parse(["127.0.0.1/32", "::1/128", "10.0.0.0/8"])
        trusted.contains(ip_address("10.1.2.3"))    # True

    Args:
        networks: IPv4/IPv6 networks. Networks inside ``::ffff:0:0/96`` are folded to IPv4,
            since addresses are unwrapped before the check (RFC 4291 §2.5.5.2).
        memo_size: at most this many address strings are remembered; 0 disables the memo.
    """

    __slots__ = ("_memo", "_memo_size", "_networks", "_v4", "_v6")

    def __init__(
        self,
        networks: Iterable[IPv4Network | IPv6Network] = (),
        *,
        memo_size: int = DEFAULT_MEMO_SIZE,
    ) -> None:
        v4: list[IPv4Network] = []
        v6: list[IPv6Network] = []
        for net in networks:
            if net.version == 6 and net.subnet_of(_IPV4_MAPPED):
                mapped = IPv4Address(int(net.network_address) & 0xFFFFFFFF)
                v4.append(IPv4Network((mapped, net.prefixlen - 96)))
            elif net.version == 4:
                v4.append(net)
            else:
                v6.append(net)
        v4 = list(collapse_addresses(v4))
        v6 = list(collapse_addresses(v6))
        self._networks: tuple[IPv4Network | IPv6Network, ...] = (*v4, *v6)
        self._v4 = tuple((int(n.network_address), int(n.netmask)) for n in v4)
        self._v6 = tuple((int(n.network_address), int(n.netmask)) for n in v6)
        if memo_size < 0:
            raise ValueError(f"memo_size must be >= 0, got {memo_size}")
        self._memo_size = memo_size
        self._memo: dict[str, tuple[IPv4Address | IPv6Address | None, bool]] = {}

    @classmethod
    def parse(cls, cidrs: Iterable[str], *, memo_size: int = DEFAULT_MEMO_SIZE) -> TrustedProxies:
        """Build the set from CIDR strings such as ``"10.0.0.0/8"`` or ``"::1/128"``.

        A bare address means a single host (/32 or /128).

        Args:
            cidrs: the configured ``trusted_proxies`` entries; may be empty.
            memo_size: see the class docstring.

        Returns:
            The TrustedProxies.

        Raises:
            ValueError: an entry is not an IP network, or has host bits set
                (``10.0.0.1/8``); the message quotes the entry.
            TypeError: ``cidrs`` is a single string instead of a list of them.
        """
        if isinstance(cidrs, str):
            raise TypeError(f"trusted proxies must be a list of CIDR strings, not {cidrs!r}")
        networks: list[IPv4Network | IPv6Network] = []
        for entry in cidrs:
            if not isinstance(entry, str):
                raise ValueError(f"trusted proxy {entry!r} is not a CIDR string")
            try:
                networks.append(ip_network(entry.strip(), strict=True))
            except ValueError as exc:
                raise ValueError(f"trusted proxy {entry!r} is not a valid network: {exc}") from None
        return cls(networks, memo_size=memo_size)

    @property
    def networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        """The collapsed networks, IPv4 first."""
        return self._networks

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __repr__(self) -> str:
        nets = " ".join(str(n) for n in self._networks) or "(none)"
        return f"<TrustedProxies {nets} memo={len(self._memo)}/{self._memo_size}>"

    def contains(self, ip: IPv4Address | IPv6Address) -> bool:
        """Tell whether ``ip`` belongs to a trusted network.

        Args:
            ip: the address; IPv4-mapped IPv6 is checked as IPv4 (RFC 4291 §2.5.5.2).

        Returns:
            True when some trusted network contains the address.
        """
        if ip.version == 6:
            mapped = ip.ipv4_mapped
            if mapped is not None:
                ip = mapped
        nets = self._v4 if ip.version == 4 else self._v6
        n = int(ip)
        return any(n & mask == net for net, mask in nets)

    def trusts(self, node: str) -> bool:
        """Tell whether the address text ``node`` (a peer, say) is a trusted proxy; memoised.

        Args:
            node: an address as text, e.g. aiohttp's ``request.remote``; not an address -> False.
        """
        return self._classify(node)[1]

    def _classify(self, node: str) -> tuple[IPv4Address | IPv6Address | None, bool]:
        """Parse one node (peer or chain entry) and tell whether it is trusted; memoised."""
        verdict = self._memo.get(node)
        if verdict is None:
            ip = _parse_node(node)
            verdict = (ip, ip is not None and self.contains(ip))
            if self._memo_size and len(node) <= _MEMO_MAX_NODE_LEN:
                if len(self._memo) >= self._memo_size:
                    self._memo.clear()  # cheaper and simpler than LRU bookkeeping; rare
                self._memo[node] = verdict
        return verdict


def _parse_node(node: str) -> IPv4Address | IPv6Address | None:
    """Parse an RFC 7239 §6 node (or an X-Forwarded-For entry) into an address.

    Accepted: ``192.0.2.60``, ``192.0.2.60:8080``, ``[2001:db8::1]``, ``[2001:db8::1]:4711``,
    bare ``2001:db8::1`` (X-Forwarded-For in the wild), each optionally in double quotes.
    ``unknown``, obfuscated identifiers (``_hidden``, RFC 7239 §6.3), a bad port and anything
    else give None. IPv4-mapped IPv6 is unwrapped (RFC 4291 §2.5.5.2). Never raises.
    """
    s = node.strip()
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        s = s[1:-1]
    if not s:
        return None
    ip: IPv4Address | IPv6Address
    try:
        if s[0] == "[":
            end = s.find("]")
            if end < 0:
                return None
            rest = s[end + 1 :]
            if rest and (rest[0] != ":" or not _NODE_PORT.fullmatch(rest, 1)):
                return None
            ip = IPv6Address(s[1:end])  # RFC 7239 §6: brackets hold IPv6 only
        elif s.count(":") == 1:
            host, _, port = s.partition(":")
            if not _NODE_PORT.fullmatch(port):
                return None
            ip = IPv4Address(host)
        else:
            ip = ip_address(s)
    except ValueError:
        return None
    if ip.version == 6:
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return mapped
    return ip


def _forwarded_nodes(header: str) -> list[str | None]:
    """The ``for=`` value of each non-empty Forwarded element, left to right (RFC 7239 §4).

    An element without ``for``, or with ``for`` twice ("each parameter MUST NOT occur more
    than once per forwarded-element", RFC 7239 §4), gives None. Empty elements are skipped
    (RFC 9110 §5.6.1). Parameter names are case-insensitive (RFC 7239 §4).
    """
    elements: list[list[str]]
    if '"' not in header:  # the common case: no quoted-string, plain splitting is exact
        elements = [element.split(";") for element in header.split(",")]
    else:
        elements = [[]]
        pair: list[str] = []
        for token in _FORWARDED_TOKEN.findall(header):
            if token == ",":
                elements[-1].append("".join(pair))
                elements.append([])
                pair = []
            elif token == ";":
                elements[-1].append("".join(pair))
                pair = []
            else:
                pair.append(token)
        elements[-1].append("".join(pair))

    nodes: list[str | None] = []
    for pairs in elements:
        node: str | None = None
        seen_for = False
        empty = True
        for item in pairs:
            key, eq, value = item.partition("=")
            key = key.strip()
            if key or eq:
                empty = False
            if key.lower() == "for":
                node = None if seen_for else value
                seen_for = True
        if not empty:
            nodes.append(node)
    return nodes


def _xff_nodes(header: str) -> list[str | None]:
    """The non-empty entries of an X-Forwarded-For value, left to right."""
    return [entry for entry in header.split(",") if entry and not entry.isspace()]


def client_address(
    peer: str | None,
    *,
    x_forwarded_for: str | None,
    forwarded: str | None,
    trusted: TrustedProxies,
) -> ClientAddress:
    """Decide who the client is: the socket peer, or an entry of the forwarding chain.

    1. The peer is not a trusted proxy (or unknown): the peer is the client; both headers are
       ignored, since anyone can send them.
    2. Otherwise take the chain from ``Forwarded`` (RFC 7239) if it has any element, else from
       ``X-Forwarded-For``; with neither, the peer is the client (the proxy's own request).
    3. Walk the chain from the right, skipping trusted proxies; the first untrusted entry is
       the client. If every entry is trusted, the left-most one is.
    4. An entry that is not an address (``unknown``, ``_hidden`` (RFC 7239 §6.3), garbage, an
       element without ``for=``) stops the walk: the client is unknown, nothing is guessed.

    Why Forwarded first: it is the standard (RFC 7239), with an unambiguous grammar for IPv6,
    ports and obfuscated nodes; a proxy that writes it deliberately, and proxies that write both
    headers write the same hops, so merging the two chains would count hops twice. The cost:
    a client can send its own ``Forwarded`` through a proxy that only appends to
    X-Forwarded-For and passes other headers on. Deployments whose proxies do not set or strip
    ``Forwarded`` must pass ``forwarded=None`` (make it a config switch).

    Args:
        peer: the socket peer address (aiohttp ``request.remote``), or None (Unix socket).
        x_forwarded_for: all X-Forwarded-For lines joined with ``","``, or None.
        forwarded: all Forwarded lines joined with ``","``, or None.
        trusted: the trusted proxy networks.

    Returns:
        ClientAddress(ip, source); ``ip`` has IPv4-mapped IPv6 unwrapped (RFC 4291 §2.5.5.2)
        and is None when the client is unknown. Bad header input never raises.
    """
    if peer is None:
        return ClientAddress(None, AddressSource.PEER)
    peer_ip, peer_trusted = trusted._classify(peer)
    if not peer_trusted:
        return ClientAddress(peer_ip, AddressSource.PEER)

    nodes: list[str | None] = []
    source = AddressSource.PEER
    if forwarded:
        nodes = _forwarded_nodes(forwarded)
        source = AddressSource.FORWARDED
    if not nodes and x_forwarded_for:
        nodes = _xff_nodes(x_forwarded_for)
        source = AddressSource.X_FORWARDED_FOR
    if not nodes:
        return ClientAddress(peer_ip, AddressSource.PEER)

    ip: IPv4Address | IPv6Address | None = None
    for node in reversed(nodes):
        if node is None:
            return ClientAddress(None, source)
        ip, is_trusted = trusted._classify(node.strip())
        if ip is None or not is_trusted:
            return ClientAddress(ip, source)
    return ClientAddress(ip, source)  # every hop trusted: the left-most one
