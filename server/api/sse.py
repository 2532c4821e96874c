"""Server-sent events as the OpenAI and vLLM servers send them."""

from __future__ import annotations

from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse


def event_stream(events: AsyncIterator[dict], *, ping: float) -> EventSourceResponse:
    """Events end in a blank line of plain `\\n`: sse-starlette's default `\\r\\n` is valid SSE, but clients
    that split a read on `\\n\\n` (vLLM's benchmark client, many hand-written ones) lose every event of a
    read that holds several."""
    return EventSourceResponse(events, ping=ping, sep="\n")
