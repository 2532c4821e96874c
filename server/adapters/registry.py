"""The adapter registry: names → live versions, and the load / reload / unload protocol.

A load validates the directory (checks) off the event loop, then attaches the weights on the
engine's worker thread under a fresh internal key, and only then publishes the name → version
mapping. Requests hold a reference to the version they started with, so a reload never changes a
running request; the old version is detached once its last request finishes. A failed load leaves
the previous version serving. One asyncio lock per name serializes loads of that name.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from contract.manifest import AdapterManifest
from contract.names import ADAPTER_NAME, ADAPTER_NAME_RULE
from contract.templates import BUILTIN, PromptTemplate, TemplateError
from server.adapters.checks import (
    BaseShapes,
    CheckedAdapter,
    check_adapter_dir,
    load_weights,
    lora_config,
    resolve_under_root,
)
from server.errors import BadRequest, Conflict, Forbidden, Invalid, NotFound, ServeError

log = logging.getLogger("loraserve.adapters")
# Adapter loads reading (checked, read and, with the engine in this process, copied) at once: each holds its files'
# bytes and copies of its tensors. The engine process reads and copies as many at once (engine_process/child.py).
READS_AT_ONCE = 4


@dataclass
class AdapterVersion:
    name: str
    version: str
    key: str  # the engine/runner's internal adapter name, unique per load
    path: str  # relative to the adapter root, as given
    rank: int
    template: PromptTemplate
    eos_token: str | None
    stop: tuple[str, ...]
    manifest: AdapterManifest | None
    loaded_at: float
    load_seconds: float
    refs: int = 0
    retired: bool = False
    detaching: bool = False

    def describe(self, base_name: str) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "base_model": base_name,
            "rank": self.rank,
            "template": self.template.name,
            "path": self.path,
            "loaded_at": self.loaded_at,
            "load_seconds": round(self.load_seconds, 4),
            "training": self.manifest.summary() if self.manifest else None,
        }


class AdapterRegistry:
    def __init__(
        self,
        *,
        root: Path | None,
        base: BaseShapes,
        base_name: str,
        default_template: PromptTemplate,
        max_adapters: int,
        max_rank: int,
        max_bytes: int,
        run_on_worker: Callable,
        attach: Callable,
        detach: Callable,
        read_weights: Callable[[CheckedAdapter], object] = load_weights,
    ) -> None:
        self.root = root
        self.base = base
        self.base_name = base_name
        self.default_template = default_template
        self.max_adapters, self.max_rank, self.max_bytes = max_adapters, max_rank, max_bytes
        self._run_on_worker = run_on_worker  # async fn(callable) → result, on the engine thread
        self._attach, self._detach = attach, detach
        self._read_weights = read_weights  # what `attach` takes: tensors, or the files an engine process reads
        self._live: dict[str, AdapterVersion] = {}
        self._retired: list[AdapterVersion] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._reads = asyncio.Semaphore(READS_AT_ONCE)
        self._refs_lock = threading.Lock()
        self._keys = itertools.count(1)

    # -- lookups and references (any thread) ----------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._live)

    def get(self, name: str) -> AdapterVersion:
        version = self._live.get(name)
        if version is None:
            raise not_loaded(name)
        return version

    @property
    def retired_count(self) -> int:
        """Versions replaced or unloaded but not yet detached (held by requests, or being detached)."""
        return len(self._retired)

    def acquire(self, name: str) -> AdapterVersion:
        """The live version of `name`, pinned until `release` (a reload will not free it)."""
        with self._refs_lock:
            version = self.get(name)
            version.refs += 1
            return version

    def release(self, version: AdapterVersion) -> None:
        with self._refs_lock:
            version.refs -= 1

    # -- load / unload (event loop) -------------------------------------------------------------
    async def load(self, name: str, path: str) -> AdapterVersion:
        if not ADAPTER_NAME.match(name or ""):
            raise Invalid(f"name must be {ADAPTER_NAME_RULE}", param="name")
        if self.root is None:
            raise Forbidden("no adapter root is configured; set LORASERVE_ADAPTER_ROOT", param="path")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            self._check_room(name)
            started = time.monotonic()
            try:
                async with self._reads:
                    checked, weights = await asyncio.to_thread(self._check_and_read, path)
                version = self._new_version(name, path, checked, started)
                await self._attach_on_worker(version, checked, weights)
            except ValueError as exc:  # the runner's word that this adapter cannot be served (e.g. lm_head LoRA)
                raise BadRequest(f"this adapter cannot be served: {exc}", param="path") from exc
            version.load_seconds = time.monotonic() - started
            try:
                self._check_room(name)  # again: a load of another name may have been published meanwhile
            except Conflict:
                await self._discard(version)
                raise
            self._publish(version)
            await self.collect()
            return version

    def _check_room(self, name: str) -> None:
        if name not in self._live and len(self._live) >= self.max_adapters:
            raise Conflict(f"{self.max_adapters} adapters are loaded, the limit; unload one first", param="name")

    async def _attach_on_worker(self, version: AdapterVersion, checked: CheckedAdapter, weights) -> None:
        """The worker runs a queued job even when its caller gives up (a load cancelled at shutdown or
        with its client): what it attached then is never published, so it is retired for collect."""
        job = asyncio.ensure_future(
            self._run_on_worker(lambda: self._attach(version.key, lora_config(checked), weights))
        )
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(lambda done: self._collect_orphan(version, done))
            raise

    def _collect_orphan(self, version: AdapterVersion, job: asyncio.Future) -> None:
        if not job.cancelled() and job.exception() is None:  # else nothing was attached
            asyncio.ensure_future(self._discard(version))

    async def _discard(self, version: AdapterVersion) -> None:
        """Detach an attached version that will never be published."""
        self._retire(version)
        await self.collect()

    async def unload(self, name: str) -> AdapterVersion:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            version = self._live.pop(name, None)
            if version is None:
                raise not_loaded(name, param="name")
            self._retire(version)
            await self.collect()
            return version

    async def collect(self) -> None:
        """Detach retired versions that no request holds any more."""
        with self._refs_lock:
            idle = [v for v in self._retired if v.refs <= 0 and not v.detaching]
            for version in idle:
                version.detaching = True
        try:
            for version in idle:  # a version leaves the retired list only once detached: a failure is retried later
                try:
                    await self._run_on_worker(lambda key=version.key: self._detach(key))
                except Exception:  # the unload itself succeeded (no request reaches it): log, go on with the others
                    log.exception("detaching %s failed; the next collect retries it", version.key)
                    continue
                with self._refs_lock:
                    self._retired.remove(version)
        finally:  # also when cancelled midway: whatever is still retired is tried again
            for version in idle:
                version.detaching = False

    def _check_and_read(self, path: str) -> tuple[CheckedAdapter, object]:
        directory = resolve_under_root(self.root, path)
        checked = check_adapter_dir(directory, self.root, self.base, max_rank=self.max_rank, max_bytes=self.max_bytes)
        return checked, self._read_weights(checked)

    def _new_version(self, name: str, path: str, checked: CheckedAdapter, started: float) -> AdapterVersion:
        manifest = checked.manifest
        version = manifest.version if manifest else checked.sha256[:12]
        return AdapterVersion(
            name=name,
            version=version,
            key=f"{name}__{next(self._keys)}",
            path=path,
            rank=checked.lora.r,
            template=self._template_of(manifest),
            eos_token=manifest.eos_token if manifest else None,
            stop=tuple(manifest.stop) if manifest else (),
            manifest=manifest,
            loaded_at=time.time(),
            load_seconds=0.0,
        )

    def _template_of(self, manifest: AdapterManifest | None) -> PromptTemplate:
        if manifest is None:
            return self.default_template
        try:
            return PromptTemplate(name=manifest.template.name, text=manifest.template.text)
        except TemplateError as exc:
            raise BadRequest(f"manifest template is unusable: {exc}", param="path") from exc

    def _publish(self, version: AdapterVersion) -> None:
        old = self._live.get(version.name)
        self._live[version.name] = version
        if old is not None:
            self._retire(old)

    def _retire(self, version: AdapterVersion) -> None:
        with self._refs_lock:
            version.retired = True
            self._retired.append(version)


def not_loaded(name: str, *, param: str = "adapter_id") -> NotFound:
    return NotFound(f"adapter {name!r} is not loaded", param=param)


def default_template(name: str) -> PromptTemplate:
    if name not in BUILTIN:
        raise ServeError(f"unknown default template {name!r}")
    return BUILTIN[name]
