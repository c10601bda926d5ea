"""The CLI: ``python -m backend`` as a real process, and ``main()``'s exit statuses."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from backend.server import main
from backend.sse import SSEDecoder

__all__: list[str] = []

READY_LINE = re.compile(r"^backend (?P<region>\S+) listening on (?P<url>http://127\.0\.0\.1:\d+)$")
START_TIMEOUT = 20.0  # seconds: a cold interpreter imports LangChain
REPO_ROOT = Path(__file__).resolve().parents[2]


class Backend:
    """A ``python -m backend`` child process and the URL from its ready line."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str) -> None:
        self.proc, self.url = proc, url

    async def stop(self, sig: signal.Signals) -> int:
        self.proc.send_signal(sig)
        async with asyncio.timeout(10):
            return await self.proc.wait()


async def _start(*args: str) -> Backend:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "backend",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(START_TIMEOUT):
            line = (await proc.stdout.readline()).decode().strip()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    match = READY_LINE.match(line)
    assert match, f"unexpected ready line {line!r}"
    return Backend(proc, match["url"])


@pytest.fixture
async def backend_process() -> AsyncIterator[Backend]:
    backend = await _start(
        "--region",
        "eu-west-1",
        "--zones",
        "eu,global",
        "--ttft-ms",
        "20",
        "--tokens-per-second",
        "100",
    )
    yield backend
    if backend.proc.returncode is None:
        backend.proc.kill()
        await backend.proc.wait()


async def test_cli_serves_until_sigterm_and_exits_0(backend_process: Backend) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(backend_process.url + "/ready") as resp:
            assert resp.status == 200
            assert resp.headers["X-Served-Region"] == "eu-west-1"
        async with session.get(backend_process.url + "/health") as resp:
            assert resp.status == 200
        denied = await session.get(
            backend_process.url + "/ready", headers={"X-Residency-Zone": "us"}
        )
        assert denied.status == 451
    assert await backend_process.stop(signal.SIGTERM) == 0


async def test_sigterm_lets_an_in_flight_stream_finish(backend_process: Backend) -> None:
    decoder = SSEDecoder()
    events = []
    async with aiohttp.ClientSession() as session:
        body = {"input": {"question": "What are the support hours?"}}
        async with session.post(backend_process.url + "/rag/stream", json=body) as resp:
            signalled = False
            async for chunk in resp.content.iter_any():
                events.extend(decoder.feed(chunk))
                if not signalled and any(e.event == "data" for e in events):
                    backend_process.proc.send_signal(signal.SIGTERM)  # mid-answer
                    signalled = True
    assert signalled
    assert events[-1].event == "end"
    answer = "".join(orjson.loads(e.data) for e in events if e.event == "data")
    assert "Support hours in eu-west-1" in answer
    async with asyncio.timeout(10):
        assert await backend_process.proc.wait() == 0


async def test_sigint_exits_0() -> None:
    backend = await _start("--region", "ap-southeast-1")
    assert await backend.stop(signal.SIGINT) == 0


def test_unknown_region_is_exit_2_naming_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--region", "mars-north-1", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "mars-north-1") in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "1"], "--region"),
        (["--region", "eu-west-1", "--ttft-ms", "-1"], "ttft_ms"),
        (["--region", "eu-west-1", "--zones", ","], "zones"),
        (["--region", "eu-west-1", "--provider", "bogus"], "--provider"),
    ],
)
def test_bad_arguments_are_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_is_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--region", "--zones", "--ttft-ms", "--tokens-per-second", "--provider"):
        assert flag in out


@pytest.mark.skipif(
    importlib.util.find_spec("langchain_openai") is not None,
    reason="langchain-openai is installed; the missing-extra error cannot happen",
)
def test_openai_provider_without_extra_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--region", "eu-west-1", "--provider", "openai", "--openai-model", "m"]
    assert main(argv) == 2
    assert "geogate[openai]" in capsys.readouterr().err
