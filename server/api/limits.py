"""Request body limit as pure ASGI middleware: 413 before the body is read into memory."""

from __future__ import annotations

import json

from server.api.openai import errors as openai_errors
from server.api.tgi import errors as tgi_errors
from server.errors import PayloadTooLarge


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
        error = PayloadTooLarge(f"request body over {self.max_bytes} bytes")
        shape = (
            openai_errors if scope.get("path", "").startswith("/v1/") else tgi_errors
        )  # OpenAI's SDKs read error.message
        body = json.dumps(shape.error_body(error)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
