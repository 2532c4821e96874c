"""HF generate: hf_peft (PEFT's mixed-batch adapter_names), hf_static (a static, compiled cache), and the
generate calls the Unsloth child makes too.

HF batches cannot seed each row: a sampled scenario seeds torch once per call (the same draw every wave).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from bench.engine_bench.measure import (
    TTFT_REPS,
    Measured,
    MethodResult,
    decode_record,
    record_scenario,
    release_cuda_memory,
    repeat_waves,
    sync,
    ttft_record,
)
from bench.engine_bench.workload import (
    TEMPERATURE,
    TOP_P,
    Scenario,
    Workload,
    adapter_name,
    distinct_adapters,
    new_tokens,
    prompts,
    row_adapters,
)


class StepClock:
    """A logits processor that only notes when each step's logits exist (HF has no per-step hook).

    On CUDA it records events on the stream instead of synchronizing: transformers defers its stop check
    so the host can run ahead, and a sync per step here would slow down the method being measured.
    """

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.marks: list = []
        self.start = self._mark()

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def __call__(self, input_ids, scores):
        self.marks.append(self._mark())
        return scores

    def seconds(self) -> list[float]:
        """Seconds from the start to each step's logits; call after the generate call returned."""
        if not self.cuda:
            return [m - self.start for m in self.marks]
        sync()
        return [self.start.elapsed_time(m) / 1000 for m in self.marks]


@dataclass
class HFRun:
    token_ids: list[list[int]]  # [B][new tokens]
    wall: float
    step_seconds: list[float]  # from the call to each step's logits (one extra: HF's deferred stop check)


def sampling_kwargs(sampled: bool, seed: int) -> dict:
    """generate's sampling arguments; sampling also seeds torch's global generator, which every row draws from."""
    if not sampled:
        return {"do_sample": False}
    torch.manual_seed(seed)
    return {"do_sample": True, "temperature": TEMPERATURE, "top_p": TOP_P, "top_k": 0}


def hf_generate(
    model,
    batch: torch.Tensor,
    *,
    new: int,
    pad_id: int,
    adapter_names: list[str] | None = None,
    sampled: bool = False,
    seed: int = 0,
    **extra,
) -> HFRun:
    """One static batch of equal-length prompts (no padding). eos_token_id=None: EOS neither stops a row
    nor is suppressed (min_new_tokens alone would forbid EOS, where our engine just carries on).
    top_k=0 when sampling: generate's default top_k of 50 would otherwise cut in before top_p."""
    from transformers import LogitsProcessorList

    ids = batch.to(model.device)  # [B, S]
    kwargs = dict(extra, adapter_names=adapter_names) if adapter_names else extra
    kwargs.update(sampling_kwargs(sampled, seed))
    sync()
    started, clock = time.perf_counter(), StepClock()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        eos_token_id=None,
        pad_token_id=pad_id,
        logits_processor=LogitsProcessorList([clock]),
        **kwargs,
    )  # [B, S + new]
    sync()
    wall = time.perf_counter() - started
    return HFRun(out[:, ids.shape[1] :].tolist(), wall, clock.seconds())


def hf_decode_record(run: HFRun, *, new: int, distinct: int) -> dict:
    steps = run.step_seconds[:new]
    streams = len(run.token_ids)
    tpot = (steps[-1] - steps[0]) / (new - 1) if new > 1 else None
    return decode_record(
        streams=streams,
        distinct=distinct,
        tokens=sum(len(r) for r in run.token_ids),
        wall=run.wall,
        ttfts=[steps[0]] * streams,
        tpots=[tpot] * streams if tpot else [],
    )


def hf_ttft(generate_one) -> list[float]:
    """TTFT reps of a one-token generate; the first call is a warm-up for this prompt length."""
    generate_one()
    return [generate_one().wall for _ in range(TTFT_REPS)]


def peft_model(work: Workload):
    """The base model wrapped by PEFT with every adapter loaded; `.unload()` gives the plain model back."""
    from peft import get_peft_model, set_peft_model_state_dict

    wrapped = None
    for name, state in work.adapters.items():
        if wrapped is None:
            wrapped = get_peft_model(work.model, work.lora_config, adapter_name=name)
        else:
            wrapped.add_adapter(name, work.lora_config)
        result = set_peft_model_state_dict(wrapped, state, adapter_name=name)
        missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]  # others' keys show too
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"adapter {name} did not load: missing {missing[:2]}, unexpected {result.unexpected_keys[:2]}"
            )
    return wrapped.eval()


def run_hf_scenario(model, work: Workload, scenario: Scenario, **extra) -> Measured:
    """Mixed rows via adapter_names; base rows with the adapters disabled (no per-row hooks at all)."""
    pad_id = work.tokenizer.pad_token_id
    names = None if scenario.adapters == "none" else row_adapters(work, scenario)
    batch, new = prompts(work, scenario), new_tokens(work, scenario)
    sampling = {"sampled": scenario.sampled, "seed": work.seed}

    def once() -> HFRun:
        if names is None:
            with model.disable_adapter():
                return hf_generate(model, batch, new=new, pad_id=pad_id, **sampling, **extra)
        return hf_generate(model, batch, new=new, pad_id=pad_id, adapter_names=names, **sampling, **extra)

    if scenario.ttft_only:
        return ttft_record(batch.shape[1], hf_ttft(once)), []

    def wave() -> Measured:
        run = once()
        return hf_decode_record(run, new=new, distinct=distinct_adapters(work, scenario)), run.token_ids

    return repeat_waves(wave, work.waves)


def hf_warmup(model, work: Workload) -> float:
    started = time.perf_counter()
    batch = prompts(work, Scenario("warmup", 2))
    names = [adapter_name(i % len(work.adapters)) for i in range(2)]
    hf_generate(model, batch, new=4, pad_id=work.tokenizer.pad_token_id, adapter_names=names)
    return time.perf_counter() - started


def run_hf_peft(model, work: Workload) -> MethodResult:
    result = MethodResult(warmup_s=hf_warmup(model, work))
    for scenario in work.scenarios:
        record_scenario(result, scenario.name, lambda s=scenario: run_hf_scenario(model, work, s))
    return result


# -- hf_static ----------------------------------------------------------------------------------------------------
def dynamo_frames() -> int | None:
    """Frames dynamo has compiled so far: a rise during a measured call means it recompiled there."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # a private counter; only a diagnostic
        return None


def run_hf_static(model, work: Workload, *, adapters: str) -> MethodResult:
    """Each batch shape compiles anew: the first call per scenario is its warm-up, reported apart.
    Mixed adapters go through PEFT's per-row hooks inside the compiled forward; where that fails, the
    scenario runs again on the base model (adapters disabled) and its record says so."""
    import torch._dynamo

    # Every batch size and adapter_names list is another compiled variant: past the default limit (8)
    # dynamo falls back to eager without a word, and later scenarios would measure that.
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 64))
    note = None if adapters == "mixed" else "base model, adapters disabled (--hf-static-adapters none)"
    result = MethodResult(note=note)
    for scenario in work.scenarios:
        base = dataclasses.replace(scenario, adapters="none")
        first = scenario if adapters == "mixed" else base
        record_scenario(result, scenario.name, lambda s=first, b=base: static_with_fallback(model, work, s, base=b))
    fell_back = [n for n, r in result.scenarios.items() if r.get("fallback")]
    if fell_back:
        result.note = f"mixed adapters failed under compile in {fell_back}: those ran on the base model"
    return result


def static_with_fallback(model, work: Workload, scenario: Scenario, *, base: Scenario) -> Measured:
    try:
        return static_scenario(model, work, scenario)
    except Exception as exc:  # e.g. dynamo cannot trace the hooks; recorded below
        if scenario.adapters == "none":
            raise
        release_cuda_memory()
        record, _ = static_scenario(model, work, base)
        record["fallback"] = f"base model, adapters disabled: mixed failed with {type(exc).__name__}: {exc}"
        return record, []  # not the requested workload: keep its tokens out of any comparison


def static_scenario(model, work: Workload, scenario: Scenario) -> Measured:
    started = time.perf_counter()
    run_hf_scenario(model, dataclasses.replace(work, waves=1), scenario, cache_implementation="static")
    warmup = time.perf_counter() - started
    frames = dynamo_frames()
    record, ids = run_hf_scenario(model, work, scenario, cache_implementation="static")
    after = dynamo_frames()
    record.update(warmup_s=warmup, recompiled_in_measure=None if frames is None else after > frames)
    return record, ids
