"""Upstream host-name resolution through aiodns that keeps each answer for its record TTL.

aiohttp's ``TCPConnector`` caches every DNS answer for one fixed ``ttl_dns_cache`` (10 s by
default) whatever the record says. ``TTLResolver`` replaces that cache: it keeps each answer for
the TTL the DNS server gave, clamped to ``[min_ttl, max_ttl]``, so an upstream that moves (DNS
failover, blue/green) is picked up when its record expires, and a stable one is not re-queried
every 10 s.

Rule: the cache is read and written without an ``await`` in between (STYLE B5); only the shared
lookup task awaits aiodns.

Facts this module relies on (aiodns 4.0, pycares 5.2, c-ares 1.34, aiohttp 3.14):

* ``aiodns.DNSResolver.getaddrinfo()`` returns a ``pycares.AddrInfoResult`` whose ``nodes`` carry
  ``ttl`` (seconds left on the A/AAAA record) and whose ``cnames`` carry their own ``ttl``: an
  answer is only as fresh as the shortest of them.
* pycares hands ``flags`` to c-ares unchanged, and c-ares numbers its flags its own way
  (``ARES_AI_ADDRCONFIG`` is ``1 << 6``; ``socket.AI_ADDRCONFIG`` is ``0x20`` on Linux, which is
  ``ARES_AI_ALL`` to c-ares). aiohttp's ``AsyncResolver`` passes the ``socket`` values; this module
  passes the c-ares ones with the same meaning.
* c-ares keeps its own query cache (on by default, c-ares/c-ares#786; entries live at most
  3600 s and their TTLs count down). A re-resolution after ``max_ttl`` can therefore be answered
  from that cache, with the TTL left on the record, instead of by the DNS server: ``max_ttl``
  bounds how long this module serves an answer, not how long c-ares does. pycares 5.2 offers no
  option to turn that cache off (``qcache_max_ttl`` is not among ``Channel``'s arguments).
* ``nameservers`` entries go to c-ares's ``ares_set_servers_csv``, which takes ``ip``,
  ``ip:port`` and ``[ipv6]:port``.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiodns
import pycares
from aiohttp.abc import AbstractResolver, ResolveResult

__all__ = ["DEFAULT_MAX_TTL", "DEFAULT_MIN_TTL", "TTLResolver"]

DEFAULT_MIN_TTL: Final = 1.0  # seconds; a TTL 0 answer (or one from /etc/hosts) is kept this long
DEFAULT_MAX_TTL: Final = 300.0  # seconds; longer record TTLs are cut to this

# Hints given to c-ares, in c-ares's numbering (ares.h: ARES_AI_ADDRCONFIG = 1 << 6;
# ARES_NI_NUMERICHOST / ARES_NI_NUMERICSERV as pycares exports them). They mean what
# aiohttp.resolver's _AI_ADDRCONFIG and _NAME_SOCKET_FLAGS mean. The ares_getaddrinfo(3) page
# documents only NUMERICSERV, CANONNAME, NOSORT and ENVHOSTS, so do not count on ADDRCONFIG
# skipping AAAA queries on a host without IPv6: here AF_UNSPEC asks for A and AAAA either way.
_ARES_AI_ADDRCONFIG: Final = 1 << 6
_ARES_NAME_FLAGS: Final = pycares.ARES_NI_NUMERICHOST | pycares.ARES_NI_NUMERICSERV
# Read by aiohttp and asyncio, so in the socket module's numbering (as aiohttp.resolver): the
# addresses are numeric, so the connector's own getaddrinfo() never goes back to DNS.
_NUMERIC_SOCKET_FLAGS: Final = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV

_Key = tuple[str, int, socket.AddressFamily]  # (host, port, family)


@dataclass(slots=True)
class _Entry:
    """One cached answer: the converted addresses and when they stop being served."""

    addrs: list[ResolveResult]
    expires_at: float  # clock seconds
    first: int = 0  # index of the address handed out first next time

    def take(self) -> list[ResolveResult]:
        """Return the addresses, rotated by one on every call.

        aiohttp's own DNS cache rotates the same way (``_DNSCacheTable.next_addrs``) so that new
        connections spread over all the addresses of a name; ``use_dns_cache=False`` turns that
        off, so the rotation lives here.
        """
        i = self.first
        self.first = (i + 1) % len(self.addrs)
        return self.addrs[i:] + self.addrs[:i]


class TTLResolver(AbstractResolver):
    """aiohttp resolver that caches each aiodns answer for its record TTL.

    Usage::

        resolver = TTLResolver(nameservers=["10.0.0.2", "10.0.0.3:5353"])
        connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            ...
        await resolver.close()  # the connector closes only a resolver it made itself

    ``use_dns_cache=False`` matters: with aiohttp's own cache on, every answer would also be
    kept for the connector's fixed ``ttl_dns_cache`` (10 s by default), whatever its TTL.

    Each answer is cached per ``(host, port, family)`` for the shortest TTL among its address
    and CNAME records, clamped to ``[min_ttl, max_ttl]``, then resolved again. Callers that miss
    the cache for the same key at the same time share one lookup, and a caller that is cancelled
    does not cancel it for the others. Failures are not cached: the next call asks again. Authority
    NXDOMAIN answers are still cached below, by c-ares, for the zone's SOA minimum (RFC 2308), and
    a cached failure would keep failing requests after DNS recovered.

    Two limits of any resolver under aiohttp:

    * IP literals never reach a resolver: the connector connects to them as they are.
    * A change of address applies to new connections only. A pooled keep-alive connection to the
      old address is reused until it closes (``keepalive_timeout``, or the server closes it).

    The table holds one entry per ``(host, port, family)`` ever resolved; upstream hosts come
    from configuration, so it is bounded by it. The aiohttp Windows ``localhost`` retry is left
    out: the gateway runs on uvloop, which is POSIX only.
    """

    def __init__(
        self,
        *,
        nameservers: Sequence[str] | None = None,
        min_ttl: float = DEFAULT_MIN_TTL,
        max_ttl: float = DEFAULT_MAX_TTL,
        clock: Callable[[], float] | None = None,
        **aiodns_kwargs: Any,
    ) -> None:
        """Create the resolver and its aiodns channel; call inside the running event loop.

        Args:
            nameservers: DNS servers as ``"ip"`` or ``"ip:port"`` (``"[v6]:port"`` for IPv6),
                e.g. ``["127.0.0.1:5353"]``; None uses the system's (``/etc/resolv.conf``).
            min_ttl: shortest time an answer is kept, seconds; also applies to TTL 0 answers
                and ``/etc/hosts`` entries (c-ares gives those TTL 0).
            max_ttl: longest time an answer is kept, seconds.
            clock: returns monotonic seconds; default the running loop's ``time()``. Tests
                pass a manual clock (``ManualClock.now``) to move past a TTL without sleeping.
            **aiodns_kwargs: passed to ``aiodns.DNSResolver`` (c-ares channel options such as
                ``timeout`` in seconds per try, ``tries``, ``rotate``).

        Raises:
            ValueError: ``min_ttl`` is negative or greater than ``max_ttl``.
            RuntimeError: no event loop is running.
            aiodns.error.DNSError: c-ares rejected ``nameservers``.
        """
        if not 0 <= min_ttl <= max_ttl:
            raise ValueError(f"need 0 <= min_ttl <= max_ttl, got {min_ttl=} {max_ttl=}")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._min_ttl = float(min_ttl)
        self._max_ttl = float(max_ttl)
        self._clock: Callable[[], float] = clock if clock is not None else loop.time
        self._resolver: aiodns.DNSResolver | None = aiodns.DNSResolver(
            nameservers=list(nameservers) if nameservers else None, loop=loop, **aiodns_kwargs
        )
        self._cache: dict[_Key, _Entry] = {}
        self._inflight: dict[_Key, asyncio.Task[_Entry]] = {}

    def __repr__(self) -> str:
        state = "closed" if self._resolver is None else "open"
        return (
            f"<TTLResolver {state} entries={len(self._cache)} inflight={len(self._inflight)} "
            f"ttl=[{self._min_ttl:g}s, {self._max_ttl:g}s]>"
        )

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Return the addresses of ``host``, from the cache while its TTL lasts.

        Args:
            host: a DNS name such as ``"api.eu.example"`` (aiohttp never passes IP literals).
            port: TCP port copied into every result.
            family: ``AF_INET``, ``AF_INET6`` or ``AF_UNSPEC`` (both), as the connector asks.

        Returns:
            ``ResolveResult`` dicts with numeric ``host``, in DNS order rotated by one per call.

        Raises:
            OSError: the lookup failed (NXDOMAIN, no address, timeout, server failure) or the
                resolver was closed while it ran; ``errno`` is None and the message is c-ares's.
                The connector turns it into ``ClientConnectorDNSError``.
            RuntimeError: the resolver is closed.
        """
        if self._resolver is None:
            raise RuntimeError("TTLResolver is closed")
        key: _Key = (host, port, family)
        entry = self._cache.get(key)
        if entry is not None and self._clock() < entry.expires_at:
            return entry.take()
        task = self._inflight.get(key)
        if task is None:
            task = self._loop.create_task(self._lookup(key), name=f"dns {host}:{port}")
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._lookup_done, key))
        try:
            # shield: a caller that gives up must not cancel the lookup the others wait on
            entry = await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                # close() cancelled the shared lookup; this caller itself was not cancelled
                raise OSError(None, "DNS resolver closed") from None
            raise
        return entry.take()

    async def close(self) -> None:
        """Cancel lookups in flight, drop the cache and release the aiodns channel.

        Callers waiting on a cancelled lookup get ``OSError``. Idempotent.
        """
        resolver, self._resolver = self._resolver, None
        if resolver is None:
            return
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._cache.clear()
        await resolver.close()

    async def _lookup(self, key: _Key) -> _Entry:
        """Ask aiodns, convert the answer and store it; runs once per key at a time."""
        host, port, family = key
        resolver = self._resolver
        if resolver is None:  # closed between resolve() and the task's first step
            raise OSError(None, "DNS resolver closed")
        try:
            answer = await resolver.getaddrinfo(
                host, port=port, type=socket.SOCK_STREAM, family=family, flags=_ARES_AI_ADDRCONFIG
            )
            addrs = await _to_results(resolver, host, port, answer.nodes)
        except aiodns.error.DNSError as exc:
            msg = exc.args[1] if len(exc.args) > 1 else "DNS lookup failed"
            raise OSError(None, msg) from exc
        if not addrs:
            raise OSError(None, "DNS lookup failed")
        ttls: list[int] = [node.ttl for node in answer.nodes]
        ttls.extend(cname.ttl for cname in answer.cnames)
        ttl = min(max(float(min(ttls)), self._min_ttl), self._max_ttl)
        # the TTL counts from when the answer arrived, not from when it was asked for
        entry = _Entry(addrs=addrs, expires_at=self._clock() + ttl)
        self._cache[key] = entry
        return entry

    def _lookup_done(self, key: _Key, task: asyncio.Task[_Entry]) -> None:
        """Forget a finished lookup, and mark its exception retrieved in case every caller left."""
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()


async def _to_results(
    resolver: aiodns.DNSResolver,
    host: str,
    port: int,
    nodes: Sequence[pycares.AddrInfoNode],
) -> list[ResolveResult]:
    """Convert getaddrinfo nodes to aiohttp results, as ``aiohttp.resolver.AsyncResolver`` does.

    Args:
        resolver: used for ``getnameinfo`` on scoped IPv6 addresses.
        host: the name asked for, copied into ``hostname``.
        port: the port asked for.
        nodes: ``AddrInfoResult.nodes``; ``addr`` is ``(ip_bytes, port)`` for IPv4 and
            ``(ip_bytes, port, flowinfo, scope_id)`` for IPv6.

    Returns:
        One ``ResolveResult`` per node, in DNS order; a link-local IPv6 address carries its zone,
        as in ``"fe80::1%eth0"``, so the connector can reach it.
    """
    hosts: list[ResolveResult] = []
    for node in nodes:
        address = node.addr
        if node.family == socket.AF_INET6 and len(address) > 3 and address[3]:
            # A scope id only matters for link-local addresses, where the connector needs the
            # "%zone" suffix; getnameinfo with NUMERICHOST adds it (same shortcut as aiohttp).
            named = await resolver.getnameinfo(
                (address[0].decode("ascii"), *address[1:]), _ARES_NAME_FLAGS
            )
            resolved_host = named.node
        else:
            resolved_host = address[0].decode("ascii")
        hosts.append(
            ResolveResult(
                hostname=host,
                host=resolved_host,
                port=port,
                family=node.family,
                proto=0,
                flags=_NUMERIC_SOCKET_FLAGS,
            )
        )
    return hosts
