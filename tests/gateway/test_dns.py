"""TTLResolver against a real DNS server on loopback UDP, and under a real aiohttp client.

The server is an asyncio DatagramProtocol in the test's own loop (no thread), answering with
dnslib-built packets; counting queries server-side shows what TTLResolver's cache saves. A
ManualClock moves past TTLs without sleeping.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import cast

import aiodns
import aiohttp
import pycares
import pytest
import uvloop
from aiohttp import web
from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, TXT, A, DNSRecord
from pytest_aiohttp.plugin import AiohttpServer

from gateway import dns
from gateway.dns import DEFAULT_MAX_TTL, DEFAULT_MIN_TTL, TTLResolver

NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


class ManualClock:
    """Monotonic seconds that move only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


class FakeDNS(asyncio.DatagramProtocol):
    """A DNS server for made-up names: A/AAAA/CNAME from dicts, NXDOMAIN for the rest.

    Every reply also carries one TTL 0 record in its additional section. c-ares keeps its own
    query cache (c-ares/c-ares#786) but never stores a response holding a TTL 0 record, so each
    lookup TTLResolver makes reaches this server and ``count()`` measures TTLResolver's cache
    alone. getaddrinfo reads only the answer section, so the extra record changes no result.
    """

    def __init__(self) -> None:
        self.a: dict[str, list[str]] = {}
        self.aaaa: dict[str, list[str]] = {}
        self.cname: dict[str, tuple[str, int]] = {}  # alias -> (target, ttl)
        self.ttl = 30
        self.queries: list[tuple[str, str]] = []  # (name without the final dot, type)
        self.paused = False  # hold replies until release()
        self._held: list[tuple[bytes, tuple[str, int]]] = []
        self._arrived: asyncio.Future[None] | None = None
        self._transport: asyncio.DatagramTransport | None = None

    @property
    def address(self) -> str:
        assert self._transport is not None
        host, port = self._transport.get_extra_info("sockname")[:2]
        return f"{host}:{port}"

    def count(self, name: str, qtype: str = "A") -> int:
        return self.queries.count((name, qtype))

    async def wait_for_queries(self, n: int) -> None:
        async with asyncio.timeout(2):
            while len(self.queries) < n:
                self._arrived = asyncio.get_running_loop().create_future()
                await self._arrived

    def release(self) -> None:
        assert self._transport is not None
        self.paused = False
        for packet, peer in self._held:
            self._transport.sendto(packet, peer)
        self._held.clear()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self._transport is not None
        request = DNSRecord.parse(data)
        name, qtype = str(request.q.qname).rstrip("."), QTYPE[request.q.qtype]
        self.queries.append((name, qtype))
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)
        reply = request.reply()
        target = name
        if name in self.cname:
            target, cname_ttl = self.cname[name]
            reply.add_answer(RR(name, QTYPE.CNAME, rdata=CNAME(target), ttl=cname_ttl))
        if target not in self.a and target not in self.aaaa:
            reply.header.rcode = RCODE.NXDOMAIN
        elif qtype == "A":
            for ip in self.a.get(target, []):
                reply.add_answer(RR(target, QTYPE.A, rdata=A(ip), ttl=self.ttl))
        elif qtype == "AAAA":
            for ip in self.aaaa.get(target, []):
                reply.add_answer(RR(target, QTYPE.AAAA, rdata=AAAA(ip), ttl=self.ttl))
        reply.add_ar(RR("no-cache.test", QTYPE.TXT, rdata=TXT("keep c-ares from caching"), ttl=0))
        if self.paused:
            self._held.append((reply.pack(), addr))
        else:
            self._transport.sendto(reply.pack(), addr)


async def start_dns() -> tuple[asyncio.DatagramTransport, FakeDNS]:
    loop = asyncio.get_running_loop()
    return await loop.create_datagram_endpoint(FakeDNS, local_addr=("127.0.0.1", 0))


@pytest.fixture
async def dns_server() -> AsyncIterator[FakeDNS]:
    transport, server = await start_dns()
    yield server
    transport.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def resolver(dns_server: FakeDNS, clock: ManualClock) -> AsyncIterator[TTLResolver]:
    resolver = TTLResolver(nameservers=[dns_server.address], clock=clock.now)
    yield resolver
    await resolver.close()


def result(ip: str, port: int, family: int = socket.AF_INET, name: str = "backend.test") -> dict:
    return {
        "hostname": name,
        "host": ip,
        "port": port,
        "family": family,
        "proto": 0,
        "flags": NUMERIC,
    }


async def test_answer_carries_the_servers_address(
    resolver: TTLResolver, dns_server: FakeDNS
) -> None:
    dns_server.a["backend.test"] = ["127.0.0.1"]
    assert await resolver.resolve("backend.test", 8080) == [result("127.0.0.1", 8080)]


async def test_ipv6_answer(resolver: TTLResolver, dns_server: FakeDNS) -> None:
    dns_server.aaaa["backend.test"] = ["::1"]
    got = await resolver.resolve("backend.test", 443, family=socket.AF_INET6)
    assert got == [result("::1", 443, socket.AF_INET6)]


async def test_answer_is_kept_for_its_ttl_then_a_changed_address_is_picked_up(
    resolver: TTLResolver, dns_server: FakeDNS, clock: ManualClock
) -> None:
    dns_server.a["backend.test"], dns_server.ttl = ["127.0.0.1"], 30
    assert (await resolver.resolve("backend.test", 80))[0]["host"] == "127.0.0.1"
    dns_server.a["backend.test"] = ["127.0.0.2"]
    clock.advance(29.5)
    assert (await resolver.resolve("backend.test", 80))[0]["host"] == "127.0.0.1"
    assert dns_server.count("backend.test") == 1
    clock.advance(0.5)  # exactly 30 s after the answer: expired
    assert (await resolver.resolve("backend.test", 80))[0]["host"] == "127.0.0.2"
    assert dns_server.count("backend.test") == 2


async def test_cache_is_per_host_port_and_family(
    resolver: TTLResolver, dns_server: FakeDNS
) -> None:
    dns_server.a["backend.test"] = ["127.0.0.1"]
    dns_server.aaaa["backend.test"] = ["::1"]
    await resolver.resolve("backend.test", 80)
    assert await resolver.resolve("backend.test", 81) == [result("127.0.0.1", 81)]
    await resolver.resolve("backend.test", 80, family=socket.AF_INET6)
    await resolver.resolve("backend.test", 80)
    assert dns_server.count("backend.test") == 2
    assert dns_server.count("backend.test", "AAAA") == 1


@pytest.mark.parametrize(
    ("record_ttl", "bounds", "kept"),
    [
        pytest.param(0, {}, DEFAULT_MIN_TTL, id="ttl0-to-default-min"),
        pytest.param(86400, {}, DEFAULT_MAX_TTL, id="one-day-to-default-max"),
        pytest.param(5, {"min_ttl": 10.0}, 10.0, id="raised-to-min_ttl"),
        pytest.param(600, {"max_ttl": 60.0}, 60.0, id="cut-to-max_ttl"),
    ],
)
async def test_record_ttl_is_clamped(
    dns_server: FakeDNS,
    clock: ManualClock,
    record_ttl: int,
    bounds: dict[str, float],
    kept: float,
) -> None:
    dns_server.a["backend.test"], dns_server.ttl = ["127.0.0.1"], record_ttl
    resolver = TTLResolver(nameservers=[dns_server.address], clock=clock.now, **bounds)
    try:
        await resolver.resolve("backend.test", 80)
        clock.advance(kept - 0.5)
        await resolver.resolve("backend.test", 80)
        assert dns_server.count("backend.test") == 1
        clock.advance(0.5)
        await resolver.resolve("backend.test", 80)
        assert dns_server.count("backend.test") == 2
    finally:
        await resolver.close()


async def test_cname_ttl_bounds_the_answer(
    resolver: TTLResolver, dns_server: FakeDNS, clock: ManualClock
) -> None:
    dns_server.cname["backend.test"] = ("eu-1.backend.test", 5)
    dns_server.a["eu-1.backend.test"], dns_server.ttl = ["127.0.0.3"], 30
    assert await resolver.resolve("backend.test", 80) == [result("127.0.0.3", 80)]
    clock.advance(5)
    await resolver.resolve("backend.test", 80)
    assert dns_server.count("backend.test") == 2


async def test_nxdomain_raises_oserror_and_is_not_cached(
    resolver: TTLResolver, dns_server: FakeDNS
) -> None:
    for attempt in (1, 2):
        with pytest.raises(OSError, match="Domain name not found") as info:
            await resolver.resolve("missing.test", 80)
        assert info.value.errno is None
        assert isinstance(info.value.__cause__, aiodns.error.DNSError)
        assert dns_server.count("missing.test") == attempt


async def test_name_without_address_of_the_family_raises_oserror(
    resolver: TTLResolver, dns_server: FakeDNS
) -> None:
    dns_server.aaaa["v6only.test"] = ["::1"]
    with pytest.raises(OSError, match="no data") as info:
        await resolver.resolve("v6only.test", 80, family=socket.AF_INET)
    assert info.value.errno is None


async def test_concurrent_misses_share_one_query(
    resolver: TTLResolver, dns_server: FakeDNS
) -> None:
    dns_server.a["backend.test"] = ["127.0.0.1"]
    dns_server.paused = True
    lookups = [asyncio.create_task(resolver.resolve("backend.test", 80)) for _ in range(10)]
    await dns_server.wait_for_queries(1)
    dns_server.release()
    answers = await asyncio.gather(*lookups)
    assert answers == [[result("127.0.0.1", 80)]] * 10
    assert dns_server.count("backend.test") == 1


async def test_cancelled_caller_does_not_cancel_the_shared_lookup(
    resolver: TTLResolver, dns_server: FakeDNS
) -> None:
    dns_server.a["backend.test"] = ["127.0.0.1"]
    dns_server.paused = True
    first = asyncio.create_task(resolver.resolve("backend.test", 80))
    second = asyncio.create_task(resolver.resolve("backend.test", 80))
    await dns_server.wait_for_queries(1)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    dns_server.release()
    assert await second == [result("127.0.0.1", 80)]
    assert await resolver.resolve("backend.test", 80) == [result("127.0.0.1", 80)]
    assert dns_server.count("backend.test") == 1


async def test_addresses_rotate_on_cache_hits(resolver: TTLResolver, dns_server: FakeDNS) -> None:
    dns_server.a["backend.test"] = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    first = [r["host"] for r in await resolver.resolve("backend.test", 80)]
    second = [r["host"] for r in await resolver.resolve("backend.test", 80)]
    fourth = [r["host"] for r in [await resolver.resolve("backend.test", 80) for _ in range(2)][1]]
    assert sorted(first) == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert second == first[1:] + first[:1]
    assert fourth == first
    assert dns_server.count("backend.test") == 1


async def test_link_local_ipv6_address_keeps_its_zone() -> None:
    # DNS cannot carry a scope id, so feed getaddrinfo-shaped nodes; getnameinfo is c-ares's own.
    node = pycares.AddrInfoNode(
        ttl=30,
        flags=0,
        family=socket.AF_INET6,
        socktype=1,
        protocol=0,
        addr=(b"fe80::1", 443, 0, 1),
    )
    plain = pycares.AddrInfoNode(
        ttl=30,
        flags=0,
        family=socket.AF_INET6,
        socktype=1,
        protocol=0,
        addr=(b"fd00::2", 443, 0, 0),
    )
    async with aiodns.DNSResolver(loop=asyncio.get_running_loop()) as channel:
        got = await dns._to_results(channel, "ll.test", 443, [node, plain])
    zone = socket.if_indextoname(1)
    assert [r["host"] for r in got] == [f"fe80::1%{zone}", "fd00::2"]


def test_flags_are_in_c_ares_numbering() -> None:
    # pycares passes flags to c-ares untouched; the socket module numbers them differently.
    from pycares._cares import lib

    assert dns._ARES_AI_ADDRCONFIG == lib.ARES_AI_ADDRCONFIG
    assert dns._ARES_NAME_FLAGS == lib.ARES_NI_NUMERICHOST | lib.ARES_NI_NUMERICSERV


@pytest.mark.parametrize("bounds", [{"min_ttl": -1.0}, {"min_ttl": 10.0, "max_ttl": 5.0}])
async def test_bad_ttl_bounds_are_rejected(bounds: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="min_ttl"):
        TTLResolver(**bounds)


async def test_close_fails_waiting_callers_and_later_calls(
    resolver: TTLResolver, dns_server: FakeDNS
) -> None:
    dns_server.a["backend.test"] = ["127.0.0.1"]
    dns_server.paused = True
    waiting = asyncio.create_task(resolver.resolve("backend.test", 80))
    await dns_server.wait_for_queries(1)
    await resolver.close()
    with pytest.raises(OSError, match="closed"):
        await waiting
    with pytest.raises(RuntimeError, match="closed"):
        await resolver.resolve("backend.test", 80)
    await resolver.close()  # idempotent
    assert repr(resolver) == "<TTLResolver closed entries=0 inflight=0 ttl=[1s, 300s]>"


async def test_repr_shows_live_state(resolver: TTLResolver, dns_server: FakeDNS) -> None:
    dns_server.a["backend.test"] = ["127.0.0.1"]
    await resolver.resolve("backend.test", 80)
    assert repr(resolver) == "<TTLResolver open entries=1 inflight=0 ttl=[1s, 300s]>"


def _native_threads() -> int:
    """Threads the kernel sees that Python's threading module does not (c-ares event threads)."""
    return len(os.listdir("/proc/self/task")) - threading.active_count()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _wait_until(predicate: Callable[[], bool]) -> None:
    # pycares destroys a closed channel, joining its event thread, on its own reaper thread:
    # nothing to await, so poll (at most 2 s).
    for _ in range(200):
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(
        f"still held 2 s after close(): {_native_threads()} native threads, {_open_fds()} fds"
    )


def _settled_native_threads() -> int:
    """The native thread count once it has not changed for 0.2 s (at most 3 s of polling)."""
    count, same = _native_threads(), 0
    for _ in range(300):
        time.sleep(0.01)
        now = _native_threads()
        same = same + 1 if now == count else 0
        count = now
        if same >= 20:
            break
    return count


def test_close_releases_threads_and_sockets() -> None:
    # Measured between loop runs, never on a running loop (no blocking /proc reads there).
    async def open_and_resolve() -> tuple[asyncio.DatagramTransport, TTLResolver]:
        transport, server = await start_dns()
        server.a["backend.test"] = ["127.0.0.1"]
        resolver = TTLResolver(nameservers=[server.address])
        await resolver.resolve("backend.test", 80)
        return transport, resolver

    async def close(transport: asyncio.DatagramTransport, resolver: TTLResolver) -> None:
        await resolver.close()
        transport.close()

    with asyncio.Runner() as runner:
        runner.run(close(*runner.run(open_and_resolve())))  # starts pycares's reaper thread
        # native threads of earlier tests (libuv's pool, channels still being reaped) settle
        before = _settled_native_threads()
        python_threads, fds = set(threading.enumerate()), _open_fds()

        transport, resolver = runner.run(open_and_resolve())
        assert _native_threads() == before + 1  # the channel's c-ares event thread
        assert _open_fds() > fds
        runner.run(close(transport, resolver))

        _wait_until(lambda: _native_threads() == before and _open_fds() == fds)
        assert set(threading.enumerate()) == python_threads


def test_resolves_on_uvloop() -> None:
    async def main() -> list[str]:
        transport, server = await start_dns()
        server.a["backend.test"] = ["127.0.0.1"]
        resolver = TTLResolver(nameservers=[server.address])
        try:
            return [r["host"] for r in await resolver.resolve("backend.test", 80)]
        finally:
            await resolver.close()
            transport.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()) == ["127.0.0.1"]


async def _servers_on_one_port(aiohttp_server: AiohttpServer, hosts: list[str]) -> int:
    """Start one app per host, all on the same port, each answering with its own address."""

    def app_for(host: str) -> web.Application:
        async def whoami(request: web.Request) -> web.Response:
            return web.Response(text=host)

        app = web.Application()
        app.router.add_get("/", whoami)
        return app

    first = await aiohttp_server(app_for(hosts[0]), host=hosts[0])
    for _ in range(5):  # the port may be taken on another address; try a fresh one
        try:
            for host in hosts[1:]:
                await aiohttp_server(app_for(host), host=host, port=first.port)
        except OSError:
            first = await aiohttp_server(app_for(hosts[0]), host=hosts[0])
        else:
            return int(first.port)
    raise AssertionError("no port free on every loopback address")


async def test_client_follows_a_dns_change_on_new_connections(
    aiohttp_server: AiohttpServer,
    resolver: TTLResolver,
    dns_server: FakeDNS,
    clock: ManualClock,
) -> None:
    port = await _servers_on_one_port(aiohttp_server, ["127.0.0.1", "127.0.0.2"])
    dns_server.a["backend.test"], dns_server.ttl = ["127.0.0.1"], 30
    url = f"http://backend.test:{port}/"
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def get(*, close: bool = False) -> str:
            headers = {"Connection": "close"} if close else {}
            async with session.get(url, headers=headers) as resp:
                return await resp.text()

        assert await get() == "127.0.0.1"
        dns_server.a["backend.test"] = ["127.0.0.2"]
        clock.advance(31)
        # the pooled keep-alive connection still leads to the old address, with no lookup
        assert await get(close=True) == "127.0.0.1"
        assert dns_server.count("backend.test") == 1
        # a new connection resolves again, and the expired answer is refreshed
        assert await get() == "127.0.0.2"
        assert dns_server.count("backend.test") == 2
