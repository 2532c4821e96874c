"""Native generation API in TGI / LoRAX's wire format: /generate, /generate_stream and POST /."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse

from server.api.deps import ReadyState, require_api_key
from server.api.disconnect import unless_disconnected
from server.api.sse import event_stream
from server.api.tgi.errors import declared, error_body
from server.api.tgi.schemas import Details, GenerateRequest, GenerateResponse, StreamDetails, StreamResponse, Token
from server.engine.events import FinalEvent, TokenEvent
from server.errors import Invalid, ServeError
from server.service import Prepared

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["generate"])
ERRORS = declared(400, 401, 404, 408, 413, 422, 429, 500, 503)
STREAMED = {200: {"content": {"text/event-stream": {}}, "description": "One event per token"}}
access_log = logging.getLogger("loraserve.access")


def _prepare(state, body: GenerateRequest, request: Request) -> Prepared:
    unsupported = body.parameters.unsupported()
    if unsupported:
        raise Invalid(f"parameters not supported by this server: {', '.join(unsupported)}", param=unsupported[0])
    prep = state.service.prepare(body.to_generation())
    request.state.adapter = prep.adapter_label
    return prep


@router.post(
    "/generate",
    response_model=GenerateResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
    summary="Generate text (blocking)",
)
async def generate(body: GenerateRequest, state: ReadyState, request: Request) -> GenerateResponse:
    prep = _prepare(state, body, request)
    started = time.monotonic()
    final = await unless_disconnected(request, state.service.complete(prep))
    _log(prep, final, started, route="/generate")
    details = _details(prep, final, tokens=True) if body.parameters.details else None
    return GenerateResponse(generated_text=final.generated_text, details=details)


@router.post(
    "/generate_stream",
    summary="Generate text as server-sent events",
    responses=STREAMED | ERRORS,
)
async def generate_stream(body: GenerateRequest, state: ReadyState, request: Request) -> EventSourceResponse:
    prep = _prepare(state, body, request)
    events = state.service.stream(prep)
    # Wait for the first token before answering, so every error up to then (capacity, prefill) is a
    # plain HTTP error rather than an event in a 200 stream; a client gone meanwhile (say, while queued)
    # gives its place up at once instead of being prefilled for nobody.
    try:
        first = await unless_disconnected(request, anext(events))
    except BaseException:
        await events.aclose()
        raise
    return event_stream(_sse(prep, first, events), ping=state.settings.sse_ping_seconds)


@router.post("/", responses=STREAMED | ERRORS, summary="TGI compatibility route: dispatches on `stream`")
async def compat(body: GenerateRequest, state: ReadyState, request: Request):
    if body.stream:
        return await generate_stream(body, state, request)
    # Serialized like /generate (response_model_exclude_none): TGI omits absent fields, it never sends nulls.
    return [(await generate(body, state, request)).model_dump(exclude_none=True)]


async def _sse(prep: Prepared, first: TokenEvent, events: AsyncIterator) -> AsyncIterator[dict]:
    """One event per token, sent as soon as it is generated. TGI puts the full text and details on the
    last token's event: the engine marks that token, and queues the FinalEvent right behind it."""
    started = time.monotonic()
    token = first
    try:
        while not token.last:
            yield {"data": _stream_chunk(prep, token, final=None)}
            token = await anext(events)
        final = await anext(events)
        yield {"data": _stream_chunk(prep, token, final=final)}
        _log(prep, final, started, route="/generate_stream")
    except ServeError as exc:  # after the first byte, errors travel in-band, then the stream ends
        yield {"data": json.dumps(error_body(exc))}
    finally:
        await events.aclose()


def _stream_chunk(prep: Prepared, token: TokenEvent, final: FinalEvent | None) -> str:
    chunk = StreamResponse(
        token=Token(id=token.id, text=token.text, logprob=token.logprob, special=token.special),
        generated_text=final.generated_text if final else None,
        details=StreamDetails(**_detail_fields(prep, final)) if final else None,
    )
    return chunk.model_dump_json()


def _detail_fields(prep: Prepared, final: FinalEvent) -> dict:
    return {
        "finish_reason": final.finish_reason,
        "generated_tokens": final.generated_tokens,
        "prompt_tokens": final.prompt_tokens,
        "seed": final.seed,
        "adapter": prep.adapter_name,
        "adapter_version": prep.adapter_version,
    }


def _details(prep: Prepared, final: FinalEvent, *, tokens: bool) -> Details:
    listed = [Token(id=t.id, text=t.text, logprob=t.logprob, special=t.special) for t in final.tokens] if tokens else []
    return Details(**_detail_fields(prep, final), tokens=listed)


def _log(prep: Prepared, final: FinalEvent, started: float, *, route: str) -> None:
    access_log.info(
        json.dumps(
            {
                "route": route,
                "adapter": prep.adapter_label,
                "version": prep.adapter_version,
                "prompt_tokens": final.prompt_tokens,
                "generated_tokens": final.generated_tokens,
                "finish_reason": final.finish_reason,
                "ttft_s": round(final.first_token_seconds, 4),
                "total_s": round(final.total_seconds, 4),
            }
        )
    )
