"""Network fixtures shared by the gateway and integration tests: a self-signed certificate for
127.0.0.1, and a port whose TCP handshakes never complete."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

__all__ = ["self_signed", "unresponsive_port"]


def self_signed(tmp: Path, stem: str = "server") -> tuple[Path, Path]:
    """A self-signed P-256 certificate for ``IP:127.0.0.1`` valid for a day, made by the
    ``openssl`` CLI.

    Returns:
        (certificate PEM path, private key PEM path), both in ``tmp``, named after ``stem``.

    Raises:
        subprocess.CalledProcessError: openssl failed.
    """
    cert, key = tmp / f"{stem}.pem", tmp / f"{stem}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@contextlib.contextmanager
def unresponsive_port() -> Iterator[int]:
    """A loopback port that accepts no new connection: a listening socket with a backlog of
    0 whose accept queue is already filled, so new handshakes never complete (for connect
    timeouts). Yields the port; closes everything on exit."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):
                s = socket.socket()
                fillers.append(s)
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
            yield port
        finally:
            for s in fillers:
                s.close()
