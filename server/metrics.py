"""Prometheus metrics, one registry per app (tests run several apps in one process)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes (the engine's own process: ENGINE_METRICS)
        self.requests = Counter("loraserve_requests", "HTTP requests", ["route", "status", "adapter"], registry=r)
        self.generated_tokens = Counter("loraserve_generated_tokens", "Tokens generated", ["adapter"], registry=r)
        self.prompt_tokens = Counter("loraserve_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r)
        self.ttft = Histogram(
            "loraserve_time_to_first_token_seconds",
            "Time to first token",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "loraserve_inter_token_seconds",
            "Time between tokens of a stream",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("loraserve_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("loraserve_running_generations", "Generations in progress", registry=r)
        self.adapter_loads = Counter("loraserve_adapter_loads", "Adapter loads", ["outcome"], registry=r)
        self.adapter_load_seconds = Histogram(
            "loraserve_adapter_load_seconds", "Adapter load latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.adapters_loaded = Gauge("loraserve_adapters_loaded", "Adapters currently loaded", registry=r)
        self._streams: dict[str, StreamSeries] = {}

    def stream_series(self, adapter: str) -> StreamSeries:
        """An adapter label's per-stream series, looked up once per label: prometheus_client's labels() takes a lock
        and checks its arguments each call, 5% of the event loop's time under 64 streams of short requests."""
        series = self._streams.get(adapter)
        if series is None:
            series = self._streams[adapter] = StreamSeries(
                *(m.labels(adapter) for m in (self.prompt_tokens, self.ttft, self.inter_token, self.generated_tokens))
            )
        return series

    def watch_engine(self, read: Callable[[], EngineNumbers]) -> None:
        """Export the engine's own counters, read at scrape time (the engine never imports this)."""
        self.registry.register(_EngineCollector(read))


class StreamSeries(NamedTuple):
    prompt_tokens: Counter
    ttft: Histogram
    inter_token: Histogram
    generated: Counter


EngineNumbers = dict[str, float]

# name → (kind, help); the engine side supplies a value for each name.
ENGINE_METRICS = {
    "loraserve_engine_steps": ("counter", "Forward passes run by the engine"),
    "loraserve_engine_prefill_tokens": ("counter", "Prompt tokens prefilled"),
    "loraserve_adapter_uploads": ("counter", "Adapter copies from host memory into a device slot"),
    "loraserve_kv_slots": ("gauge", "KV cache slots preallocated"),
    "loraserve_kv_slots_used": ("gauge", "KV cache slots held by running sequences"),
    "loraserve_adapter_slots_resident": ("gauge", "Device adapter slots holding an adapter"),
    "loraserve_adapter_slots_pinned": ("gauge", "Pins on device adapter slots by running sequences"),
    "loraserve_adapters_in_host_memory": ("gauge", "Adapter versions attached (host copies), retired ones included"),
    "loraserve_adapter_host_bytes": ("gauge", "Host memory of the attached adapters' weights"),
    "loraserve_adapter_device_bytes": ("gauge", "Memory of the device adapter slots (sized by the widest adapter)"),
    "loraserve_adapter_versions_retired": ("gauge", "Replaced or unloaded versions that requests still hold"),
    "loraserve_device_allocated_bytes": ("gauge", "torch.cuda.memory_allocated on a GPU; 0 on a CPU"),
    "loraserve_engine_resident_memory_bytes": (
        "gauge",
        "Resident memory of the engine's process (its own, or the server's: LORASERVE_ENGINE_PROCESS)",
    ),
}


class _EngineCollector:
    def __init__(self, read: Callable[[], EngineNumbers]) -> None:
        self.read = read

    def collect(self):
        numbers = self.read()
        for name, (kind, help_text) in ENGINE_METRICS.items():
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, help_text, value=numbers[name])
