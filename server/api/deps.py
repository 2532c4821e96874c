"""Dependencies: the server state, API-key and admin-token checks (constant-time compares).

Each dependency is `async def` though none awaits: FastAPI runs a plain `def` dependency in its thread pool, and
three thread hand-offs per request were a fifth of the server's event-loop time under 64 streams of short
requests (py-spy, bench/results/cpu-2026-12-08-b/NOTES.md).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from server.errors import Forbidden, Unauthorized, Unavailable
from server.state import ServerState


def state_of(request: Request) -> ServerState:
    return request.app.state.loraserve


async def get_state(request: Request) -> ServerState:
    return state_of(request)


async def ready_state(request: Request) -> ServerState:
    state = state_of(request)
    if not state.ready or state.service is None:
        raise Unavailable(state.load_error or "the model is still loading", headers={"Retry-After": "5"})
    if state.draining:
        raise Unavailable("the server is shutting down")
    return state


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


async def require_api_key(request: Request) -> None:
    check_api_key(request)


def check_api_key(request: Request) -> None:
    keys = state_of(request).settings.api_keys
    if not keys:
        return
    token = _bearer(request)
    if token is None:
        raise Unauthorized(
            "missing API key: send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
        )
    # Compare against every key so the time taken does not depend on which one matched.
    if not any([_matches(token, k.get_secret_value()) for k in keys]):
        raise Unauthorized("invalid API key", headers={"WWW-Authenticate": "Bearer"})


async def require_admin(request: Request) -> None:
    configured = state_of(request).settings.admin_token
    if configured is None or not configured.get_secret_value():
        raise Forbidden("the admin API is disabled: set LORASERVE_ADMIN_TOKEN to enable it")
    token = _bearer(request)
    if token is None:
        raise Unauthorized(
            "missing admin token: send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"}
        )
    if not _matches(token, configured.get_secret_value()):
        raise Forbidden("wrong admin token")


State = Annotated[ServerState, Depends(get_state)]
ReadyState = Annotated[ServerState, Depends(ready_state)]
