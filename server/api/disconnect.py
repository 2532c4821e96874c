"""Blocking answers that stop working for a client that went away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from server.errors import ClientGone

T = TypeVar("T")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await a blocking generation, cancelled if the client goes away first: the engine then drops the
    row within a step, instead of holding a slot to generate for nobody (e.g. after a client timeout)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # its cleanup releases the adapter
    if task.cancelled():
        raise ClientGone("the client disconnected; the generation was stopped")
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns once the client has disconnected (the body is already read: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
