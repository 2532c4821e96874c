"""The loaded model with the engine-owned state around it: KV cache slots and LoRA slots.

The backend is contract.backend's choice, shared with training; the `import unsloth` that must come
before transformers happens there, once, when the Unsloth backend is chosen (CUDA and the package
present, or asked for), and this module's Unsloth loader runs only after it. Unsloth is the loader
there (its fast 16-bit and 4-bit loading); the forward pass is always our decoder, which reads the base
weights through the model's modules and applies every row's adapter itself (Unsloth's fused decode
ignores per-row adapters: DESIGN.md). Every method must be called from the engine's worker thread, but
`host_copy`, which touches no device and no engine state (a load's reading thread calls it).

Adapters arrive as a contract AdapterConfig and a state dict we read and checked ourselves (never a path
handed to a loader that might fall back to pickle); they are never merged into the base weights.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from contract.backend import choose_backend
from contract.base_config import position_limit
from contract.lora import AdapterConfig, lora_scaling
from server.engine import sampling
from server.engine.cuda_graphs import DecodeGraphs
from server.engine.decoder import Decoder, Step, check_architecture, head_dim, projection_shapes
from server.engine.faults import FaultPlan
from server.engine.fused import Kernels
from server.engine.kv_cache import SlotKVCache, bytes_per_slot, plan_slots
from server.engine.lora_slots import HostAdapter, LoraSlots
from server.engine.piecewise_graphs import PiecewiseGraphs
from server.engine.projections import GROUPS, all_fused, layer_projections

log = logging.getLogger("loraserve.runner")


@dataclass(frozen=True)
class RunnerFacts:
    """What the server tells clients of the loaded model (/info), fixed once it is loaded."""

    backend: str
    device: str
    kv_slots: int
    max_context: int
    cuda_graphs: bool


class ModelRunner:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        backend: str,
        max_context: int,
        kv_slots: int,
        adapter_slots: int,
        max_lora_rank: int = 256,
        kv_memory_fraction: float = 0.9,
        cuda_graphs: bool = True,
        compile_kernels: bool = True,
        faults: FaultPlan | None = None,
    ) -> None:
        check_architecture(model.config)
        self.faults = faults or FaultPlan()
        self.model, self.tokenizer, self.backend = model, tokenizer, backend
        self.device = next(model.parameters()).device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.max_context = max_context
        self.max_lora_rank = max_lora_rank
        config = model.config
        kv = dict(
            layers=config.num_hidden_layers,
            kv_heads=config.num_key_value_heads,
            head_dim=head_dim(config),
            max_len=max_context,
        )
        slots = plan_slots(
            kv_slots,
            per_slot=bytes_per_slot(**kv, dtype=self.dtype),
            device=self.device,
            memory_fraction=kv_memory_fraction,
        )
        self.cache = SlotKVCache(**kv, slots=slots, device=self.device, dtype=self.dtype)
        projections = [layer_projections(layer) for layer in model.model.layers]  # fuses q/k/v and gate/up
        self.lora = LoraSlots(
            projection_shapes(model),
            slots=adapter_slots,
            device=self.device,
            dtype=self.dtype,
            groups=GROUPS,
            room=lambda layer, group: projections[layer][group],  # the shrink rides in the base GEMM
        )
        kernels = Kernels(compiled=compile_kernels and self.device.type == "cuda")
        self.decoder = Decoder(model, cache=self.cache, lora=self.lora, kernels=kernels, projections=projections)
        graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs = DecodeGraphs(self.decoder) if graphs else None
        # Steps with prompt chunks, on plain 16/32-bit weights only: with a 4-bit base the GPU test of mixed
        # batches failed in the one run it had with them (bench/results/gpu-2026-12-02-piecewise): until that is
        # understood its prefill stays eager, as it was when that test passed.
        self.pieces = PiecewiseGraphs(self.decoder) if graphs and all_fused(projections) else None
        log.info(
            "KV cache: %d slots × %d positions; %d adapter slots; CUDA graphs %s (prefill steps: %s)",
            slots,
            max_context,
            adapter_slots,
            "on" if self.graphs else "off",
            "piecewise" if self.pieces else "eager",
        )

    def forward(self, step: Step) -> torch.Tensor:
        """Logits [R, V] of the step: a CUDA graph replay for decode-only steps, a piecewise replay for steps
        with prompt chunks, where possible; else the eager pass."""
        self.faults.before_forward(decode_rows=step.decode_rows, prompt_chunks=len(step.chunks))
        for graphs in (self.graphs, self.pieces):
            logits = graphs.forward(step) if graphs else None
            if logits is not None:
                return logits
        return self.decoder.forward(step)

    def warm_up(self) -> None:
        """Capture the decode graphs of every batch size at the shortest span, the piecewise graphs of every
        token bucket (with the adapters' terms when adapters are attached), and compile the fused kernels
        now, so that no request waits for it. Other spans, and base-only prefills beside adapters, are
        captured when first needed."""
        spent = {}  # seconds per part, logged: start-up time is a target (bench/gpu/README.md)
        with _timed(spent, "decode graphs"):
            if self.graphs:
                self.graphs.warm_up()
        with _timed(spent, "prefill graphs"):
            if self.pieces:
                self.pieces.warm_up(with_lora=self.lora.rank > 0)
        with _timed(spent, "sampler"):
            if self.device.type == "cuda":
                sampling.warm_up(self.model.get_output_embeddings().weight.shape[0], self.device)
        log.info("warm-up: %s", ", ".join(f"{part} {seconds:.1f} s" for part, seconds in spent.items()))

    def facts(self) -> RunnerFacts:
        return RunnerFacts(
            backend=self.backend,
            device=str(self.device),
            kv_slots=self.cache.slots,
            max_context=self.max_context,
            cuda_graphs=self.graphs is not None,
        )

    def numbers(self) -> dict[str, float]:
        """The runner's gauges and counters for /metrics, by metric name."""
        lora = self.lora
        return {
            "loraserve_adapter_uploads": lora.uploads,
            "loraserve_kv_slots": self.cache.slots,
            "loraserve_kv_slots_used": self.cache.used,
            "loraserve_adapter_slots_resident": len(lora.resident),
            "loraserve_adapter_slots_pinned": sum(list(lora.pins.values())),
            "loraserve_adapters_in_host_memory": len(lora.host),
            "loraserve_adapter_host_bytes": lora.host_bytes,
            "loraserve_adapter_device_bytes": lora.device_bytes,
            "loraserve_device_allocated_bytes": self.device_allocated_bytes,
        }

    @property
    def device_allocated_bytes(self) -> int:
        """What the CUDA caching allocator holds for tensors (0 on a CPU: RSS tells the host's story)."""
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    @property
    def attached(self) -> set[str]:
        return set(self.lora.host)

    def attach(self, key: str, lora_config: AdapterConfig, state_dict: dict[str, torch.Tensor]) -> None:
        """Keep adapter `key` ready to serve: `host_copy` then `keep`, in one call (on the worker)."""
        self.keep(key, self.host_copy(lora_config, state_dict))

    def host_copy(self, lora_config: AdapterConfig, state_dict: dict[str, torch.Tensor]) -> HostAdapter:
        """The adapter's host copy (checked, scaled, cast), made on the caller's thread: a server builds it off the
        worker, so a load does not stall the running streams. Raises ValueError when it does not fit this model
        or this server's rank limit."""
        rank = int(lora_config.r)
        if rank > self.max_lora_rank:
            raise ValueError(f"rank {rank} is over this server's limit of {self.max_lora_rank}")
        return self.lora.host_copy(rank=rank, scaling=lora_scaling(lora_config), state_dict=state_dict)

    def keep(self, key: str, adapter: HostAdapter) -> None:
        """On the worker: adapter `key` ready to serve, a device slot when a request needs it."""
        self.faults.before_attach()
        started = time.perf_counter()
        self.lora.keep(key, adapter)
        log.info("adapter %s: kept on the worker in %.2f s", key, time.perf_counter() - started)

    def detach(self, key: str) -> None:
        self.lora.remove(key)


def load_runner(
    base_model: str,
    *,
    backend: str,
    load_in_4bit: bool,
    dtype: str = "auto",
    max_context: int = 4096,
    kv_slots: int = 4,
    adapter_slots: int = 8,
    max_lora_rank: int = 256,
    kv_memory_fraction: float = 0.9,
    cuda_graphs: bool = True,
    compile_kernels: bool = True,
    faults: FaultPlan | None = None,
) -> ModelRunner:
    started = time.perf_counter()  # the backend's imports count: they are part of what start-up costs
    backend = choose_backend(backend)
    if load_in_4bit and backend != "unsloth":  # serving full precision instead could run out of memory
        raise RuntimeError(
            "a 4-bit base (LOAD_IN_4BIT) is loaded by Unsloth: it needs the unsloth backend "
            "(CUDA and pip install 'loraserve[unsloth]')"
        )
    max_context = min(max_context, position_limit(base_model) or 2048)
    cuda = torch.cuda.is_available()
    early = build_kernels_early(base_model, _cuda_dtype(dtype, backend)) if cuda else None
    try:
        if backend == "unsloth":
            model, tokenizer = _load_unsloth(
                base_model, load_in_4bit=load_in_4bit, max_context=max_context, dtype=_torch_dtype(dtype)
            )
        else:
            model, tokenizer = _load_transformers(base_model, dtype=_torch_dtype(dtype))
    finally:  # also after a failed load: nothing of ours may still run on the GPU as the process ends
        loaded = time.perf_counter()
        if early is not None:
            early.join()
    if early is not None:
        waited = time.perf_counter() - loaded
        if waited >= 0.05:
            log.info("waited %.1f s after the model load for the kernels built beside it", waited)
        torch.cuda.empty_cache()  # the KV cache is sized by the memory free next: the thread's blocks are free
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    built = time.perf_counter()
    runner = ModelRunner(
        model,
        tokenizer,
        backend=backend,
        max_context=max_context,
        kv_slots=kv_slots,
        adapter_slots=adapter_slots,
        max_lora_rank=max_lora_rank,
        kv_memory_fraction=kv_memory_fraction,
        cuda_graphs=cuda_graphs,
        compile_kernels=compile_kernels,
        faults=faults,
    )
    log.info("model loaded in %.1f s, engine state built in %.1f s", loaded - started, time.perf_counter() - built)
    return runner


def build_kernels_early(base_model: str, dtype: torch.dtype, device=None) -> threading.Thread | None:
    """Our Triton kernels built in a thread of their own while the model loads (on a machine without their compiled
    cache that is seconds: the sampler's part of the warm-up took 4.9 s on an H100, 2026-12-08, and the decoder's
    kernel checks run within the engine state's 3.1 s), where the load is seconds of reading files. What they
    need is in the config: the vocabulary's size (the sampler's logits) and the heads' shape (the q/k/v epilogue
    and decode attention). This only builds: the sampler's warm-up and the decoder's checks, after the load, decide
    whether each kernel serves, and then find it built. `dtype` is the model's, as its loader will pick it. None
    without Triton (the unfused paths serve) or where the config gives no vocabulary size."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_model)
    if not getattr(config, "vocab_size", None):
        return None
    device = torch.device(device or "cuda")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # a new thread's current device is not ours
    try:  # imported here, not in the thread beside the loader's own imports
        sampling.load_kernels()
        from server.engine import decode_attention, qkv_kernel  # noqa: F401
    except ImportError:  # no Triton: nothing to build
        return None
    thread = threading.Thread(target=_build_kernels, args=(config, device, dtype), name="kernels-early", daemon=True)
    thread.start()
    return thread


def _build_kernels(config, device: torch.device, dtype: torch.dtype) -> None:
    from server.engine import decode_attention, qkv_kernel

    def head_shape() -> dict[str, int]:  # read inside each part's try: a config may lack a field
        return dict(heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, head_dim=head_dim(config))

    parts = {
        "sampler": lambda: sampling.build_kernels(int(config.vocab_size), device),
        "q/k/v": lambda: qkv_kernel.serves_here(device, dtype, **head_shape()),
        "decode attention": lambda: decode_attention.serves_here(device, dtype, **head_shape()),
    }
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        for part, build in parts.items():
            started = time.perf_counter()
            try:
                built = build()
            except Exception:  # built (and checked) again where it is used, and fails loudly there if it must
                log.exception("building the %s kernels during the model load failed", part)
                continue
            took = time.perf_counter() - started
            if built:
                log.info("%s kernels built during the model load in %.1f s", part, took)
            else:  # a check that does not apply here, or differs: the engine's own check says which, later
                log.info("%s kernels: nothing built during the model load (%.1f s)", part, took)


def _cuda_dtype(setting: str, backend: str) -> torch.dtype:
    """The dtype the loader of `backend` picks on this GPU for a dtype setting (auto: bf16 where the GPU has it;
    else Unsloth takes fp16 and transformers fp32)."""
    named = _torch_dtype(setting)
    if named is not None:
        return named
    if backend == "unsloth":
        return torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    return _transformers_dtype(cuda=True)


def _transformers_dtype(*, cuda: bool) -> torch.dtype:
    return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32


@contextmanager
def _timed(spent: dict[str, float], part: str):
    started = time.perf_counter()
    yield
    spent[part] = time.perf_counter() - started


def _torch_dtype(name: str) -> torch.dtype | None:
    """The dtype a setting names; None for auto (each loader picks its own)."""
    return None if name == "auto" else getattr(torch, name)


def _load_unsloth(base_model: str, *, load_in_4bit: bool, max_context: int, dtype: torch.dtype | None):
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=base_model, max_seq_length=max_context, dtype=dtype, load_in_4bit=load_in_4bit
    )
    FastLanguageModel.for_inference(model)
    return model, tokenizer


def _load_transformers(base_model: str, *, dtype: torch.dtype | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    if dtype is None:
        dtype = _transformers_dtype(cuda=cuda)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    # Straight onto the GPU: through host memory an 8B model takes minutes to load.
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype, device_map="cuda" if cuda else None)
    return model.eval(), tokenizer
