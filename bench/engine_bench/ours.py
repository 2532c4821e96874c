"""Ours: server.engine.engine on the workload's model, every stream of a scenario submitted at once."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

from bench.engine_bench.measure import (
    TTFT_REPS,
    Measured,
    MethodResult,
    decode_record,
    keep,
    median_wave,
    ttft_record,
)
from bench.engine_bench.workload import (
    TEMPERATURE,
    TOP_P,
    Scenario,
    Workload,
    distinct_adapters,
    new_tokens,
    prompts,
    row_adapters,
)


@dataclass
class StreamRun:
    token_ids: list[int]
    ttft: float  # from the scenario's start (all streams submitted at once)
    last: float
    generated_tokens: int


def sampling_params(scenario: Scenario, *, new: int, row: int):
    """Greedy, or sampled with request `row` seeded by its index (as vLLM's are)."""
    from server.engine.sampling import SamplingParams

    if not scenario.sampled:
        return SamplingParams(max_new_tokens=new, stop_token_ids=())
    return SamplingParams(
        max_new_tokens=new, do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, seed=row, stop_token_ids=()
    )


async def ours_stream(engine, prompt_ids: list[int], params, adapter_key: str | None, started: float) -> StreamRun:
    from server.engine.events import ErrorEvent, FinalEvent, TokenEvent

    ids, first, last = [], None, None
    async for event in engine.generate(prompt_ids, params, adapter_key):
        now = time.perf_counter()
        if isinstance(event, TokenEvent):
            ids.append(event.id)
            first, last = first or now, now
        elif isinstance(event, ErrorEvent):
            raise RuntimeError(f"engine error: {event.message}")
        elif isinstance(event, FinalEvent):
            if first is None:
                raise RuntimeError("stream finished without a token")
            return StreamRun(ids, first - started, last - started, event.generated_tokens)
    raise RuntimeError("stream ended without a final event")


async def ours_batch(
    engine, work: Workload, scenario: Scenario, *, new: int | None = None
) -> tuple[list[StreamRun], float]:
    new = new or new_tokens(work, scenario)
    batch, keys = prompts(work, scenario).tolist(), row_adapters(work, scenario)
    started = time.perf_counter()
    streams = (
        ours_stream(engine, p, sampling_params(scenario, new=new, row=i), k, started)
        for i, (p, k) in enumerate(zip(batch, keys))
    )
    # return_exceptions: a failed stream must not leave the others running into the next scenario
    runs = await asyncio.gather(*streams, return_exceptions=True)
    wall = time.perf_counter() - started
    failed = next((r for r in runs if isinstance(r, BaseException)), None)
    if failed:
        raise failed
    return list(runs), wall


async def ours_wave(engine, work: Workload, scenario: Scenario) -> Measured:
    runs, wall = await ours_batch(engine, work, scenario)
    new = new_tokens(work, scenario)
    tpots = [(r.last - r.ttft) / (new - 1) for r in runs if new > 1]
    record = decode_record(
        streams=scenario.streams,
        distinct=distinct_adapters(work, scenario),
        tokens=sum(r.generated_tokens for r in runs),
        wall=wall,
        ttfts=[r.ttft for r in runs],
        tpots=tpots,
    )
    record["short_rows"] = sum(1 for r in runs if len(r.token_ids) != new)
    return record, [r.token_ids for r in runs]


async def ours_scenario(engine, work: Workload, scenario: Scenario) -> Measured:
    if scenario.ttft_only:
        await ours_batch(engine, work, scenario)  # warm-up for this prompt length, as for HF
        ttfts = [(await ours_batch(engine, work, scenario))[0][0].ttft for _ in range(TTFT_REPS)]
        return ttft_record(work.ttft_len, ttfts), []
    return median_wave([await ours_wave(engine, work, scenario) for _ in range(max(work.waves, 1))])


async def run_ours_async(work: Workload, result: MethodResult, *, cuda_graphs: bool, decode_kernel: bool) -> None:
    from server.engine.engine import Engine
    from server.engine.runner import ModelRunner

    started = time.perf_counter()
    runner = ModelRunner(
        work.model,
        work.tokenizer,
        backend="transformers",
        max_context=work.max_context,
        kv_slots=work.max_streams,
        adapter_slots=len(work.adapters),
        max_lora_rank=work.lora_config.r,
        cuda_graphs=cuda_graphs,
    )
    if not decode_kernel:  # ours_sdpa: the A/B of the split-KV decode kernel (it is on by itself on CUDA)
        runner.decoder.use_decode_attention_kernel(enabled=False)
    engine = Engine(
        runner, max_running=work.max_streams, max_queue=10_000, prefill_chunk_tokens=work.prefill_chunk_tokens
    )
    engine.start()
    try:
        for name, state in work.adapters.items():
            await engine.call(lambda n=name, s=state: runner.attach(n, work.lora_config, dict(s)))
        await engine.call(runner.warm_up)  # graphs captured and kernels compiled before timing, as the server does
        result.startup_s = time.perf_counter() - started  # the model is in memory already: not a load from disk
        started = time.perf_counter()
        await ours_batch(engine, work, Scenario("warmup", 2), new=4)
        result.warmup_s = time.perf_counter() - started
        for scenario in work.scenarios:
            try:
                record, ids = await ours_scenario(engine, work, scenario)
            except Exception as exc:  # same policy as measure.record_scenario
                result.scenarios[scenario.name] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"  {scenario.name}: failed: {result.scenarios[scenario.name]['error']}", file=sys.stderr)
                continue
            keep(result, scenario.name, record, ids)
    finally:
        engine.stop()


def run_ours(work: Workload, *, cuda_graphs: bool = True, decode_kernel: bool = True) -> MethodResult:
    result = MethodResult()
    asyncio.run(run_ours_async(work, result, cuda_graphs=cuda_graphs, decode_kernel=decode_kernel))
    return result
