"""One HTTP request carried from the ingress to a replica, and run there through the single server's
own ASGI app: the replica answers exactly what `loraserve serve` answers, byte for byte.

Plain Python (no web framework, no Ray): the request is a picklable dataclass, the answer a stream of
ASGI messages (`http.response.start`, then `http.response.body` chunks), which Ray streams back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("loraserve.cluster")

# The routes whose body names an adapter, and where: the native ones `adapter` / `parameters.adapter_id`,
# the OpenAI ones `model` (the base model's id meaning no adapter).
NATIVE_ROUTES = ("/generate", "/generate_stream", "/")
OPENAI_ROUTES = ("/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class AdapterView:
    """What the catalog says of the adapter a request names: loaded at `generation` from `path`, or,
    with both None, not served by the cluster (a replica still holding it drops it first)."""

    name: str
    generation: int | None = None
    path: str | None = None


@dataclass
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    adapter: AdapterView | None = None
    admin_load: AdapterView | None = None  # an admin load: the generation it publishes if it succeeds
    client: tuple[str, int] | None = None

    def scope(self) -> dict:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": self.query_string,
            "headers": self.headers,
            "client": self.client,
            "server": None,
            "state": {},
        }


def requested_adapter(path: str, body: bytes, *, base_name: str) -> str | None:
    """The adapter a generation request names, read as the routes read it; None for anything else (a
    body that does not parse reaches a replica all the same, which answers the error a server would)."""
    if path not in NATIVE_ROUTES + OPENAI_ROUTES:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if path in OPENAI_ROUTES:
        model = data.get("model")
        return model if isinstance(model, str) and model and model != base_name else None
    parameters = data.get("parameters")
    adapter = data.get("adapter") or (parameters.get("adapter_id") if isinstance(parameters, dict) else None)
    return adapter if isinstance(adapter, str) and adapter else None


async def call_app(
    app: Callable[..., Awaitable[None]], request: ForwardedRequest, *, headers: list[tuple[bytes, bytes]] = ()
) -> AsyncIterator[dict]:
    """Run `app` on `request`; yield its ASGI messages as it sends them, `headers` added to the start.

    When the consumer stops early (its client went away, Ray cancelled the call), the app is told the
    client disconnected, as uvicorn would tell it, and its generation stops within a step."""
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *headers]}
        await messages.put(message)

    task = asyncio.ensure_future(app(request.scope(), receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            yield message
    finally:
        gone.set()
        await _finish(task)


async def _finish(task: asyncio.Future, grace: float = 5.0) -> None:
    """Let the app wind down after a disconnect (its finally blocks free the KV slot), then cancel it."""
    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(task), grace)
    if not task.done():
        task.cancel()
    elif not task.cancelled() and task.exception() is not None:  # already answered (a 500), as uvicorn logs it
        log.error("the app raised after answering", exc_info=task.exception())
