"""Limits as pure ASGI middleware: a request body's size (413 before it is read into memory), the time it may
take to arrive (408: a client that stops sending mid-body would otherwise hold its connection and request
open for ever), and capacity (429 before the body is read)."""

from __future__ import annotations

import asyncio
import json

from server.api.openai import errors as openai_errors
from server.api.tgi import errors as tgi_errors
from server.engine.engine import overloaded
from server.errors import PayloadTooLarge, RequestTimeout, ServeError


def limit_bodies(app, settings) -> None:
    """The body limits of ServerSettings on `app` (the server's and the cluster ingress's alike)."""
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_seconds=settings.body_timeout_seconds
    )


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int, timeout_seconds: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_seconds = timeout_seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._reject(send, scope, self._too_large())
        seen = 0
        refusal: ServeError | None = None
        started = body_done = False

        async def limited_receive():
            nonlocal seen, refusal, body_done
            if body_done:  # after the body only a disconnect can arrive: waiting for it is unbounded
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_seconds)
            except asyncio.TimeoutError:
                refusal = RequestTimeout(f"the request body did not arrive within {self.timeout_seconds:g} s")
                raise _Refused() from None
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                refusal = self._too_large()
                raise _Refused()
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def guarded_send(message):
            # FastAPI turns any error while reading the body into its own 400 ("error parsing the body"),
            # so _Refused may never reach us: once a limit tripped, the answer below replaces that one.
            nonlocal started
            if refusal is not None and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _Refused:
            pass
        if refusal is not None and not started:
            await self._reject(send, scope, refusal)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body over {self.max_bytes} bytes")

    async def _reject(self, send, scope, error: ServeError) -> None:
        # A 408's connection may hold the rest of a body: never read it as a next request.
        await send_error(send, scope, error, close=error.status == 408)


# The routes that admit generations (their templates: none has a path parameter).
GENERATION_ROUTES = frozenset({"/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions"})


class ShedWhenFullMiddleware:
    """At capacity, a generation request gets its 429 before its body is read, parsed or tokenized: under
    overload refusals are most of the traffic, and each one takes CPU from the admitted requests' steps."""

    def __init__(self, app, state) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        engine = self.state.engine
        shed = scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in GENERATION_ROUTES
        if shed and engine is not None and engine.full:
            scope["loraserve_route"] = scope["path"]  # for the request metrics: no route matched yet
            return await send_error(send, scope, overloaded())
        return await self.app(scope, receive, send)


async def send_error(send, scope, error: ServeError, *, close: bool = False) -> None:
    """`error` in the wire format of the path (OpenAI's SDKs read error.message), as a plain response."""
    shape = openai_errors if scope.get("path", "").startswith("/v1/") else tgi_errors
    body = json.dumps(shape.error_body(error)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Refused(Exception):
    pass
