"""Where a decode step's time goes: the engine under torch.profiler on a random Llama-3-8B shape.

For 1 / 8 / 64 streams over 8 rank-16 adapters, greedy and sampled (temperature 1, top-p 0.95), it
prints the engine's wall time per step, the GPU's busy time per step, kernels per step, and the
kernels that take the most GPU time. GPU busy time well under wall time means the host is in series.

    python -m bench.profile_step [--streams 1,8,64] [--new 48] [--top 25] [--no-cudnn-sdp]
    python -m bench.profile_step --prefill 128,512  # one prompt's first token, with an adapter and without
    python -m bench.profile_step --prefill 64 --model tiny   # the same on the CPU (phases only, no kernels)

With --prefill, each first token is also split into host-side phases: submit → first forward call (admission),
the host's time inside forward calls (launching kernels: the device runs behind it), inside the token choice,
waiting for the chosen ids, from the last of those to the client's event (delivery), and the rest.

Each size's first wave (new prompt shapes: eager steps, first-time kernel plans) is timed apart.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from collections import Counter

import torch

from bench.engine_bench.workload import load_model, model_dtype, random_adapter, random_llama3_8b
from contract.lora import PROJECTIONS, AdapterConfig
from server.engine.engine import Engine
from server.engine.events import FinalEvent
from server.engine.runner import ModelRunner
from server.engine.sampling import SamplingParams
from server.settings import ServerSettings

RANK, ADAPTERS, PROMPT = 16, 8, 128


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


def first_wave(engine: Engine, streams: int, new: int, *, sampled: bool) -> None:
    wall = asyncio.run(wave(engine, streams, new, sampled=sampled))
    print(f"-- {streams} streams {'sampled' if sampled else 'greedy'}: first wave {wall:.2f} s")


def timed(engine: Engine, streams: int, new: int, *, sampled: bool, top: int = 0) -> None:
    """Without the profiler (its own cost off): tok/s and wall ms per step (for a host-side sampler)."""
    first_wave(engine, streams, new, sampled=sampled)
    steps_before = engine.stats.steps
    wall = asyncio.run(wave(engine, streams, new, sampled=sampled))
    steps = engine.stats.steps - steps_before
    print(
        f"== {streams} streams {'sampled' if sampled else 'greedy'}: {streams * new / wall:.0f} tok/s, "
        f"wall {wall / steps * 1000:.2f} ms/step"
    )


def profile(engine: Engine, streams: int, new: int, *, sampled: bool, top: int = 12) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    first_wave(engine, streams, new, sampled=sampled)  # and warm: graphs for this size
    steps_before = engine.stats.steps
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = asyncio.run(wave(engine, streams, new, sampled=sampled))
    torch.cuda.synchronize()
    steps = engine.stats.steps - steps_before
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_us = sum(e.device_time for e in kernels)
    by_name: Counter = Counter()
    launches: Counter = Counter()
    for e in kernels:
        by_name[e.name[:90]] += e.device_time
        launches[e.name[:90]] += 1
    label = f"{streams} streams {'sampled' if sampled else 'greedy'}"
    print(
        f"\n== {label}: {streams * new / wall:.0f} tok/s, {steps} steps, wall {wall / steps * 1000:.2f} ms/step, "
        f"GPU busy {busy_us / steps / 1000:.2f} ms/step, {len(kernels) / steps:.0f} kernels/step"
    )
    for name, us in by_name.most_common(top):
        print(f"   {us / steps / 1000:7.3f} ms/step {launches[name] / steps:6.1f}/step  {name}")


def ops(engine: Engine, streams: int, new: int, *, sampled: bool, top: int = 12) -> None:
    """Which operators launch the step's kernels: an eager profile (graphs hide the ops that built them),
    operators by calls per step, with the GPU time of what they launched. Slower than a replay; for
    attribution, not timing. The profiler records the CPU ops of the thread that starts it: the engine's."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    runner = engine.runner
    graphs, pieces = runner.graphs, runner.pieces
    runner.graphs = runner.pieces = None
    prof = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    try:
        first_wave(engine, streams, new, sampled=sampled)
        steps_before = engine.stats.steps
        asyncio.run(engine.call(prof.start))
        asyncio.run(wave(engine, streams, new, sampled=sampled))
        asyncio.run(engine.call(lambda: (torch.cuda.synchronize(), prof.stop())))
    finally:
        runner.graphs, runner.pieces = graphs, pieces
    steps = engine.stats.steps - steps_before
    rows = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    print(f"\n== {streams} streams {'sampled' if sampled else 'greedy'}, eager: operators by calls per step")
    for e in sorted(rows, key=lambda e: -e.count)[:top]:
        gpu_ms = getattr(e, "device_time_total", 0) / steps / 1000
        print(f"   {e.count / steps:7.1f} calls/step {gpu_ms:7.3f} ms/step GPU  {e.key}")


class Phases:
    """Host clocks around the engine's calls while one request runs to its first token (see the module's
    docstring): patched onto the runner, the engine module's choose_tokens and PendingChoices.result."""

    def __init__(self, engine: Engine) -> None:
        import server.engine.engine as engine_module
        from server.engine.sampling import PendingChoices

        self.spent: Counter = Counter()
        self.first_forward = self.last_result = None
        self._undo = []
        self._wrap(engine.runner, "forward", "forward")
        self._wrap(engine_module, "choose_tokens", "choose")
        self._wrap(PendingChoices, "result", "wait for ids")

    def _wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            self.first_forward = self.first_forward or (started if phase == "forward" else None)
            try:
                return original(*args, **kwargs)
            finally:
                self.spent[phase] += time.perf_counter() - started
                if phase == "wait for ids":
                    self.last_result = time.perf_counter()

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def undo(self) -> None:
        for step in self._undo:
            step()

    def line(self, started: float, ended: float) -> str:
        ms = {k: v * 1000 for k, v in self.spent.items()}
        admission = ((self.first_forward or ended) - started) * 1000
        delivery = (ended - (self.last_result or ended)) * 1000
        rest = (ended - started) * 1000 - admission - delivery - sum(ms.values())  # planning, events, the GIL
        return (
            f"admission {admission:.1f} ms, forward (host) {ms.get('forward', 0):.1f}, choice (host) "
            f"{ms.get('choose', 0):.1f}, wait for ids {ms.get('wait for ids', 0):.1f}, delivery {delivery:.1f}, "
            f"rest {rest:.1f}"
        )


def prefill(engine: Engine, length: int, *, top: int) -> None:
    """Time to first token of one `length`-token prompt (one prefill step and the first token's
    choice), with adapter a0 and on the base model: wall time, its host phases (Phases), and on CUDA the
    kernels that take the GPU's time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    async def first_token(adapter: str | None, phases: Phases | None = None) -> float:
        prompt = torch.randint(4, 700, (length,)).tolist()
        started = time.perf_counter()
        async for event in engine.generate(prompt, SamplingParams(max_new_tokens=1, stop_token_ids=()), adapter):
            if isinstance(event, FinalEvent):
                ended = time.perf_counter()
                if phases is not None:
                    print(f"   phases: {phases.line(started, ended)}")
                return ended - started
        raise RuntimeError("no final event")

    for adapter in ("a0", None):
        print(f"\n== prefill {length} tokens, {'adapter a0' if adapter else 'base'}")
        walls = [asyncio.run(first_token(adapter)) for _ in range(4)][1:]  # the first: warm-up
        for _ in range(2):
            phases = Phases(engine)
            try:
                asyncio.run(first_token(adapter, phases))
            finally:
                phases.undo()
        print(f"   wall p50 {sorted(walls)[1] * 1000:.1f} ms (of 3)")
        if not torch.cuda.is_available():
            continue
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            asyncio.run(first_token(adapter))
        torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        by_name: Counter = Counter()
        for e in kernels:
            by_name[e.name[:90]] += e.device_time
        print(f"   GPU busy {sum(e.device_time for e in kernels) / 1000:.1f} ms, {len(kernels)} kernels")
        for name, us in by_name.most_common(top):
            print(f"   {us / 1000:7.3f} ms  {name}")


def tiny_model(spec: str):
    model, tokenizer, _ = load_model(spec, model_dtype())
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", default="1,8,64")
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--plain", action="store_true", help="time only, no torch.profiler")
    parser.add_argument("--top", type=int, default=25, help="kernels listed per profile")
    parser.add_argument("--greedy-only", action="store_true")
    parser.add_argument("--ops", action="store_true", help="an eager profile by operator (what launches what)")
    parser.add_argument(
        "--prefill", default="", help="profile one prompt of this many tokens instead (a comma list: each in turn)"
    )
    parser.add_argument(
        "--prefill-chunk-tokens", type=int, default=ServerSettings.model_fields["prefill_chunk_tokens"].default
    )
    parser.add_argument("--no-cudnn-sdp", action="store_true", help="keep SDPA off cuDNN (a plan per new shape)")
    parser.add_argument("--model", default="llama3-8b-random", help="or tiny (the CPU's random Llama)")
    args = parser.parse_args()
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    sys.setswitchinterval(ServerSettings.model_fields["gil_switch_seconds"].default)  # as the server runs
    model, tokenizer = random_llama3_8b() if args.model == "llama3-8b-random" else tiny_model(args.model)
    runner = ModelRunner(
        model,
        tokenizer,
        backend="transformers",
        max_context=1024,
        kv_slots=64,
        adapter_slots=ADAPTERS,
        max_lora_rank=RANK,
    )
    engine = Engine(runner, max_running=64, max_queue=1000, prefill_chunk_tokens=args.prefill_chunk_tokens)
    engine.start()
    config = AdapterConfig(r=RANK, lora_alpha=RANK, target_modules=PROJECTIONS)

    async def attach_all() -> None:
        for i in range(ADAPTERS):
            await engine.call(lambda i=i: runner.attach(f"a{i}", config, random_adapter(model, rank=RANK, seed=i)))
        started = time.perf_counter()
        await engine.call(runner.warm_up)
        print(f"warm-up (graphs + compile): {time.perf_counter() - started:.1f} s")

    asyncio.run(attach_all())
    try:
        if args.prefill:
            for length in (int(n) for n in args.prefill.split(",")):
                prefill(engine, length, top=args.top)
            return
        for streams in (int(s) for s in args.streams.split(",")):
            for sampled in (False,) if args.greedy_only else (False, True):
                measure = timed if args.plain else ops if args.ops else profile
                measure(engine, streams, args.new, sampled=sampled, top=args.top)
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
