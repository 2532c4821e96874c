"""The browser playground: one self-contained page (no CDN; the server may run offline).

The page talks to the public API with relative URLs only, so it also works behind a path prefix.
It is static: no server data is rendered into it, and its Content-Security-Policy lets only its own
inline script run and only this server be fetched.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse

router = APIRouter(tags=["playground"])


@router.get("/playground", response_class=HTMLResponse, summary="The browser playground (one self-contained page)")
async def playground() -> HTMLResponse:
    html, policy = _page()
    return HTMLResponse(
        html,
        headers={
            "Content-Security-Policy": policy,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        },
    )


@router.get(
    "/",
    response_class=RedirectResponse,
    status_code=307,
    response_description="Redirect to /playground",
    summary="Browsers: redirect to the playground (POST / is TGI's compatibility route)",
)
async def root() -> RedirectResponse:
    # Relative, so a server mounted under a path prefix redirects within it.
    return RedirectResponse("playground", status_code=307)


@cache
def _page() -> tuple[str, str]:
    html = (files("server") / "static" / "playground.html").read_text(encoding="utf-8")
    return html, _content_security_policy(html)


def _content_security_policy(html: str) -> str:
    """Only the page's own inline scripts (by hash) run; fetches go to this origin only."""
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    return (
        "default-src 'none'; "
        f"script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
