"""Liveness, readiness, model info and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.deps import State, check_api_key
from server.api.tgi.errors import declared
from server.errors import ServeError, Unavailable

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness: the process answers")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", responses=declared(503), summary="Readiness: model loaded and not draining")
async def ready(state: State) -> dict:
    if state.draining:
        raise Unavailable("draining")
    if not state.ready:
        raise Unavailable(state.load_error or "loading", headers={"Retry-After": "5"})
    return {"status": "ready"}


# Load balancers and uptime checkers probe with HEAD (RFC 9110: wherever GET is). Not in the spec twice.
for _path, _probe in (("/health", health), ("/ready", ready)):
    router.add_api_route(_path, _probe, methods=["HEAD"], include_in_schema=False)


@router.get("/info", summary="Base model and limits (and the adapters, to callers who may list them)")
async def info(state: State, request: Request) -> dict:
    s, facts = state.settings, state.facts
    out = {
        "model_id": s.public_base_name,
        "backend": facts.backend if facts else None,
        "fingerprint": state.fingerprint,
        "max_context": state.max_context,
        "max_new_tokens_cap": s.max_new_tokens_cap,
        "max_running": s.max_running,
        "kv_slots": facts.kv_slots if facts else None,
        "adapter_slots": s.adapter_slots,
        "cuda_graphs": bool(facts and facts.cuda_graphs),
    }
    if _may_list_adapters(request):  # /info stays open for probes; adapter names are for key holders only
        out["adapters"] = state.registry.names() if state.registry else []
    return out


def _may_list_adapters(request: Request) -> bool:
    try:
        check_api_key(request)
    except ServeError:
        return False
    return True


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics",
)
async def metrics(state: State) -> Response:
    engine = state.engine
    if engine is not None and state.registry is not None:  # loaded
        await state.refresh_engine_numbers()
        state.metrics.queue_depth.set(engine.stats.waiting)
        state.metrics.running.set(engine.stats.running)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
