"""The composition root: everything one running server holds, built once at start-up."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from contract.fingerprint import base_fingerprint
from server.adapters.checks import base_shapes
from server.adapters.registry import AdapterRegistry, default_template
from server.engine.engine import Engine
from server.engine.faults import FaultPlan
from server.engine.runner import ModelRunner, load_runner
from server.errors import ServeError
from server.metrics import Metrics
from server.service import GenerationService
from server.settings import ServerSettings

log = logging.getLogger("loraserve")


@dataclass
class ServerState:
    settings: ServerSettings
    metrics: Metrics = field(default_factory=Metrics)
    runner: ModelRunner | None = None
    engine: Engine | None = None
    registry: AdapterRegistry | None = None
    service: GenerationService | None = None
    fingerprint: str = ""
    max_context: int = 0
    loaded_at: float = 0.0  # when the base model finished loading (unix time)
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    stop_serving: Callable[[], None] = lambda: None  # the server's exit, for a load that failed

    def load_model(self) -> None:
        """Blocking: load the base model and build the engine, registry and service around it."""
        s = self.settings
        template = default_template(s.default_template)  # a bad name fails before a long model load
        if s.adapter_root and not Path(s.adapter_root).is_dir():  # else it would serve 0 adapters, silently
            raise ServeError(f"the adapter root {s.adapter_root} (LORASERVE_ADAPTER_ROOT) is not a directory")
        runner = load_runner(
            s.base_model,
            backend=s.backend,
            load_in_4bit=s.load_in_4bit,
            dtype=s.dtype,
            max_context=s.max_context,
            kv_slots=s.max_running,
            adapter_slots=s.adapter_slots,
            max_lora_rank=s.max_adapter_rank,
            kv_memory_fraction=s.kv_memory_fraction,
            cuda_graphs=s.cuda_graphs,
            compile_kernels=s.compile_kernels,
            faults=FaultPlan.from_setting(s.fault_injection),
        )
        self.fingerprint = base_fingerprint(runner.model.config, runner.tokenizer)
        self.max_context = runner.max_context
        self.runner = runner
        self.loaded_at = time.time()
        self.engine = Engine(
            runner, max_running=runner.cache.slots, max_queue=s.max_queue, prefill_chunk_tokens=s.prefill_chunk_tokens
        )
        self.registry = AdapterRegistry(
            root=Path(s.adapter_root) if s.adapter_root else None,
            base=base_shapes(runner.model, self.fingerprint),
            base_name=s.public_base_name,
            default_template=template,
            max_adapters=s.max_adapters,
            max_rank=s.max_adapter_rank,
            max_bytes=s.max_adapter_bytes,
            run_on_worker=self.engine.call,
            attach=runner.attach,
            detach=runner.detach,
        )
        self.metrics.watch_engine(self._engine_numbers)
        self.service = GenerationService(
            engine=self.engine,
            registry=self.registry,
            settings=s,
            metrics=self.metrics,
            max_context=self.max_context,
            base_template=template,
        )
        log.info(
            "base model %s loaded: backend=%s device=%s fingerprint=%s context=%d kv_slots=%d",
            s.base_model,
            runner.backend,
            runner.device,
            self.fingerprint,
            self.max_context,
            runner.cache.slots,
        )

    def _engine_numbers(self) -> dict[str, float]:
        stats, runner = self.engine.stats, self.runner
        return {
            "loraserve_engine_steps": stats.steps,
            "loraserve_engine_prefill_tokens": stats.prefill_tokens,
            "loraserve_adapter_uploads": runner.lora.uploads,
            "loraserve_kv_slots": runner.cache.slots,
            "loraserve_kv_slots_used": runner.cache.used,
            "loraserve_adapter_slots_resident": len(runner.lora.resident),
            "loraserve_adapter_slots_pinned": sum(list(runner.lora.pins.values())),
            "loraserve_adapters_in_host_memory": len(runner.lora.host),
            "loraserve_adapter_host_bytes": runner.lora.host_bytes,
            "loraserve_adapter_device_bytes": runner.lora.device_bytes,
            "loraserve_adapter_versions_retired": self.registry.retired_count,
            "loraserve_device_allocated_bytes": runner.device_allocated_bytes,
        }

    async def preload_adapters(self) -> None:
        for name, path in self.settings.adapters.items():
            try:
                version = await self.registry.load(name, path)
            except ServeError as exc:  # the message is the whole story: start-up logs it in one line
                raise type(exc)(f"preloading adapter {name!r} from {path!r}: {exc.message}", param=exc.param) from exc
            self.metrics.adapter_loads.labels("ok").inc()
            log.info("adapter %s version %s loaded from %s", name, version.version, path)
        self.metrics.adapters_loaded.set(len(self.registry.names()))
        await self.engine.call(self.runner.warm_up)  # decode graphs captured before the first request
