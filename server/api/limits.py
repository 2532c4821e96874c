"""Limits as pure ASGI middleware: 413 before the body is read into memory, 429 at capacity before it is read."""

from __future__ import annotations

import json

from server.api.openai import errors as openai_errors
from server.api.tgi import errors as tgi_errors
from server.engine.engine import overloaded
from server.errors import PayloadTooLarge, ServeError


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._reject(send, scope)
        seen = 0
        tripped = started = False

        async def limited_receive():
            nonlocal seen, tripped
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                tripped = True
                raise _TooLarge()
            return message

        async def guarded_send(message):
            # FastAPI turns any error while reading the body into its own 400 ("error parsing the body"),
            # so _TooLarge may never reach us: once the limit tripped, the 413 below replaces that answer.
            nonlocal started
            if tripped and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass
        if tripped and not started:
            await self._reject(send, scope)

    async def _reject(self, send, scope) -> None:
        await send_error(send, scope, PayloadTooLarge(f"request body over {self.max_bytes} bytes"))


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


async def send_error(send, scope, error: ServeError) -> None:
    """`error` in the wire format of the path (OpenAI's SDKs read error.message), as a plain response."""
    shape = openai_errors if scope.get("path", "").startswith("/v1/") else tgi_errors
    body = json.dumps(shape.error_body(error)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
