"""`loraserve cluster`: join (or start) a Ray cluster, deploy the application, serve until stopped."""

from __future__ import annotations

import logging
import signal
import threading

import ray
from ray import serve

from server.cluster.application import application
from server.cluster.settings import ClusterSettings
from server.settings import ServerSettings

log = logging.getLogger("loraserve.cluster")
# Read by libraries at import, so they must reach the replicas' processes as they reach this one.
PASSED_ON = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM")


def run_cluster(settings: ServerSettings, cluster: ClusterSettings, *, log_level: str = "info") -> None:
    import os

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cluster.adapters_per_replica(settings)  # fails before Ray starts
    env = {key: os.environ[key] for key in PASSED_ON if key in os.environ}
    ray.init(address=cluster.ray_address, runtime_env={"env_vars": env}, logging_level=log_level.upper())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            serve.run(application(settings, cluster), name=cluster.app_name, route_prefix="/")
        except Exception as exc:  # a replica failed to start (bad model, bad adapter)
            log.error("the cluster did not start: %s", _why(cluster.app_name) or exc)
            raise SystemExit(3) from exc
        log.info("serving %d replicas on http://%s:%d", cluster.replicas, settings.host, settings.port)
        stop.wait()
    finally:
        _leave(cluster)


def _why(app_name: str) -> str | None:
    """The engine replicas' own error (the last line of the traceback Serve keeps), e.g. the bad adapter."""
    try:
        deployment = serve.status().applications[app_name].deployments["EngineReplica"]
    except Exception:
        return None
    lines = [line.strip() for line in deployment.message.splitlines() if line.strip()]
    return lines[-1] if lines else None


def _leave(cluster: ClusterSettings) -> None:
    """Take the application down; Serve and Ray too when this command started them."""
    try:
        if cluster.ray_address is None:
            serve.shutdown()
        else:
            serve.delete(cluster.app_name)
    finally:
        ray.shutdown()
