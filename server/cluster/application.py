"""The Serve application: Ingress → EngineReplica × N, both reading the Keeper. Built from settings by
`loraserve cluster`, or by Ray from a Serve config file (`import_path: server.cluster.application:build`)."""

from __future__ import annotations

import uuid
from typing import Any

from ray.serve import Application

from server.cluster.ingress import Ingress
from server.cluster.keeper import Keeper
from server.cluster.replica import EngineReplica
from server.cluster.settings import ClusterSettings
from server.settings import ServerSettings


def application(settings: ServerSettings, cluster: ClusterSettings) -> Application:
    # Each deploy gets an id. Serve keeps a deployment whose arguments did not change, so without it a
    # redeployed cluster would keep the last one's catalog; and a replica of the last deploy still
    # starting (a restart) must not seed the new catalog with the old start-up adapters.
    deployment = uuid.uuid4().hex
    keeper = Keeper.bind(deployment=deployment, metrics_max_age=3 * cluster.metrics_push_seconds)
    engine = EngineReplica.options(
        num_replicas=cluster.replicas,
        ray_actor_options={"num_gpus": cluster.num_gpus, "num_cpus": cluster.num_cpus},
        max_ongoing_requests=cluster.max_ongoing_requests(settings),
        max_queued_requests=cluster.max_queued_requests(settings),
        # A model load takes minutes on a GPU: Ray must not give up on a starting replica before that.
        health_check_timeout_s=60,
        # A replica that fails to start (a bad model or start-up adapter) fails again: say so after 3 tries.
        max_constructor_retry_count=3,
    ).bind(settings, cluster, keeper, deployment=deployment)
    return Ingress.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000).bind(
        settings, engine, keeper
    )


def build(args: dict[str, Any]) -> Application:
    """A Serve config's `args`: the server's settings by name (`base_model`, `adapter_root`, `adapters`, …)
    and the cluster's under `cluster` (`replicas`, `num_gpus`, …). LORASERVE_* variables fill the rest,
    read where Ray builds the application (use the config's runtime_env env_vars, e.g. for the admin token)."""
    args = dict(args)
    cluster = ClusterSettings(**args.pop("cluster", {}))
    settings = ServerSettings(**args)
    cluster.adapters_per_replica(settings)  # a bad combination fails the deploy, not the first request
    return application(settings, cluster)
