"""The cluster's own settings (env prefix LORASERVE_CLUSTER_); each replica takes the server's settings."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.errors import ServeError
from server.settings import ServerSettings


class ClusterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASERVE_CLUSTER_", extra="ignore")

    replicas: int = Field(2, ge=1, description="Engine replicas, each with its own base model and adapter slots.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica: 0 on CPU, 0.5 puts two replicas on one GPU.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica.")
    models_per_replica: int | None = Field(
        None, ge=1, description="Adapters a replica keeps loaded (LRU beyond); default ADAPTER_SLOTS."
    )
    ray_address: str | None = Field(None, description="A running Ray cluster to join; none = start a local one.")
    app_name: str = Field("loraserve", description="The Serve application's name.")
    metrics_push_seconds: float = Field(2.0, gt=0, description="How often each replica sends its /metrics.")

    def adapters_per_replica(self, server: ServerSettings) -> int:
        """The multiplexing LRU's size. A replica's registry must also hold one more during an admin load
        (it loads before the LRU evicts), so that limit stays below MAX_ADAPTERS."""
        limit = self.models_per_replica or server.adapter_slots
        if limit >= server.max_adapters:
            raise ServeError(
                f"models_per_replica ({limit}) must be below max_adapters ({server.max_adapters}): "
                "an admin load holds one more adapter until the least recently used one leaves"
            )
        return limit

    def max_ongoing_requests(self, server: ServerSettings) -> int:
        """What Ray may hand one replica at once: its engine's own running slots and queue. Beyond that Ray
        queues (or sends the request to another replica), so the engine's 429 stays for real overload."""
        return server.max_running + server.max_queue

    def max_queued_requests(self, server: ServerSettings) -> int:
        """What Ray may hold in front of the replicas. Ray counts a request as queued until a replica takes
        it, so a burst into idle replicas counts in full before any is assigned: the bound covers what the
        replicas take (max_ongoing_requests each) and as many again as their own queues (requests for an
        adapter wait there for a replica that holds it, too). Beyond it Ray refuses (BackPressureError) and
        the ingress answers 429 with Retry-After, as a single server does; unbounded, an overload would pile
        up in Ray's queue with no answer."""
        return self.replicas * (self.max_ongoing_requests(server) + server.max_queue)
