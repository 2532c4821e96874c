"""The one deployment that holds cluster-wide state: the adapter catalog and the metrics board.

One replica, no resources: every call is a dict lookup. Its state lives in memory: if Ray restarts it,
the cluster forgets adapters hot-loaded since start-up (the start-up settings' adapters come back with
the next replica that starts) — reload them through the admin API.
"""

from __future__ import annotations

from ray import serve

from server.cluster.board import MetricsBoard
from server.cluster.catalog import AdapterCatalog, Entry


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
class Keeper:
    def __init__(self, *, deployment: str, metrics_max_age: float) -> None:
        self.deployment = deployment
        self.catalog = AdapterCatalog()
        self.board = MetricsBoard(max_age=metrics_max_age)
        self._seeding_claimed = False
        self._seeding_outcome: str | None = None

    # -- the catalog ------------------------------------------------------------------------------
    def lookup(self, name: str) -> Entry | None:
        return self.catalog.lookup(name)

    def live(self) -> tuple[float, list[Entry]]:
        return self.catalog.base_loaded_at, self.catalog.live()

    def reserve(self) -> int:
        return self.catalog.reserve()

    def publish(self, name: str, path: str, generation: int, info: dict) -> bool:
        return self.catalog.publish(name, path, generation, info)

    def remove(self, name: str) -> Entry | None:
        return self.catalog.remove(name)

    def claim_seeding(self, deployment: str, base_loaded_at: float) -> bool:
        """True for the first replica of this deploy to ask: it checks the start-up adapters and seeds
        the catalog; the others wait for its outcome (`seeding_outcome`)."""
        first = deployment == self.deployment and not self._seeding_claimed
        if first:
            self._seeding_claimed = True
            self.catalog.base_loaded_at = base_loaded_at
        return first

    def seeding_done(self, error: str | None) -> None:
        self._seeding_outcome = error or ""

    def seeding_outcome(self) -> str | None:
        """None while the seeding runs, "" once it succeeded, else why it failed."""
        return self._seeding_outcome

    def seed(self, name: str, path: str, info: dict) -> None:
        self.catalog.seed(name, path, info)

    # -- the metrics board ------------------------------------------------------------------------
    def report_metrics(self, replica: str, text: str) -> None:
        self.board.report(replica, text)

    def metrics(self) -> bytes:
        return self.board.exposition()
