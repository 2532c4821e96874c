"""OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions.

`model` names a loaded adapter, or the base model by its id. Generation goes through the same service
as the native API, one request per choice (server.choices); only the wire format differs here.
Errors take OpenAI's shape (server.api.openai.errors); API keys are the native routes' keys.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from server.api.deps import ReadyState, require_api_key
from server.api.disconnect import unless_disconnected
from server.api.errors import as_serve_error
from server.api.openai.errors import OpenAIRoute, declared, error_body
from server.api.openai.format import ChatFormatter, CompletionFormatter
from server.api.openai.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from server.api.sse import event_stream
from server.choices import Choices
from server.engine.events import FinalEvent
from server.errors import NotFound
from server.service import GenerationRequest

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)], route_class=OpenAIRoute)
access_log = logging.getLogger("loraserve.access")
STREAMED = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "JSON, or with `stream: true` SSE chunks ending with `data: [DONE]`",
    }
}
GENERATION_ERRORS = declared(400, 401, 404, 408, 413, 429, 500, 503)
Formatter = CompletionFormatter | ChatFormatter


@router.get(
    "/models", response_model=ModelList, responses=declared(401, 503), summary="The base model and every loaded adapter"
)
async def list_models(state: ReadyState) -> ModelList:
    return ModelList(data=_models(state))


@router.get("/models/{model:path}", response_model=ModelCard, responses=declared(401, 404, 503), summary="One model")
async def get_model(model: str, state: ReadyState) -> ModelCard:
    for card in _models(state):
        if card.id == model:
            return card
    raise unknown_model(model)


@router.post(
    "/completions", response_model=Completion, responses=STREAMED | GENERATION_ERRORS, summary="Complete a raw prompt"
)
async def completions(body: CompletionRequest, state: ReadyState, request: Request):
    body.check()
    requests = body.generations(adapter=_adapter_for(state, body.model), inputs=body.prompt_text())
    formatter = CompletionFormatter(body.model, logprobs=body.logprobs is not None)
    return await _answer(state, request, body, requests, formatter)


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses=STREAMED | GENERATION_ERRORS,
    summary="Answer a conversation (rendered with the model's template)",
)
async def chat_completions(body: ChatCompletionRequest, state: ReadyState, request: Request):
    body.check()
    requests = body.generations(adapter=_adapter_for(state, body.model), messages=body.chat_messages())
    formatter = ChatFormatter(body.model, logprobs=bool(body.logprobs))
    return await _answer(state, request, body, requests, formatter)


def _models(state) -> list[ModelCard]:
    registry = state.registry
    adapters = [registry.get(name) for name in registry.names()]  # no await: nothing unloads in between
    return model_cards(state.settings.public_base_name, state.loaded_at, [(a.name, a.loaded_at) for a in adapters])


def model_cards(base: str, base_loaded_at: float, adapters: list[tuple[str, float]]) -> list[ModelCard]:
    """/v1/models: the base model first, then each adapter (name, load time); a cluster lists its catalog."""
    # An adapter named like the base model is unreachable through /v1 (the base wins), so not listed.
    return [
        ModelCard(id=base, created=int(base_loaded_at)),
        *(ModelCard(id=name, created=int(at), parent=base) for name, at in adapters if name != base),
    ]


def _adapter_for(state, model: str) -> str | None:
    if model == state.settings.public_base_name:
        return None
    if model not in state.registry.names():  # checked again when the adapter is pinned (it may unload)
        raise unknown_model(model)
    return model


def unknown_model(model: str) -> NotFound:
    return NotFound(f"the model {model!r} does not exist; GET /v1/models lists the models", param="model")


async def _answer(state, request: Request, body, requests: list[GenerationRequest], formatter: Formatter):
    request.state.adapter = requests[0].adapter or "base"  # the metrics label
    choices = Choices(state.service, requests)
    started = time.monotonic()
    if body.stream:
        # Every choice's first token before answering: errors up to then are plain HTTP errors, and a
        # client gone meanwhile gives its place up at once (start() stops every choice when cancelled).
        await unless_disconnected(request, choices.start())
        formatter.fingerprint = choices.preps[0].adapter_version
        return event_stream(
            _sse(formatter, choices, include_usage=body.include_usage, route=request.url.path, started=started),
            ping=state.settings.sse_ping_seconds,
        )
    finals = await unless_disconnected(request, choices.finals())
    formatter.fingerprint = choices.preps[0].adapter_version
    _log(request.url.path, requests[0].adapter, finals, started)
    return formatter.response(finals)


async def _sse(
    formatter: Formatter, choices: Choices, *, include_usage: bool, route: str, started: float
) -> AsyncIterator[dict]:
    finals: list[FinalEvent] = []
    try:
        async for chunk in _chunks(formatter, choices, finals):
            yield {"data": chunk.model_dump_json()}
        if include_usage:
            yield {"data": formatter.usage_chunk(finals).model_dump_json()}
        yield {"data": "[DONE]"}
        _log(route, choices.preps[0].adapter_name, finals, started)
    except Exception as exc:  # after the first byte, errors travel in-band, then the stream ends
        yield {"data": json.dumps(error_body(as_serve_error(exc)))}
    finally:
        await choices.close()


async def _chunks(formatter: Formatter, choices: Choices, finals: list[FinalEvent]) -> AsyncIterator[BaseModel]:
    """Each choice's opening chunk, then one per token that has something to say, and its closing chunk."""
    for index in range(choices.n):
        if (chunk := formatter.opening(index)) is not None:
            yield chunk
    async for index, event in choices.events():
        if isinstance(event, FinalEvent):
            finals.append(event)
            yield formatter.closing(index, event)
        elif (chunk := formatter.delta(index, event)) is not None:
            yield chunk


def _log(route: str, adapter: str | None, finals: list[FinalEvent], started: float) -> None:
    access_log.info(
        json.dumps(
            {
                "route": route,
                "adapter": adapter or "base",
                "choices": len(finals),
                "prompt_tokens": finals[0].prompt_tokens if finals else 0,
                "generated_tokens": sum(f.generated_tokens for f in finals),
                "finish_reasons": sorted({f.finish_reason for f in finals}),
                "total_s": round(time.monotonic() - started, 4),
            }
        )
    )
