"""The memory roofline of decode (DESIGN.md, Performance method): bytes a step reads over a copy bandwidth."""

from __future__ import annotations

import time

import torch

from bench.engine_bench.measure import MethodResult, release_cuda_memory, sync
from bench.engine_bench.workload import Workload, device, distinct_adapters


def copy_bandwidth(*, quick: bool) -> dict:
    """(read + write bytes) / time of a large device-to-device copy, as DESIGN.md measured 3.02 TB/s."""
    size = (64 if quick else 256) * 2**20 if device().type == "cpu" else 2 * 2**30
    src = torch.empty(size, dtype=torch.uint8, device=device())
    dst = torch.empty_like(src)
    dst.copy_(src)
    iters = 5 if device().type == "cpu" else 20
    sync()
    started = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync()
    seconds = time.perf_counter() - started
    del src, dst
    release_cuda_memory()
    return {"bytes_per_copy": size, "iters": iters, "seconds": seconds, "GB_per_s": 2 * size * iters / seconds / 1e9}


def weight_bytes(model) -> int:
    """Parameter bytes a decode step reads: all but the input embedding table (only looked up, unless tied)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # shared tensors counted once
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embed.data_ptr() != head.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total


def kv_bytes_per_token(model) -> int:
    """K and V of one token over all layers."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype_bytes = torch.finfo(next(model.parameters()).dtype).bits // 8
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * dtype_bytes


def adapter_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def roofline(work: Workload, *, bandwidth: float) -> dict:
    """Per decode scenario and number of distinct adapters: bytes read per step and the tok/s they allow.
    A sampled variant reads what its greedy one reads."""
    weights, per_token = weight_bytes(work.model), kv_bytes_per_token(work.model)
    one_adapter = adapter_bytes(next(iter(work.adapters.values())))
    average_context = work.input_len + work.output_len / 2
    out = {
        "weight_bytes": weights,
        "kv_bytes_per_token": per_token,
        "adapter_bytes": one_adapter,
        "average_context": average_context,
        "bandwidth_GB_per_s": bandwidth / 1e9,
        "scenarios": {},
    }
    for s in work.scenarios:
        if s.ttft_only:
            continue  # prefill is compute-bound: a memory roofline says nothing there
        # this scenario's own count; 1: Unsloth runs every row under one adapter; 0: hf_static's fallback
        out["scenarios"][s.name] = {"streams": s.streams, "distinct_adapters": distinct_adapters(work, s)}
        for n in sorted({distinct_adapters(work, s), 1, 0}):
            step = weights + per_token * average_context * s.streams + n * one_adapter
            out["scenarios"][s.name][str(n)] = {"bytes_per_step": step, "tok_s": s.streams * bandwidth / step}
    return out


def add_roofline_pct(methods: dict[str, MethodResult], roof: dict) -> None:
    for result in methods.values():
        for name, record in result.scenarios.items():
            bound = roof["scenarios"].get(name, {}).get(str(record.get("distinct_adapters")))
            if bound and "tok_s" in record:
                record["pct_roofline"] = 100 * record["tok_s"] / bound["tok_s"]
