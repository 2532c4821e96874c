"""The composition root: everything one running server holds, built once at start-up."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from contract.fingerprint import base_fingerprint
from server.adapters.checks import base_shapes, load_weights, lora_config
from server.adapters.registry import AdapterRegistry, default_template
from server.engine.engine import Engine
from server.engine.runner import ModelRunner, RunnerFacts, load_runner
from server.engine_process.client import EngineProcess, run_job
from server.engine_process.launch import engine_options, in_own_process, runner_options
from server.errors import Conflict, ServeError
from server.metrics import Metrics
from server.service import GenerationService
from server.settings import ServerSettings

log = logging.getLogger("loraserve")


@dataclass
class ServerState:
    settings: ServerSettings
    metrics: Metrics = field(default_factory=Metrics)
    runner: ModelRunner | None = None  # in this process only (engine_process off)
    engine: Engine | EngineProcess | None = None
    facts: RunnerFacts | None = None
    registry: AdapterRegistry | None = None
    service: GenerationService | None = None
    fingerprint: str = ""
    max_context: int = 0
    loaded_at: float = 0.0  # when the base model finished loading (unix time)
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    stop_serving: Callable[[], None] = lambda: None  # the server's exit, for a load that failed
    _warm_up: Callable[[], Awaitable] | None = None

    def load_model(self) -> None:
        """Blocking: load the base model and build the engine, registry and service around it."""
        s = self.settings
        template = default_template(s.default_template)  # a bad name fails before a long model load
        if s.adapter_root and not Path(s.adapter_root).is_dir():  # else it would serve 0 adapters, silently
            raise ServeError(f"the adapter root {s.adapter_root} (LORASERVE_ADAPTER_ROOT) is not a directory")
        base, attach, detach, run_on_worker, read_weights = self._start_engine()
        self.max_context = self.facts.max_context
        self.loaded_at = time.time()
        self.registry = AdapterRegistry(
            root=Path(s.adapter_root) if s.adapter_root else None,
            base=base,
            base_name=s.public_base_name,
            default_template=template,
            max_adapters=s.max_adapters,
            max_rank=s.max_adapter_rank,
            max_bytes=s.max_adapter_bytes,
            run_on_worker=run_on_worker,
            attach=attach,
            detach=detach,
            read_weights=read_weights,
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
        facts = self.facts
        log.info(
            "base model %s loaded: backend=%s device=%s fingerprint=%s context=%d kv_slots=%d engine %s",
            s.base_model,
            facts.backend,
            facts.device,
            self.fingerprint,
            self.max_context,
            facts.kv_slots,
            "in its own process" if isinstance(self.engine, EngineProcess) else "in the server's process",
        )

    def _start_engine(self):
        """The engine, in a process of its own or in this one: (base shapes, attach, detach, run_on_worker, and what
        reads an adapter's weights for attach)."""
        s = self.settings
        if in_own_process(s):
            engine = EngineProcess(engine_options(s), max_queue=s.max_queue)
            engine.on_lost = self._engine_lost
            hello = engine.wait_ready()  # only a loaded engine is published: until then requests get 503, not 429
            self.engine = engine
            self.facts, self.fingerprint = hello.facts, hello.fingerprint
            self._warm_up = engine.warm_up
            return hello.base, engine.attach, engine.detach, run_job, engine.weights_of
        runner = load_runner(**runner_options(s))
        self.runner, self.facts = runner, runner.facts()
        self.fingerprint = base_fingerprint(runner.model.config, runner.tokenizer)
        self.engine = Engine(
            runner, max_running=runner.cache.slots, max_queue=s.max_queue, prefill_chunk_tokens=s.prefill_chunk_tokens
        )
        self._warm_up = lambda: self.engine.call(runner.warm_up)
        read, keep = adapter_io(runner)
        return base_shapes(runner.model, self.fingerprint), keep, runner.detach, self.engine.call, read

    def _engine_lost(self, reason: str) -> None:
        """The engine process died: not ready any more, and the server exits (its requests got their errors)."""
        self.ready = False
        self.load_error = f"{reason}; the server stops (see the log)"
        self.stop_serving()

    async def refresh_engine_numbers(self) -> None:
        """Before a scrape: an engine process's numbers as they are now (stale ones are kept if it is gone)."""
        if isinstance(self.engine, EngineProcess):
            await self.engine.refresh()

    def _engine_numbers(self) -> dict[str, float]:
        return {**self.engine.numbers(), "loraserve_adapter_versions_retired": self.registry.retired_count}

    async def preload_adapters(self) -> None:
        """The configured adapters, all at once (the registry reads READS_AT_ONCE of them at a time; the worker keeps
        them one by one), then the warm-up. The first failure stops the start-up with its message."""
        if problem := self.settings.preload_problem():
            raise Conflict(problem)
        loads = [asyncio.ensure_future(self._preload(name, path)) for name, path in self.settings.adapters.items()]
        try:
            await asyncio.gather(*loads)
        except BaseException:
            for load in loads:
                load.cancel()
            await asyncio.gather(*loads, return_exceptions=True)  # their tasks end (a job on the worker may go on)
            raise
        self.metrics.adapters_loaded.set(len(self.registry.names()))
        await self._warm_up()  # decode graphs captured before the first request

    async def _preload(self, name: str, path: str) -> None:
        try:
            version = await self.registry.load(name, path)
        except ServeError as exc:  # the message is the whole story: start-up logs it in one line
            raise type(exc)(f"preloading adapter {name!r} from {path!r}: {exc.message}", param=exc.param) from exc
        self.metrics.adapter_loads.labels("ok").inc()
        log.info("adapter %s version %s loaded from %s in %.2f s", name, version.version, path, version.load_seconds)


def adapter_io(runner: ModelRunner):
    """The registry's `read_weights` and `attach` over an engine in this process: the host copy is made with the
    read (in the registry's reading thread, off the worker); only `keep` runs on the worker, between steps."""

    def read(checked):
        return runner.host_copy(lora_config(checked), load_weights(checked))

    def keep(key: str, config, adapter) -> None:
        runner.keep(key, adapter)

    return read, keep
