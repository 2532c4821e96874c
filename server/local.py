"""One generation without HTTP, for `loraserve generate`: the same state, engine, templates and
adapter checks the server uses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from server.engine.events import FinalEvent
from server.service import GenerationRequest
from server.settings import ServerSettings
from server.state import ServerState


async def generate_once(
    *,
    base_model: str,
    adapter_dir: Path | None,
    instruction: str | None,
    input: str,
    prompt: str | None,
    max_new_tokens: int,
    temperature: float | None,
    seed: int | None,
    backend: str,
    write: Callable[[str], object],
) -> FinalEvent:
    from server.logs import quiet_libraries

    quiet_libraries()
    adapter_dir = adapter_dir.resolve() if adapter_dir else None
    settings = ServerSettings(
        base_model=base_model,
        backend=backend,
        max_new_tokens_cap=max(max_new_tokens, 1),
        adapter_root=adapter_dir.parent if adapter_dir else None,
        engine_process="off",  # one generation: nothing streams beside the engine, and one process starts faster
    )
    state = ServerState(settings=settings)
    state.load_model()
    state.engine.start()
    try:
        if adapter_dir:
            await state.registry.load("local", adapter_dir.name)
        req = GenerationRequest(
            inputs=prompt,
            instruction=instruction if prompt is None else None,
            input=input,
            adapter="local" if adapter_dir else None,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            do_sample=temperature not in (None, 0),
        )
        async for event in state.service.stream(state.service.prepare(req)):
            if isinstance(event, FinalEvent):
                return event
            write(event.text)
    finally:
        state.engine.stop()
