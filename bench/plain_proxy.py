"""A plain aiohttp + uvloop reverse proxy, written only for comparison (bench/perf.py's
``plain-aiohttp`` target): what forwarding alone costs in aiohttp, with none of GeoGate's work.

``python bench/plain_proxy.py --upstream http://127.0.0.1:PORT [--port 0]`` forwards every
request to the upstream over one shared ``ClientSession`` (keep-alive pool), drops hop-by-hop
headers both ways and streams the answer back chunk by chunk (SSE passes unbuffered). It
prints ``plain-proxy listening on http://HOST:PORT`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
import uvloop
from aiohttp import web

HOP = frozenset(
    ["connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade", "host", "content-length"]
)  # fmt: skip


async def forward(request: web.Request) -> web.StreamResponse:
    session: aiohttp.ClientSession = request.app["session"]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    body = await request.read()
    url = request.app["upstream"] + request.path_qs
    async with session.request(
        request.method, url, headers=headers, data=body or None, allow_redirects=False
    ) as up:
        out = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=out)
        if up.content_length is not None:
            resp.content_length = up.content_length
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def serve(upstream: str, host: str, port: int) -> None:
    app = web.Application()
    app["upstream"] = upstream.rstrip("/")
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    app["session"] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    print(f"plain-proxy listening on http://{bound[0]}:{bound[1]}", flush=True)
    try:
        await asyncio.Event().wait()  # until SIGTERM / SIGINT ends the process
    finally:
        await app["session"].close()
        await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    uvloop.run(serve(args.upstream, args.host, args.port))


if __name__ == "__main__":
    main()
