"""The proxy listener's parts that outlive one request: sockets, TLS, readiness probes.

* ``bind_reuseport``: the listening sockets of ``--workers N``. The supervisor binds one
  socket per worker slot, all on the same address with ``SO_REUSEPORT``, and keeps them open
  for its whole life. Why one socket per slot and not one per worker process: Linux hashes
  each new connection to one socket of the group, and a socket closed while connections wait
  in its accept queue resets them (``net.ipv4.tcp_migrate_req`` moves them instead, but it
  is 0 by default). A replaced worker closes only its copy of the slot's socket; the queue
  survives and its successor, already accepting on the same socket, takes it over.
* ``make_ssl_context``: TLS termination (RFC 8446 / RFC 5246; TLS 1.0 and 1.1 are deprecated
  by RFC 8996), ALPN ``http/1.1`` (RFC 7301).
* ``probe_middleware``: ``GET /ready`` and ``GET /live`` on the admin listener, without the
  admin token, as Kubernetes probes and load balancers expect.

Rule: nothing here reads a request body or touches an upstream.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.config import TlsConfig

__all__ = ["PROBE_PATHS", "bind_reuseport", "make_ssl_context", "probe_middleware"]

PROBE_PATHS = frozenset({"/ready", "/live"})

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bind_reuseport(host: str, port: int, count: int, *, backlog: int = 1024) -> list[socket.socket]:
    """Bind and listen ``count`` TCP sockets on one address with ``SO_REUSEPORT``.

    Args:
        host: an IPv4 or IPv6 literal or a name; the first address ``getaddrinfo`` gives is used.
        port: the port; 0 lets the kernel choose one for the first socket, and the others then
            join that port.
        count: how many sockets (one per worker slot), >= 1.
        backlog: the accept queue length of each socket (capped by ``net.core.somaxconn``).

    Returns:
        The listening sockets, non-blocking and not inheritable (pass them with ``pass_fds``).

    Raises:
        OSError: the address is taken by a socket without ``SO_REUSEPORT`` or of another user
            (EADDRINUSE), or is not ours (EADDRNOTAVAIL).
    """
    family, _, _, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            addr = sock.getsockname()  # port 0: the others join the port the kernel chose
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def make_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server-side TLS context for the proxy listener.

    Python's defaults for ``Purpose.CLIENT_AUTH`` (secure ciphers, no compression, no
    renegotiation) plus: minimum TLS 1.2 (RFC 8996), ALPN offering only ``http/1.1`` (the
    listener speaks HTTP/1.1; RFC 7301 §3.2), no client certificate asked.

    Args:
        tls: the ``gateway.tls`` section (paths already resolved and checked at load).

    Returns:
        The context, for ``web.TCPSite`` / ``web.SockSite``.

    Raises:
        ssl.SSLError: the key does not match the certificate, or a file is not PEM.
        OSError: a file cannot be read (it was readable when the config was loaded).
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(tls.cert, tls.key)
    return ctx


def probe_middleware(is_ready: Callable[[], bool]) -> Middleware:
    """An aiohttp middleware answering the readiness and liveness probes itself.

    Put it first in the admin application's middleware list so it answers before the token
    check: probes carry no credentials. ``GET /live`` is 200 while the process can answer at
    all; ``GET /ready`` is 200 while ``is_ready()`` holds and 503 otherwise (starting, or
    draining after SIGTERM: phase 1 of the drain fails it first, so a load balancer stops
    sending before the listener closes). Both answer ``text/plain`` with ``ready``, ``live``
    or ``not ready`` and ``Cache-Control: no-store``.

    Args:
        is_ready: called on every ``/ready``; cheap and synchronous.

    Returns:
        The middleware; other paths pass through untouched.
    """

    @web.middleware
    async def probes(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.path not in PROBE_PATHS or request.method not in ("GET", "HEAD"):
            return await handler(request)
        if request.path == "/live":
            status, text = 200, "live"
        elif is_ready():
            status, text = 200, "ready"
        else:
            status, text = 503, "not ready"
        return web.Response(status=status, text=text + "\n", headers={"Cache-Control": "no-store"})

    return probes
