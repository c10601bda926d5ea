"""The admin status page: one self-contained HTML file that renders ``/status`` every 2 s.

The page (``gateway/static/status.html``) has no external assets: its CSS and JavaScript are
inline, and a Content-Security-Policy allows exactly those two blocks (by SHA-256 hash) plus
``fetch`` to this origin, so nothing else can run or load even if a value slipped through
(the script writes values with ``textContent``, never ``innerHTML``).

Auth: the page itself holds no data, so it is served without a token; the data route
``/status`` behind it keeps the admin token. The operator hands the token over once in the URL
fragment (``http://127.0.0.1:9901/#token=...``): a fragment never reaches any server, so it
is not in access logs or a Referer; the script moves it to ``sessionStorage`` (this tab only,
gone when the tab closes), strips it from the address bar, and sends it as
``Authorization: Bearer`` on each fetch. Without a token, a 401 from ``/status`` shows a
password field instead.

The file is read once, at import, so serving it does no file I/O on the loop.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from aiohttp import web

__all__ = ["CONTENT_SECURITY_POLICY", "STATUS_PAGE", "status_page"]


def _load() -> bytes:
    return resources.files("gateway").joinpath("static/status.html").read_bytes()


def _csp_hash(block: bytes) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(block).digest()).decode() + "'"


def _policy(page: bytes) -> str:
    scripts = re.findall(rb"<script>(.*?)</script>", page, re.S)
    styles = re.findall(rb"<style>(.*?)</style>", page, re.S)
    if len(scripts) != 1 or len(styles) != 1:  # a page edit that would silently break the CSP
        raise RuntimeError("status.html must hold exactly one <script> and one <style> block")
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {_csp_hash(scripts[0])}",
            f"style-src {_csp_hash(styles[0])}",
            "connect-src 'self'",
            "img-src 'self'",  # the browser's favicon request: answered 404, never loaded
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


STATUS_PAGE = _load()
CONTENT_SECURITY_POLICY = _policy(STATUS_PAGE)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


async def status_page(request: web.Request) -> web.Response:
    """Answer ``GET /`` on the admin listener with the status page (no token needed).

    Returns:
        200 ``text/html`` with a Content-Security-Policy that allows only the page's own
        inline script and style and ``fetch`` to this origin.
    """
    return web.Response(
        body=STATUS_PAGE, content_type="text/html", charset="utf-8", headers=_HEADERS
    )
