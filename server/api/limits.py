"""Request body limits as pure ASGI middleware: its size (413 before it is read into memory) and the time
it may take to arrive (408: a client that stops sending mid-body would otherwise hold its connection
and request open for ever)."""

from __future__ import annotations

import asyncio
import json

from server.api.openai import errors as openai_errors
from server.api.tgi import errors as tgi_errors
from server.errors import PayloadTooLarge, RequestTimeout, ServeError


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
        shape = (
            openai_errors if scope.get("path", "").startswith("/v1/") else tgi_errors
        )  # OpenAI's SDKs read error.message
        body = json.dumps(shape.error_body(error)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if error.status == 408:  # the connection may hold the rest of a body: never read it as a next request
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _Refused(Exception):
    pass
