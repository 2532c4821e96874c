"""Adapter listing (public) and the admin API that hot-loads and unloads adapters."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from server.api.deps import ReadyState, require_admin, require_api_key
from server.api.tgi.errors import declared
from server.errors import ServeError


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    path: str = Field(min_length=1, max_length=512, description="Directory relative to the server's adapter root.")


class AdapterInfo(BaseModel):
    name: str
    version: str
    base_model: str
    rank: int
    template: str
    path: str
    loaded_at: float
    load_seconds: float
    training: dict | None = None


public = APIRouter(dependencies=[Depends(require_api_key)], tags=["adapters"])
admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)], tags=["admin"])
log = logging.getLogger("loraserve.admin")


@public.get("/adapters", response_model=list[AdapterInfo], responses=declared(401, 503), summary="Loaded adapters")
async def list_adapters(state: ReadyState) -> list[dict]:
    registry = state.registry
    return [registry.get(name).describe(registry.base_name) for name in registry.names()]


@public.get(
    "/adapters/{name}", response_model=AdapterInfo, responses=declared(401, 404, 503), summary="One loaded adapter"
)
async def get_adapter(name: str, state: ReadyState) -> dict:
    return state.registry.get(name).describe(state.registry.base_name)


@admin.post(
    "/adapters",
    response_model=AdapterInfo,
    responses=declared(400, 401, 403, 404, 408, 409, 413, 422, 500, 503),
    summary="Load or reload an adapter from the adapter root",
)
async def load_adapter(body: LoadAdapterRequest, state: ReadyState) -> dict:
    metrics = state.metrics
    try:
        version = await state.registry.load(body.name, body.path)
    except ServeError:
        metrics.adapter_loads.labels("rejected").inc()
        raise
    except Exception as exc:  # a failure inside the model (e.g. out of memory): old versions keep serving
        metrics.adapter_loads.labels("failed").inc()
        log.exception("loading adapter %s from %s failed", body.name, body.path)
        # The exception's type only: its text may name server-side paths; the log has all of it.
        raise ServeError(f"loading the adapter failed ({type(exc).__name__}); the server log has the details") from exc
    metrics.adapter_loads.labels("ok").inc()
    metrics.adapter_load_seconds.observe(version.load_seconds)
    metrics.adapters_loaded.set(len(state.registry.names()))
    log.info(
        "adapter %s version %s loaded from %s in %.3fs", version.name, version.version, body.path, version.load_seconds
    )
    return version.describe(state.registry.base_name)


@admin.delete(
    "/adapters/{name}",
    response_model=AdapterInfo,
    responses=declared(401, 403, 404, 503),
    summary="Unload an adapter (running requests finish first)",
)
async def unload_adapter(name: str, state: ReadyState) -> dict:
    version = await state.registry.unload(name)
    state.metrics.adapters_loaded.set(len(state.registry.names()))
    log.info("adapter %s version %s unloaded", version.name, version.version)
    return version.describe(state.registry.base_name)
