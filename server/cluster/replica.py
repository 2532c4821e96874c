"""One engine replica: the single server's app (model, engine, registry, routes) run in process, fed
the requests the ingress forwards, its adapters kept by Ray's multiplexing (server.cluster.residency)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from server.api.app import create_app
from server.api.cluster.forward import error_response
from server.cluster.forwarding import ForwardedRequest, call_app
from server.cluster.residency import Residency
from server.cluster.settings import ClusterSettings
from server.errors import ServeError
from server.settings import ServerSettings

log = logging.getLogger("loraserve.cluster")
SEEDING_WAIT_S = 600  # checking the start-up adapters: one load each
REPLICA_HEADER = b"x-loraserve-replica"  # which replica answered: for tests and for reading the logs


@serve.deployment
class EngineReplica:
    async def __init__(
        self, settings: ServerSettings, cluster: ClusterSettings, keeper: DeploymentHandle, *, deployment: str
    ) -> None:
        from server.logs import quiet_libraries

        quiet_libraries()
        self.keeper = keeper
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # The start-up adapters are the catalog's seed, loaded lazily where requests go, not on every replica.
        self.app = create_app(settings.model_copy(update={"adapters": {}}))
        self.state = self.app.state.loraserve
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # loads the model in the background, as `serve` does
        await self._until_ready()
        self.residency = Residency(
            self.state.registry, metrics=self.state.metrics, limit=cluster.adapters_per_replica(settings)
        )
        await self._seed_or_wait(settings.adapters, deployment)
        self._pusher = asyncio.ensure_future(self._push_metrics(cluster.metrics_push_seconds))

    async def _until_ready(self) -> None:
        while not self.state.ready:
            if self.state.load_error:
                raise RuntimeError(self.state.load_error)  # Ray reports it; the deployment does not start
            await asyncio.sleep(0.1)

    async def _seed_or_wait(self, adapters: dict[str, str], deployment: str) -> None:
        """One replica checks the start-up adapters; a bad one fails every replica's start, as it fails `serve`'s."""
        if await self.keeper.claim_seeding.remote(deployment, self.state.loaded_at):
            try:
                await self._seed(adapters)
            except RuntimeError as exc:
                await self.keeper.seeding_done.remote(str(exc))
                raise
            await self.keeper.seeding_done.remote(None)
            return
        deadline = time.monotonic() + SEEDING_WAIT_S
        while (outcome := await self.keeper.seeding_outcome.remote()) is None:
            if time.monotonic() > deadline:  # the replica seeding died midway: Ray retries this one
                raise RuntimeError(f"the start-up adapters were not checked within {SEEDING_WAIT_S}s")
            await asyncio.sleep(0.2)
        if outcome:
            raise RuntimeError(outcome)

    async def _seed(self, adapters: dict[str, str]) -> None:
        """Check each start-up adapter as `serve` does, record it in the catalog, unload it."""
        registry = self.state.registry
        for name, path in adapters.items():
            try:
                version = await registry.load(name, path)
            except ServeError as exc:
                raise RuntimeError(f"preloading adapter {name!r} from {path!r}: {exc.message}") from exc
            await self.keeper.seed.remote(name, path, version.describe(registry.base_name))
            await registry.unload(name)

    async def handle(self, request: ForwardedRequest) -> AsyncIterator[dict]:
        """The app's ASGI messages for one forwarded request (Ray streams them back to the ingress)."""
        headers = [(REPLICA_HEADER, self.replica_id.encode())]
        try:
            await self.residency.prepare(request.adapter)
        except ServeError as exc:
            async for message in call_app(error_response(request.path, exc), request, headers=headers):
                yield message
            return
        status = None
        async for message in call_app(self.app, request, headers=headers):
            status = message.get("status", status)
            yield message
        if request.admin_load is not None and status == 200:
            await self.residency.adopt(request.admin_load.name, request.admin_load.generation)

    def check_health(self) -> None:
        """Ray Serve asks this periodically and restarts a replica that raises: one whose engine process died
        (its requests already got their errors) is replaced, not left answering 503 (`serve` exits instead)."""
        if self.state.load_error:
            raise RuntimeError(self.state.load_error)

    async def _push_metrics(self, every: float) -> None:
        metrics = ForwardedRequest("GET", "/metrics", b"", [], b"")
        while True:
            with contextlib.suppress(Exception):  # a missed push only makes the next scrape older
                text = b"".join([m.get("body", b"") async for m in call_app(self.app, metrics)])
                await self.keeper.report_metrics.remote(self.replica_id, text.decode())
            await asyncio.sleep(every)

    async def __del__(self) -> None:
        """Ray's graceful shutdown of the replica: stop the engine as `serve` does on exit."""
        if hasattr(self, "_pusher"):
            self._pusher.cancel()
            await self._lifespan.__aexit__(None, None, None)
