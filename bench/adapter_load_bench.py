"""Where an 8B adapter's load spends its time, and how much of it the engine's worker (every stream's next step)
waits for: the host copy (checked, scaled, cast; on the load's own thread since 2026-12-08) against `keep` (on the
worker: pinned in blocks on a GPU, the slots laid out). No model: the slots are built from Llama-3-8B's projection
shapes, rank 16 on all 7 projections (84 MB in bf16, 448 tensors), on CUDA when there is one.

    python -m bench.adapter_load_bench [--adapters 8] [--rank 16] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.gpu_train_bench import LLAMA3_8B
from contract.lora import PROJECTIONS
from server.engine.lora_slots import LoraSlots


def projection_shapes_8b() -> dict[tuple[int, str], tuple[int, int]]:
    """(layer, projection) → (in, out) of the Llama-3-8B shape."""
    hidden, inter = LLAMA3_8B["hidden_size"], LLAMA3_8B["intermediate_size"]
    kv = hidden // LLAMA3_8B["num_attention_heads"] * LLAMA3_8B["num_key_value_heads"]
    sizes = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    return {(layer, p): sizes[p] for layer in range(LLAMA3_8B["num_hidden_layers"]) for p in PROJECTIONS}


def state_dict(shapes, *, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """PEFT's keys, random bf16 A and B (as read from an adapter's safetensors)."""
    gen = torch.Generator().manual_seed(seed)
    module = {p: ("self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for p in PROJECTIONS}
    state = {}
    for (layer, proj), (fan_in, fan_out) in shapes.items():
        name = f"base_model.model.model.layers.{layer}.{module[proj]}.{proj}"
        state[f"{name}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) / fan_in**0.5).bfloat16()
        state[f"{name}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * 0.1).bfloat16()
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = projection_shapes_8b()
    slots = LoraSlots(shapes, slots=args.adapters, device=device, dtype=torch.bfloat16)
    copies, keeps = [], []
    for index in range(args.adapters):
        weights = state_dict(shapes, rank=args.rank, seed=index)
        started = time.perf_counter()
        adapter = slots.host_copy(rank=args.rank, scaling=2.0, state_dict=weights)
        copied = time.perf_counter()
        slots.keep(f"a{index}", adapter)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        copies.append(copied - started)
        keeps.append(time.perf_counter() - copied)
    megabytes = sum(t.nbytes for t in weights.values()) / 1e6
    print(f"{args.adapters} adapters of {megabytes:.0f} MB ({len(weights)} tensors), rank {args.rank}, on {device}")
    for label, times in (("host copy (the load's thread)", copies), ("keep (the worker)", keeps)):
        print(
            f"  {label:<30} median {statistics.median(times) * 1e3:7.1f} ms  "
            f"min {min(times) * 1e3:7.1f}  max {max(times) * 1e3:7.1f}  first {times[0] * 1e3:7.1f}"
        )
    print("  (the first keep lays out the slots' device buffers)")
    share = statistics.median(keeps) / (statistics.median(keeps) + statistics.median(copies))
    print(f"  the worker's share of a load (medians): {share:.0%} (all of it before 2026-12-08)")


if __name__ == "__main__":
    main()
