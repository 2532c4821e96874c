"""Liveness, readiness, model info and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.deps import State
from server.errors import Unavailable

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness: the process answers")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: model loaded and not draining")
async def ready(state: State) -> dict:
    if state.draining:
        raise Unavailable("draining")
    if not state.ready:
        raise Unavailable(state.load_error or "loading", headers={"Retry-After": "5"})
    return {"status": "ready"}


@router.get("/info", summary="Base model and limits")
async def info(state: State) -> dict:
    s = state.settings
    return {
        "model_id": s.public_base_name, "backend": state.runner.backend if state.runner else None,
        "fingerprint": state.fingerprint, "max_context": state.max_context,
        "max_new_tokens_cap": s.max_new_tokens_cap, "max_running": s.max_running,
        "kv_slots": state.runner.cache.slots if state.runner else None,
        "adapter_slots": s.adapter_slots, "cuda_graphs": bool(state.runner and state.runner.graphs),
        "adapters": state.registry.names() if state.registry else [],
    }


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(state: State) -> Response:
    engine = state.engine
    if engine is not None:
        state.metrics.queue_depth.set(engine.stats.waiting)
        state.metrics.running.set(engine.stats.running)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
