"""A replica's adapters under Ray Serve's model multiplexing.

Ray's `@serve.multiplexed` keeps an LRU of model ids per replica and tells the router which replica
holds which, so a request for an adapter goes where it is already loaded. Here a model id is
`name@generation` (server.cluster.catalog): loading one loads the adapter into this replica's registry
(the single server's, with all its checks), evicting one unloads it. Requests already running on an
evicted or reloaded version finish on it (the registry's own protocol).
"""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import Counter
from ray import serve

from server.adapters.registry import AdapterRegistry
from server.cluster.catalog import model_id, parse_model_id
from server.cluster.forwarding import AdapterView
from server.errors import NotFound, ServeError
from server.metrics import Metrics


class Residency:
    def __init__(self, registry: AdapterRegistry, *, metrics: Metrics, limit: int) -> None:
        self.registry = registry
        self.metrics = metrics
        self.limit = limit
        self._loop = asyncio.get_running_loop()  # built on the replica's event loop
        self._generations: dict[str, int] = {}  # name → generation of the version this registry holds
        self._paths: dict[str, str] = {}  # model id → path, for the load Ray is about to ask for
        self._resident: set[str] = set()  # model ids in Ray's LRU
        self.requests = Counter(
            "loraserve_cluster_adapter_requests",
            "Requests for an adapter: hit = this replica held it already, miss = it loaded it for the request",
            ["outcome"],
            registry=metrics.registry,
        )
        self.evictions = Counter(
            "loraserve_cluster_adapter_evictions", "Adapters unloaded by the LRU", registry=metrics.registry
        )

        async def load(key: str) -> ResidentAdapter:  # a function: Ray keeps its LRU as an attribute of it
            return await self._load(key)

        self._get = serve.multiplexed(max_num_models_per_replica=limit)(load)

    async def prepare(self, view: AdapterView | None) -> None:
        """Make this replica hold what the catalog says of the request's adapter, before the app runs."""
        if view is None:
            return
        if view.generation is None:  # the cluster does not serve it (unloaded): the app will answer 404
            await self._drop(view.name)
            return
        if view.generation < self._generations.get(view.name, -1):
            return  # looked up just before a reload that this replica already has: the newer one answers
        key = model_id(view.name, view.generation)
        self.requests.labels("hit" if key in self._resident else "miss").inc()
        self._paths[key] = view.path
        try:
            await self._get(key)
            if view.name not in self.registry.names():  # its LRU entry outlived the load (a race with a reload)
                await self._load_now(view.name, view.path, view.generation)
        except ServeError:
            raise
        except Exception as exc:  # e.g. out of memory: the adapters already loaded keep serving
            raise ServeError(f"loading adapter {view.name!r} failed: {type(exc).__name__}: {str(exc)[:300]}") from exc

    async def adopt(self, name: str, generation: int) -> None:
        """An admin load this replica has just done: the LRU takes it without loading it again."""
        self._generations[name] = generation
        await self._get(model_id(name, generation))

    async def _load(self, key: str) -> ResidentAdapter:
        """Ray calls this on a miss (after evicting the least recently used one when full)."""
        name, generation = parse_model_id(key)
        if self._generations.get(name) != generation:
            await self._load_now(name, self._paths[key], generation)
        self._resident.add(key)
        return ResidentAdapter(key, self._evict_from_thread)

    async def _load_now(self, name: str, path: str, generation: int) -> None:
        await self.registry.load(name, path)
        self._generations[name] = generation
        self.metrics.adapter_loads.labels("ok").inc()
        self.metrics.adapters_loaded.set(len(self.registry.names()))

    def _evict_from_thread(self, key: str) -> None:
        """Ray runs an evicted model's __del__ in a worker thread and waits for it: unload on the loop."""
        self._resident.discard(key)
        self._paths.pop(key, None)
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop()
            return  # called on an event loop: garbage collection at shutdown, not an eviction
        asyncio.run_coroutine_threadsafe(self._unload(key), self._loop).result(timeout=120)

    async def _unload(self, key: str) -> None:
        name, generation = parse_model_id(key)
        if self._generations.get(name) != generation:
            return  # a stale entry: the registry holds a newer load of the name, which stays
        self.evictions.inc()
        await self._drop(name)

    async def _drop(self, name: str) -> None:
        if self._generations.pop(name, None) is None:
            return
        with contextlib.suppress(NotFound):
            await self.registry.unload(name)
        self.metrics.adapters_loaded.set(len(self.registry.names()))


class ResidentAdapter:
    """What Ray's multiplexer caches per model id. Ray calls `__del__` to evict it; garbage collection
    calls it again later, so it acts once."""

    def __init__(self, key: str, evict) -> None:
        self.key = key
        self._evict = evict

    def __del__(self) -> None:
        evict, self._evict = self._evict, None
        if evict is not None:
            evict(self.key)
