"""A replica's answer, replayed to the client as the replica sent it; a replica lost mid-answer ends a
stream with the wire format's in-band error event, as a single server ends one that fails."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import contextmanager

from fastapi.responses import JSONResponse
from starlette.responses import Response

from server.api.openai import errors as openai_errors
from server.api.tgi import errors as tgi_errors
from server.errors import ServeError, Unavailable

log = logging.getLogger("loraserve.cluster")
LOST = "the replica serving this request stopped before answering it (Ray restarts it); retry the request"
LOST_MIDWAY = "the replica serving this request stopped midway (Ray restarts it); retry the request"


def wire_format(path: str):
    return openai_errors if path.startswith("/v1/") else tgi_errors


def error_response(path: str, exc: Exception) -> JSONResponse:
    return wire_format(path).error_response(None, exc)


@contextmanager
def _told_as(failure: Callable[[Exception], ServeError]):
    """While nothing is sent to the client: a forwarding failure becomes a plain HTTP error, the one the
    cluster names for it (`failure`: 429 for a full queue, 503 for a lost replica)."""
    try:
        yield
    except ServeError:
        raise
    except Exception as exc:
        error = failure(exc)
        if error.status != 429:  # a refusal under overload is routine; a lost replica is worth a line
            log.warning("forwarding failed before the answer began (%d): %r", error.status, exc)
        raise error from exc


async def first_message(messages: AsyncIterator[dict], failure: Callable[[Exception], ServeError]) -> dict:
    """The replica's `http.response.start`."""
    with _told_as(failure):
        return await anext(messages)


class ForwardedResponse(Response):
    def __init__(self, start: dict, rest: AsyncIterator[dict], *, path: str) -> None:
        self.start, self.rest, self.path = start, rest, path
        self.status_code = start["status"]
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        await send(self.start)
        try:
            async for message in self.rest:
                await send(message)
        except Exception:  # mid-answer: the status is sent, so only a stream can still say why
            if not self._is_stream():
                raise
            error = Unavailable(LOST_MIDWAY)
            event = f"data: {json.dumps(wire_format(self.path).error_body(error))}\n\n".encode()
            await send({"type": "http.response.body", "body": event, "more_body": False})

    def _is_stream(self) -> bool:
        headers = dict(self.start.get("headers", []))
        return headers.get(b"content-type", b"").startswith(b"text/event-stream")


async def collect(
    messages: AsyncIterator[dict], failure: Callable[[Exception], ServeError]
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """A whole non-streamed answer: status, headers, body."""
    start = await first_message(messages, failure)
    with _told_as(failure):  # nothing is sent yet: the client still gets a plain HTTP error
        body = b"".join([m.get("body", b"") async for m in messages])
    return start["status"], list(start.get("headers", [])), body


def replay(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
    response = Response(body, status_code=status)
    response.raw_headers = [(k, v) for k, v in headers if k.lower() != b"content-length"] + [
        (b"content-length", str(len(body)).encode())
    ]
    return response
