"""Several generations for one request (OpenAI's `n`), run side by side through the service.

Each choice prepares, is admitted and streams inside its own task, so stopping the lot at any moment
leaves nothing behind: a task cancelled before it ran never pinned an adapter nor took an engine slot,
and one cancelled later unwinds through the service's own cleanup (adapter released, row dropped).
All choices are admitted in one event-loop turn, so the engine batches them together.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from server.engine.events import FinalEvent, TokenEvent
from server.service import GenerationRequest, GenerationService, Prepared

Event = TokenEvent | FinalEvent


class Choices:
    def __init__(self, service: GenerationService, requests: list[GenerationRequest]) -> None:
        self.service = service
        self.n = len(requests)
        self.preps: list[Prepared | None] = [None] * self.n
        self._queue: asyncio.Queue[tuple[int, Event | Exception]] = asyncio.Queue()
        self._early: list[tuple[int, Event]] = []  # read by `start`, handed out first by `events`
        self._tasks = [asyncio.create_task(self._run(i, req)) for i, req in enumerate(requests)]

    async def _run(self, index: int, req: GenerationRequest) -> None:
        try:
            self.preps[index] = self.service.prepare(req)
            async for event in self.service.stream(self.preps[index]):
                self._queue.put_nowait((index, event))
        except Exception as exc:  # handed to the reader, which raises it
            self._queue.put_nowait((index, exc))

    async def start(self) -> None:
        """Wait until every choice has its first token, so that errors up to then (invalid parameters,
        unknown model, capacity) reach the caller before it answers. On an error, stops all, raises it."""
        started: set[int] = set()
        try:
            while len(started) < self.n:
                index, event = await self._next()
                self._early.append((index, event))
                started.add(index)
        except BaseException:
            await self.close()
            raise

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) in arrival order until every choice has its FinalEvent; raises the
        first error. Every choice's events keep their own order."""
        running = self.n
        while running:
            index, event = self._early.pop(0) if self._early else await self._next()
            running -= isinstance(event, FinalEvent)
            yield index, event

    async def finals(self) -> list[FinalEvent]:
        """Blocking: every choice's FinalEvent, in choice order; always stops the tasks."""
        finals: list[FinalEvent | None] = [None] * self.n
        try:
            async for index, event in self.events():
                if isinstance(event, FinalEvent):
                    finals[index] = event
        finally:
            await self.close()
        return finals

    async def close(self) -> None:
        """Stop every choice still running (idempotent)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _next(self) -> tuple[int, Event]:
        index, event = await self._queue.get()
        if isinstance(event, Exception):
            raise event
        return index, event
