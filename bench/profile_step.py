"""Where a decode step's time goes: the engine under torch.profiler on a random Llama-3-8B shape.

For 1 / 8 / 64 streams over 8 rank-16 adapters, greedy and sampled (temperature 1, top-p 0.95), it
prints the engine's wall time per step, the GPU's busy time per step, kernels per step, and the
kernels that take the most GPU time. GPU busy time well under wall time means the host is in series.

    python -m bench.profile_step [--streams 1,8,64] [--new 48]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from collections import Counter

import torch

from contract.lora import MLP_PROJECTIONS, PROJECTIONS, AdapterConfig
from server.engine.engine import Engine
from server.engine.events import FinalEvent
from server.engine.runner import ModelRunner
from server.engine.sampling import SamplingParams
from server.settings import ServerSettings

RANK, ADAPTERS, PROMPT = 16, 8, 128


def random_8b():
    """The Llama-3-8B shape with random weights, built on the GPU in bf16, and the tiny model's tokenizer
    (ids past its vocabulary decode to nothing: text does not matter here)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from loraserve.tiny_model import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model())
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    return model, tokenizer


def random_adapter(runner: ModelRunner, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for (layer, proj), (fan_in, fan_out) in runner.lora.shapes.items():
        parent = "mlp" if proj in MLP_PROJECTIONS else "self_attn"
        key = f"base_model.model.model.layers.{layer}.{parent}.{proj}"
        state[f"{key}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=gen) / fan_in**0.5
        state[f"{key}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=gen) * 0.25 / RANK**0.5
    return state


async def wave(engine: Engine, streams: int, new: int, *, sampled: bool) -> float:
    async def one(i: int) -> None:
        params = SamplingParams(max_new_tokens=new, stop_token_ids=())
        if sampled:
            params = dataclasses.replace(params, do_sample=True, temperature=1.0, top_p=0.95, seed=i)
        prompt = torch.randint(4, 700, (PROMPT,)).tolist()
        async for event in engine.generate(prompt, params, f"a{i % ADAPTERS}"):
            if isinstance(event, FinalEvent):
                return

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(streams)))
    return time.perf_counter() - started


def timed(engine: Engine, streams: int, new: int, *, sampled: bool) -> None:
    """Without the profiler (its own cost off): tok/s and wall ms per step (for a host-side sampler)."""
    asyncio.run(wave(engine, streams, new, sampled=sampled))
    steps_before = engine.stats.steps
    wall = asyncio.run(wave(engine, streams, new, sampled=sampled))
    steps = engine.stats.steps - steps_before
    print(
        f"== {streams} streams {'sampled' if sampled else 'greedy'}: {streams * new / wall:.0f} tok/s, "
        f"wall {wall / steps * 1000:.2f} ms/step"
    )


def profile(engine: Engine, streams: int, new: int, *, sampled: bool) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    asyncio.run(wave(engine, streams, new, sampled=sampled))  # warm: graphs for this size
    steps_before = engine.stats.steps
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = asyncio.run(wave(engine, streams, new, sampled=sampled))
    torch.cuda.synchronize()
    steps = engine.stats.steps - steps_before
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_us = sum(e.device_time for e in kernels)
    by_name: Counter = Counter()
    for e in kernels:
        by_name[e.name[:70]] += e.device_time
    label = f"{streams} streams {'sampled' if sampled else 'greedy'}"
    print(
        f"\n== {label}: {streams * new / wall:.0f} tok/s, {steps} steps, wall {wall / steps * 1000:.2f} ms/step, "
        f"GPU busy {busy_us / steps / 1000:.2f} ms/step, {len(kernels) / steps:.0f} kernels/step"
    )
    for name, us in by_name.most_common(12):
        print(f"   {us / steps / 1000:7.3f} ms/step  {name}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", default="1,8,64")
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--plain", action="store_true", help="time only, no torch.profiler")
    args = parser.parse_args()
    sys.setswitchinterval(ServerSettings.model_fields["gil_switch_seconds"].default)  # as the server runs
    model, tokenizer = random_8b()
    runner = ModelRunner(
        model,
        tokenizer,
        backend="transformers",
        max_context=1024,
        kv_slots=64,
        adapter_slots=ADAPTERS,
        max_lora_rank=RANK,
    )
    engine = Engine(runner, max_running=64, max_queue=1000)
    engine.start()
    config = AdapterConfig(r=RANK, lora_alpha=RANK, target_modules=PROJECTIONS)

    async def attach_all() -> None:
        for i in range(ADAPTERS):
            await engine.call(lambda i=i: runner.attach(f"a{i}", config, random_adapter(runner, i)))
        started = time.perf_counter()
        await engine.call(runner.warm_up)
        print(f"warm-up (graphs + compile): {time.perf_counter() - started:.1f} s")

    asyncio.run(attach_all())
    try:
        for streams in (int(s) for s in args.streams.split(",")):
            for sampled in (False, True):
                (timed if args.plain else profile)(engine, streams, args.new, sampled=sampled)
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
