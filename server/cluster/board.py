"""The cluster's /metrics: each replica's own Prometheus text, merged into one scrape with a `replica`
label on every sample (sum them in PromQL for cluster totals).

Replicas push their text every few seconds (Ray Serve cannot send one request to every replica), so a
scrape is at most that old; a replica that stopped pushing (killed, scaled down) drops out after `max_age`.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


class MetricsBoard:
    def __init__(self, *, max_age: float) -> None:
        self.max_age = max_age
        self._latest: dict[str, tuple[float, str]] = {}  # replica → (when, text)

    def report(self, replica: str, text: str, *, now: float | None = None) -> None:
        self._latest[replica] = (time.monotonic() if now is None else now, text)

    def replicas(self, *, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        return sorted(r for r, (at, _) in self._latest.items() if now - at <= self.max_age)

    def exposition(self, *, now: float | None = None) -> bytes:
        families: dict[str, Metric] = {}
        for replica in self.replicas(now=now):
            for family in text_string_to_metric_families(self._latest[replica][1]):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(list(families.values())))
        return generate_latest(registry)


class _Fixed:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return self.families
