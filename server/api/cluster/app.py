"""The cluster's ingress app. What a cluster knows as a whole it answers itself, from its catalog:
/v1/models, /adapters, unloads, /metrics (every replica's, labelled), /health. Everything else goes to
one replica, unchanged: generation routes to a replica picked by their adapter, an admin load to any
replica (which checks and loads it, becoming its first home) and then into the catalog.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from contract import __version__
from server.adapters.registry import not_loaded
from server.api import ops
from server.api.admin import AdapterInfo
from server.api.cluster.forward import ForwardedResponse, collect, first_message, replay
from server.api.deps import require_admin, require_api_key
from server.api.handlers import install_error_handlers
from server.api.limits import limit_bodies
from server.api.openai.errors import OpenAIRoute
from server.api.openai.routes import model_cards, unknown_model
from server.api.openai.schemas import ModelCard, ModelList
from server.cluster.catalog import Entry
from server.cluster.forwarding import AdapterView, ForwardedRequest, requested_adapter
from server.errors import ServeError
from server.settings import ServerSettings

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class Cluster(Protocol):
    """What the ingress needs of the cluster (server.cluster.ingress implements it on Ray)."""

    async def lookup(self, name: str) -> Entry | None: ...
    async def live(self) -> tuple[float, list[Entry]]: ...
    async def reserve(self) -> int: ...
    async def publish(self, name: str, path: str, generation: int, info: dict) -> bool: ...
    async def remove(self, name: str) -> Entry | None: ...
    async def metrics(self) -> bytes: ...
    def forward(self, request: ForwardedRequest) -> AsyncIterator[dict]: ...
    def failure(self, exc: Exception) -> ServeError: ...  # what a client is told when `forward` failed early


@dataclass
class IngressState:
    """What server.api.deps reads from `app.state.loraserve`: the settings (API keys, admin token)."""

    settings: ServerSettings
    cluster: Cluster


def create_ingress_app(settings: ServerSettings, cluster: Cluster) -> FastAPI:
    # No spec or docs of its own: /openapi.json and /docs are forwarded to a replica, whose app they describe.
    app = FastAPI(title="loraserve cluster", version=__version__, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.loraserve = IngressState(settings, cluster)
    app.add_api_route("/health", ops.health, methods=["GET", "HEAD"])  # the endpoint is up, whatever the replicas do
    app.include_router(_openai)
    app.include_router(_public)
    app.include_router(_admin)
    app.add_api_route("/metrics", _metrics, methods=["GET"])
    app.add_api_route("/info", _info, methods=["GET"])
    app.add_api_route("/{path:path}", _forward, methods=METHODS)
    install_error_handlers(app)
    limit_bodies(app, settings)
    return app


def _state(request: Request) -> IngressState:
    return request.app.state.loraserve


_openai = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], route_class=OpenAIRoute)
_public = APIRouter(dependencies=[Depends(require_api_key)])
_admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


@_openai.get("/models", response_model=ModelList)
async def _list_models(request: Request) -> ModelList:
    return ModelList(data=await _model_cards(_state(request)))


@_openai.get("/models/{model:path}", response_model=ModelCard)
async def _get_model(model: str, request: Request) -> ModelCard:
    for card in await _model_cards(_state(request)):
        if card.id == model:
            return card
    raise unknown_model(model)


async def _model_cards(state: IngressState) -> list[ModelCard]:
    base_loaded_at, entries = await state.cluster.live()
    adapters = [(entry.name, entry.info["loaded_at"]) for entry in entries]
    return model_cards(state.settings.public_base_name, base_loaded_at, adapters)


@_public.get("/adapters", response_model=list[AdapterInfo])
async def _list_adapters(request: Request) -> list[dict]:
    _, entries = await _state(request).cluster.live()
    return [entry.info for entry in entries]


@_public.get("/adapters/{name}", response_model=AdapterInfo)
async def _get_adapter(name: str, request: Request) -> dict:
    entry = await _state(request).cluster.lookup(name)
    if entry is None:
        raise not_loaded(name)
    return entry.info


@_admin.delete("/adapters/{name}", response_model=AdapterInfo)
async def _unload_adapter(name: str, request: Request) -> dict:
    """Out of the catalog at once: a replica still holding it drops it on the next request that names it."""
    entry = await _state(request).cluster.remove(name)
    if entry is None:
        raise not_loaded(name, param="name")
    return entry.info


@_admin.post("/adapters")
async def _load_adapter(request: Request) -> Response:
    """A replica checks and loads it exactly as a single server does; only its success is published,
    under a generation that makes every replica load these files before answering for the name again."""
    cluster = _state(request).cluster
    forwarded = await _forwarded(request)
    name, path = _load_fields(forwarded.body)
    generation = await cluster.reserve()
    if name is not None:
        forwarded.admin_load = AdapterView(name, generation, path)
    status, headers, body = await collect(cluster.forward(forwarded), cluster.failure)
    if status == 200 and name is not None:
        await cluster.publish(name, path, generation, json.loads(body))
    return replay(status, headers, body)


async def _metrics(request: Request) -> Response:
    return Response(await _state(request).cluster.metrics(), media_type=CONTENT_TYPE_LATEST)


async def _info(request: Request) -> Response:
    """A replica's /info (base model, limits), its adapter list replaced by the cluster's."""
    state = _state(request)
    status, headers, body = await collect(state.cluster.forward(await _forwarded(request)), state.cluster.failure)
    info = json.loads(body) if status == 200 else {}
    if "adapters" in info:  # only shown to callers who may list adapters
        info["adapters"] = [entry.name for entry in (await state.cluster.live())[1]]
        body = json.dumps(info).encode()
    return replay(status, headers, body)


async def _forward(request: Request) -> Response:
    forwarded = await _forwarded(request)
    cluster = _state(request).cluster
    messages = cluster.forward(forwarded)
    return ForwardedResponse(await first_message(messages, cluster.failure), messages, path=forwarded.path)


async def _forwarded(request: Request) -> ForwardedRequest:
    state = _state(request)
    body = await request.body()
    path = request.url.path
    name = requested_adapter(path, body, base_name=state.settings.public_base_name)
    view = None
    if name is not None:
        entry = await state.cluster.lookup(name)
        view = AdapterView(name, entry.generation, entry.path) if entry else AdapterView(name)
    return ForwardedRequest(
        method=request.method,
        path=path,
        query_string=request.scope.get("query_string", b""),
        headers=list(request.scope.get("headers", [])),
        body=body,
        adapter=view,
        client=tuple(request.scope["client"]) if request.scope.get("client") else None,
    )


def _load_fields(body: bytes) -> tuple[str | None, str | None]:
    """`name` and `path` of an admin load, when the body has them (else the replica answers the 422)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(data.get("path"), str):
        return None, None
    return data["name"], data["path"]
