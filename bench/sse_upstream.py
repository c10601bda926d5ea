"""A slow token stream for bench/perf.py's ``sse`` scenario: OpenAI-shaped SSE, on a clock.

``python bench/sse_upstream.py --ttft-ms 20 --interval-ms 10 --chunks 30 [--port 0]``
answers any POST with ``text/event-stream``: headers at once, the first
``chat.completion.chunk`` ``--ttft-ms`` after the request body arrived, then one every
``--interval-ms`` (on an absolute schedule, so timer jitter does not accumulate), a last
chunk with ``finish_reason`` and ``usage``, and ``data: [DONE]``. Each chunk carries
``"bench_sent"``: this process's ``time.monotonic()`` when it was written. CLOCK_MONOTONIC is
system-wide, so a client on the same machine gets each chunk's delivery delay from it: a
proxy that buffers shows up as chunks held back. Prints ``sse-upstream listening on
http://HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import uvloop
from aiohttp import web


def chunk(i: int, *, last: bool = False, tokens: int = 0) -> bytes:
    event: dict[str, object] = {
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
        "model": "geogate-chat", "bench_sent": time.monotonic(),
        "choices": [{"index": 0, "delta": {} if last else {"content": f"tok{i} "},
                     "finish_reason": "stop" if last else None}],
    }  # fmt: skip
    if last:
        event["usage"] = {"prompt_tokens": 12, "completion_tokens": tokens,
                          "total_tokens": 12 + tokens}  # fmt: skip
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


async def stream(request: web.Request) -> web.StreamResponse:
    await request.read()
    cfg = request.app["cfg"]
    start = time.monotonic() + cfg.ttft_ms / 1000
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    for i in range(cfg.chunks):
        await asyncio.sleep(max(0.0, start + i * cfg.interval_ms / 1000 - time.monotonic()))
        await resp.write(chunk(i))
    await resp.write(chunk(cfg.chunks, last=True, tokens=cfg.chunks) + b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def serve(args: argparse.Namespace) -> None:
    app = web.Application()
    app["cfg"] = args
    app.router.add_route("*", "/{tail:.*}", stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    bound = runner.addresses[0]
    print(f"sse-upstream listening on http://{bound[0]}:{bound[1]}", flush=True)
    await asyncio.Event().wait()  # until SIGTERM / SIGINT ends the process


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--interval-ms", type=float, default=10.0)
    p.add_argument("--chunks", type=int, default=30)
    uvloop.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
