"""The ingress deployment: Ray Serve's HTTP proxy hands it every request; it runs the cluster's app
(server.api.cluster.app) over Ray handles to the engine replicas and the keeper."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from server.api.cluster.app import create_ingress_app
from server.api.cluster.forward import LOST
from server.cluster.catalog import Entry, model_id
from server.cluster.forwarding import ForwardedRequest
from server.errors import Overloaded, ServeError, Unavailable
from server.settings import ServerSettings


class RayCluster:
    """server.api.cluster.app's Cluster, on Ray Serve handles."""

    def __init__(self, engine: DeploymentHandle, keeper: DeploymentHandle) -> None:
        self.engine, self.keeper = engine, keeper

    async def lookup(self, name: str) -> Entry | None:
        return await self.keeper.lookup.remote(name)

    async def live(self) -> tuple[float, list[Entry]]:
        return await self.keeper.live.remote()

    async def reserve(self) -> int:
        return await self.keeper.reserve.remote()

    async def publish(self, name: str, path: str, generation: int, info: dict) -> bool:
        return await self.keeper.publish.remote(name, path, generation, info)

    async def remove(self, name: str) -> Entry | None:
        return await self.keeper.remove.remote(name)

    async def metrics(self) -> bytes:
        return await self.keeper.metrics.remote()

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[dict]:
        """The replica's ASGI messages. Ray picks the replica: one holding the adapter's model id if any."""
        view = request.adapter
        options = {"stream": True}
        if view is not None and view.generation is not None:
            options["multiplexed_model_id"] = model_id(view.name, view.generation)
        response = self.engine.options(**options).handle.remote(request)
        finished = False
        try:
            async for message in response:
                yield message
            finished = True
        finally:
            if not finished:  # the client left (Ray cancelled us) or the replica failed: stop its work too
                response.cancel()

    def failure(self, exc: Exception) -> ServeError:
        """Forwarding failed before the replica's answer began. Ray's refusal of a full queue does not
        always come through `forward`'s own frame (seen: its frame is cancelled and the caller awaiting
        it gets the BackPressureError), so it is told apart here, where the caller catches it."""
        if isinstance(exc, BackPressureError):  # every replica and Ray's queue in front of them are full
            return Overloaded("the cluster is at capacity; retry later", headers={"Retry-After": "1"})
        return Unavailable(LOST, headers={"Retry-After": "1"})  # the replica died or Ray could not reach it


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, settings: ServerSettings, engine: DeploymentHandle, keeper: DeploymentHandle) -> None:
        self.settings = settings
        self.cluster = RayCluster(engine, keeper)

    def __serve_build_asgi_app__(self):
        return create_ingress_app(self.settings, self.cluster)
