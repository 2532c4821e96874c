"""The app factory: state on `app.state.loraserve`, routers, middleware, error handlers, lifespan."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from contract import __version__
from server.api import admin, ops, playground, spec
from server.api.handlers import install_error_handlers
from server.api.limits import ShedWhenFullMiddleware, limit_bodies
from server.api.openai import routes as openai_routes
from server.api.tgi import routes as tgi_routes
from server.errors import ServeError
from server.settings import ServerSettings
from server.state import ServerState

log = logging.getLogger("loraserve")


def create_app(settings: ServerSettings, *, load: bool = True) -> FastAPI:
    """`load=False` builds the app without a model (for the OpenAPI spec)."""
    state = ServerState(settings=settings)
    app = FastAPI(
        title="loraserve",
        version=__version__,
        lifespan=_lifespan if load else None,
        description="Serve many LoRA adapters on one base model: TGI/LoRAX-compatible generation, "
        "SSE streaming, and an admin API that hot-loads adapters.",
    )
    app.state.loraserve = state
    # The generation routes first: a request is matched against each route in turn (the regexes of the routes
    # before /v1/completions were 5% of the event loop's time under 64 streams). The one path two routers share,
    # `/`, is POST for generation (tgi) and GET for the playground: neither order changes where a request goes.
    app.include_router(openai_routes.router)
    app.include_router(tgi_routes.router)
    app.include_router(ops.router)
    app.include_router(admin.public)
    app.include_router(admin.admin)
    app.include_router(playground.router)
    install_error_handlers(app)
    spec.install(app)
    app.add_middleware(ShedWhenFullMiddleware, state=state)  # inside the metrics: its 429s are counted
    app.add_middleware(RequestMetricsMiddleware, state=state)
    limit_bodies(app, settings)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """The model loads in the background: uvicorn binds the port only once startup returns, and a big
    model takes minutes, during which /health must answer (or a liveness probe restarts the pod) and
    /ready must say "loading"."""
    state: ServerState = app.state.loraserve
    loading = asyncio.create_task(_load(state))
    try:
        yield
    finally:
        state.ready = False
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        if state.engine is not None:
            state.engine.stop()


async def _load(state: ServerState) -> None:
    started = time.monotonic()
    try:
        await asyncio.to_thread(state.load_model)
        state.engine.start()
        await state.preload_adapters()
    except Exception as exc:  # a bad model, adapter or setting: say why, then stop serving (exit 3)
        if isinstance(exc, ServeError):  # our own message says it all: one line, no traceback
            log.error("loading failed: %s", exc.message)
        else:
            log.exception("loading failed")
        state.load_error = f"loading failed: {exc}"
        state.stop_serving()
        return
    state.ready = True
    log.info("ready: %d adapters, %.1f s after loading began", len(state.registry.names()), time.monotonic() - started)


class RequestMetricsMiddleware:
    """Counts requests by route template, status and adapter (pure ASGI: streaming stays untouched)."""

    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = getattr(scope.get("route"), "path", None) or scope.get("loraserve_route", "unmatched")
            adapter = scope.get("state", {}).get("adapter", "-")
            self.state.metrics.requests.labels(route, str(status["code"]), adapter).inc()
