"""In-process engine benchmark: our engine against HF generate + PEFT, HF static cache, and Unsloth, one run.

Same workload for every method: a random-weight Llama, prompts of --input-len random token ids, exactly
--output-len new tokens (EOS never stops a row), greedy, and --adapters random rank-16 LoRA adapters on
the seven projections (B nonzero, so an adapter changes the output). Scenarios:

    bs1                      1 stream, 1 adapter
    streams8/32/64           that many concurrent streams, adapters round-robin (row i gets adapter i % N)
    streams8_base            8 streams, no adapter (the LoRA cost is streams8 against this)
    ttft512                  time to first token of one --ttft-len-token prompt (median of 3)

Methods: hf_peft (generate with PEFT's mixed-batch `adapter_names`, one static batch: how HF serves),
hf_static (the same with cache_implementation="static": transformers compiles the decode step; CUDA only),
unsloth (its own process, since importing it patches transformers; one adapter for every row, as its fused
path ignores per-row adapter names; CUDA only), ours (server.engine.engine with all streams submitted at once).
Speeds are reported as ratios against the baselines of the same run and as % of the memory roofline at
a copy bandwidth measured in the same run (DESIGN.md, Performance method). Prints tables; --json writes all.

Where ours and hf_peft both ran, their tokens are compared per row: at the first that differs, hf_peft's own
logits (its tokens teacher-forced) show whether the two were a near-tie, as rounding in bf16 makes (--dtype;
fp32 on the CPU matches token for token), or far apart, as a bug makes.

    python bench/engine_bench.py --model tiny --quick                       # CPU: hf_peft and ours
    python bench/engine_bench.py --model llama3-8b-random --json out.json   # GPU: all four methods
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from bench.serving import percentile  # noqa: E402

METHODS = ("hf_peft", "hf_static", "unsloth", "ours", "ours_eager")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOWEST_PROMPT_ID = 10  # below: the special tokens of the tiny tokenizer (and most real ones)
TTFT_REPS = 3


@dataclass(frozen=True)
class Scenario:
    name: str
    streams: int
    adapters: str = "mixed"  # "mixed": row i gets adapter i % N; "none": the base model
    ttft_only: bool = False  # one prompt of --ttft-len tokens and one new token: time to first token


SCENARIOS = {s.name: s for s in (
    Scenario("bs1", 1), Scenario("streams8", 8), Scenario("streams32", 32), Scenario("streams64", 64),
    Scenario("streams8_base", 8, adapters="none"), Scenario("ttft512", 1, ttft_only=True),
)}
MATCH_SCENARIO = "streams8"  # its token ids go into the JSON; ours is checked token for token against hf_peft


@dataclass
class Workload:
    """Everything the methods share: the model, its adapters, lengths, and where Unsloth finds them on disk."""

    model: object
    tokenizer: object
    model_dir: Path | None  # None: built in memory (saved only when Unsloth needs it)
    lora_config: object
    adapters: dict[str, dict[str, torch.Tensor]]  # name -> PEFT-format state dict
    input_len: int
    output_len: int
    ttft_len: int
    prompt_high: int  # prompts draw ids from [LOWEST_PROMPT_ID, prompt_high)
    seed: int
    scenarios: list[Scenario]
    prefill_chunk_tokens: int = 512  # ours: prompt tokens per step (the server's LORASERVE_PREFILL_CHUNK_TOKENS)

    @property
    def max_context(self) -> int:
        return max(self.input_len + self.output_len, self.ttft_len + 1)

    @property
    def max_streams(self) -> int:
        return max(s.streams for s in self.scenarios)


@dataclass
class MethodResult:
    skipped: bool = False
    error: str | None = None
    note: str | None = None
    warmup_s: float | None = None
    scenarios: dict[str, dict] = field(default_factory=dict)
    token_ids: dict[str, list[list[int]]] = field(default_factory=dict)  # scenario -> rows; not all go to JSON
    versions: dict | None = None  # the Unsloth process's own


# -- the workload ---------------------------------------------------------------------------------------------
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def default_dtype() -> str:
    """bf16 is how the model is served on a GPU; fp32 on the CPU, where bf16 matmuls are slow and ours
    equals HF token for token."""
    return "bfloat16" if torch.cuda.is_available() else "float32"


def model_dtype(name: str | None = None) -> torch.dtype:
    return DTYPES[name or default_dtype()]


def tiny_tokenizer():
    from transformers import AutoTokenizer

    from loraserve.tiny_model import build_tiny_model

    return AutoTokenizer.from_pretrained(build_tiny_model())


def load_model(spec: str, dtype: torch.dtype):
    """(model, tokenizer, model dir or None) for "tiny", "llama3-8b-random" or a local model dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "llama3-8b-random":
        model, tokenizer = random_llama3_8b(dtype)
        return model, tokenizer, None
    if spec == "tiny":
        from loraserve.tiny_model import build_tiny_model

        spec = str(build_tiny_model())
    tokenizer = AutoTokenizer.from_pretrained(spec)
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    return model.to(device()).eval(), tokenizer, Path(spec).resolve()


def random_llama3_8b(dtype: torch.dtype = torch.bfloat16):
    """Built on the GPU in `dtype` directly: for bf16, an fp32 build first would need a 32 GB transient
    and be slower."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.gpu_train_bench import LLAMA3_8B

    if not torch.cuda.is_available():
        raise SystemExit("--model llama3-8b-random needs CUDA; use --model tiny on a CPU")
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(**LLAMA3_8B, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    # Parameters come out in `dtype` already; a blanket .to(bf16) would also round RoPE's fp32 inv_freq buffer.
    if any(p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype)
    return model.eval(), tokenizer


def lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, target_modules=list(PROJECTIONS), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")


def random_adapter(model, *, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A PEFT-format state dict (the keys get_peft_model_state_dict gives) with both A and B random.

    PEFT starts B at zero, which would make every adapter the base model. A ~ N(0, 1/in) keeps A·x at the
    scale of x; B ~ N(0, 0.25²/r) then adds ~25% of x's scale per projection: enough that each adapter
    picks other tokens from the first one on (mix-ups show), small enough to stay finite in bf16.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in PROJECTIONS:
            continue
        a = torch.randn(rank, module.in_features, generator=gen) / module.in_features ** 0.5  # [r, in]
        b = torch.randn(module.out_features, rank, generator=gen) * 0.25 / rank ** 0.5  # [out, r]
        dtype, dev = module.weight.dtype, module.weight.device
        state[f"base_model.model.{name}.lora_A.weight"] = a.to(dev, dtype)
        state[f"base_model.model.{name}.lora_B.weight"] = b.to(dev, dtype)
    return state


def adapter_name(index: int) -> str:
    return f"a{index}"


def prompts(work: Workload, scenario: Scenario) -> torch.Tensor:
    """[B, S] int64 on the CPU, the same for every method; seeded by the shape, so streams8_base gets
    streams8's prompts and the two show what the adapters change."""
    length = work.ttft_len if scenario.ttft_only else work.input_len
    gen = torch.Generator().manual_seed(work.seed * 1_000_003 + zlib.crc32(f"{scenario.streams}x{length}".encode()))
    return torch.randint(LOWEST_PROMPT_ID, work.prompt_high, (scenario.streams, length), generator=gen)


def row_adapters(work: Workload, scenario: Scenario) -> list[str | None]:
    if scenario.adapters == "none":
        return [None] * scenario.streams
    return [adapter_name(i % len(work.adapters)) for i in range(scenario.streams)]


def distinct_adapters(work: Workload, scenario: Scenario) -> int:
    return len({k for k in row_adapters(work, scenario) if k})


def new_tokens(work: Workload, scenario: Scenario) -> int:
    return 1 if scenario.ttft_only else work.output_len


# -- measuring ------------------------------------------------------------------------------------------------
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ms_stats(seconds: list[float]) -> dict | None:
    if not seconds:
        return None
    ms = [s * 1000 for s in seconds]
    return {"mean": statistics.fmean(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90), "max": max(ms)}


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


def decode_record(*, streams: int, distinct: int, tokens: int, wall: float, ttfts: list[float],
                  tpots: list[float]) -> dict:
    return {"streams": streams, "distinct_adapters": distinct, "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "ttft_ms": ms_stats(ttfts), "tpot_ms": ms_stats(tpots)}


def ttft_record(prompt_len: int, ttfts: list[float]) -> dict:
    return {"streams": 1, "prompt_len": prompt_len, "reps": len(ttfts), "ttft_ms": ms_stats(ttfts)}


# -- HF generate (hf_peft, hf_static, and the Unsloth worker) -----------------------------------------------------
@dataclass
class HFRun:
    token_ids: list[list[int]]  # [B][new tokens]
    wall: float
    step_seconds: list[float]  # from the call to each step's logits (one extra: HF's deferred stop check)


def hf_generate(model, batch: torch.Tensor, *, new: int, pad_id: int, adapter_names: list[str] | None = None,
                **extra) -> HFRun:
    """One static batch of equal-length prompts (no padding). eos_token_id=None: EOS neither stops a row
    nor is suppressed (min_new_tokens alone would forbid EOS, where our engine just carries on)."""
    from transformers import LogitsProcessorList

    ids = batch.to(model.device)  # [B, S]
    kwargs = dict(extra, adapter_names=adapter_names) if adapter_names else extra
    sync()
    started, clock = time.perf_counter(), StepClock()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=pad_id,
                         logits_processor=LogitsProcessorList([clock]), **kwargs)  # [B, S + new]
    sync()
    wall = time.perf_counter() - started
    return HFRun(out[:, ids.shape[1]:].tolist(), wall, clock.seconds())


def hf_decode_record(run: HFRun, *, new: int, distinct: int) -> dict:
    steps = run.step_seconds[:new]
    streams = len(run.token_ids)
    tpot = (steps[-1] - steps[0]) / (new - 1) if new > 1 else None
    return decode_record(streams=streams, distinct=distinct, tokens=sum(len(r) for r in run.token_ids),
                         wall=run.wall, ttfts=[steps[0]] * streams, tpots=[tpot] * streams if tpot else [])


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
            raise RuntimeError(f"adapter {name} did not load: missing {missing[:2]}, "
                               f"unexpected {result.unexpected_keys[:2]}")
    return wrapped.eval()


def run_hf_scenario(model, work: Workload, scenario: Scenario, **extra) -> tuple[dict, list[list[int]]]:
    """Mixed rows via adapter_names; base rows with the adapters disabled (no per-row hooks at all)."""
    pad_id = work.tokenizer.pad_token_id
    names = None if scenario.adapters == "none" else row_adapters(work, scenario)
    batch, new = prompts(work, scenario), new_tokens(work, scenario)

    def once() -> HFRun:
        if names is None:
            with model.disable_adapter():
                return hf_generate(model, batch, new=new, pad_id=pad_id, **extra)
        return hf_generate(model, batch, new=new, pad_id=pad_id, adapter_names=names, **extra)

    if scenario.ttft_only:
        return ttft_record(batch.shape[1], hf_ttft(once)), []
    run = once()
    return hf_decode_record(run, new=new, distinct=distinct_adapters(work, scenario)), run.token_ids


def hf_warmup(model, work: Workload) -> float:
    started = time.perf_counter()
    batch = prompts(work, Scenario("warmup", 2))
    names = [adapter_name(i % len(work.adapters)) for i in range(2)]
    hf_generate(model, batch, new=4, pad_id=work.tokenizer.pad_token_id, adapter_names=names)
    return time.perf_counter() - started


def run_hf_peft(model, work: Workload) -> MethodResult:
    result = MethodResult(warmup_s=hf_warmup(model, work))
    for scenario in work.scenarios:
        record_scenario(result, scenario, lambda s=scenario: run_hf_scenario(model, work, s))
    return result


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
        base = Scenario(scenario.name, scenario.streams, adapters="none", ttft_only=scenario.ttft_only)
        first = scenario if adapters == "mixed" else base
        record_scenario(result, scenario, lambda s=first, b=base: static_with_fallback(model, work, s, base=b))
    fell_back = [n for n, r in result.scenarios.items() if r.get("fallback")]
    if fell_back:
        result.note = f"mixed adapters failed under compile in {fell_back}: those ran on the base model"
    return result


def static_with_fallback(model, work: Workload, scenario: Scenario, *, base: Scenario) -> tuple[dict, list[list[int]]]:
    try:
        return static_scenario(model, work, scenario)
    except Exception as exc:  # e.g. dynamo cannot trace the hooks; recorded below
        if scenario.adapters == "none":
            raise
        release_cuda_memory()
        record, _ = static_scenario(model, work, base)
        record["fallback"] = f"base model, adapters disabled: mixed failed with {type(exc).__name__}: {exc}"
        return record, []  # not the requested workload: keep its tokens out of any comparison


def static_scenario(model, work: Workload, scenario: Scenario) -> tuple[dict, list[list[int]]]:
    started = time.perf_counter()
    run_hf_scenario(model, work, scenario, cache_implementation="static")
    warmup = time.perf_counter() - started
    frames = dynamo_frames()
    record, ids = run_hf_scenario(model, work, scenario, cache_implementation="static")
    after = dynamo_frames()
    record.update(warmup_s=warmup, recompiled_in_measure=None if frames is None else after > frames)
    return record, ids


def record_scenario(result: MethodResult, scenario: Scenario, measure) -> None:
    """One scenario's failure (e.g. out of memory at 64 streams) is recorded; the others still run."""
    try:
        record, ids = measure()
    except Exception as exc:  # a benchmark reports failures and moves on
        result.scenarios[scenario.name] = {"error": f"{type(exc).__name__}: {exc}"}
        release_cuda_memory()
        return
    result.scenarios[scenario.name] = record
    if ids:
        result.token_ids[scenario.name] = ids
    print(f"  {scenario.name}: {summary_line(record)}", file=sys.stderr)


def summary_line(record: dict) -> str:
    if "tok_s" in record:
        return f"{record['tok_s']:.1f} tok/s, wall {record['wall_s']:.2f}s"
    return f"ttft p50 {record['ttft_ms']['p50']:.1f} ms"


def release_cuda_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- ours ---------------------------------------------------------------------------------------------------------
@dataclass
class StreamRun:
    token_ids: list[int]
    ttft: float  # from the scenario's start (all streams submitted at once)
    last: float
    generated_tokens: int


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


async def ours_batch(engine, work: Workload, scenario: Scenario, *,
                     new: int | None = None) -> tuple[list[StreamRun], float]:
    from server.engine.sampling import SamplingParams

    import dataclasses
    import os

    params = SamplingParams(max_new_tokens=new or new_tokens(work, scenario), stop_token_ids=())
    sampled = os.environ.get("LORASERVE_BENCH_SAMPLED") == "1"  # temperature 1, top_p 0.95, a seed per stream
    batch, keys = prompts(work, scenario).tolist(), row_adapters(work, scenario)
    each = [dataclasses.replace(params, do_sample=True, temperature=1.0, top_p=0.95, seed=i) if sampled else params
            for i in range(len(batch))]
    started = time.perf_counter()
    # return_exceptions: a failed stream must not leave the others running into the next scenario
    runs = await asyncio.gather(*(ours_stream(engine, p, q, k, started) for p, q, k in zip(batch, each, keys)),
                                return_exceptions=True)
    wall = time.perf_counter() - started
    failed = next((r for r in runs if isinstance(r, BaseException)), None)
    if failed:
        raise failed
    return list(runs), wall


async def ours_scenario(engine, work: Workload, scenario: Scenario) -> tuple[dict, list[list[int]]]:
    if scenario.ttft_only:
        await ours_batch(engine, work, scenario)  # warm-up for this prompt length, as for HF
        ttfts = [(await ours_batch(engine, work, scenario))[0][0].ttft for _ in range(TTFT_REPS)]
        return ttft_record(work.ttft_len, ttfts), []
    runs, wall = await ours_batch(engine, work, scenario)
    new = new_tokens(work, scenario)
    tpots = [(r.last - r.ttft) / (new - 1) for r in runs if new > 1]
    record = decode_record(streams=scenario.streams, distinct=distinct_adapters(work, scenario),
                           tokens=sum(r.generated_tokens for r in runs), wall=wall, ttfts=[r.ttft for r in runs],
                           tpots=tpots)
    record["short_rows"] = sum(1 for r in runs if len(r.token_ids) != new)
    return record, [r.token_ids for r in runs]


async def run_ours_async(work: Workload, result: MethodResult, *, cuda_graphs: bool) -> None:
    from server.engine.engine import Engine
    from server.engine.runner import ModelRunner

    runner = ModelRunner(work.model, work.tokenizer, backend="transformers", max_context=work.max_context,
                         kv_slots=work.max_streams, adapter_slots=len(work.adapters),
                         max_lora_rank=work.lora_config.r, cuda_graphs=cuda_graphs)
    engine = Engine(runner, max_running=work.max_streams, max_queue=10_000, prefill_chunk_tokens=work.prefill_chunk_tokens)
    engine.start()
    try:
        for name, state in work.adapters.items():
            await engine.call(lambda n=name, s=state: runner.attach(n, work.lora_config, dict(s)))
        await engine.call(runner.warm_up)  # graphs captured and kernels compiled before timing, as the server does
        started = time.perf_counter()
        await ours_batch(engine, work, Scenario("warmup", 2), new=4)
        result.warmup_s = time.perf_counter() - started
        for scenario in work.scenarios:
            try:
                record, ids = await ours_scenario(engine, work, scenario)
            except Exception as exc:  # same policy as record_scenario
                result.scenarios[scenario.name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            result.scenarios[scenario.name] = record
            if ids:
                result.token_ids[scenario.name] = ids
            print(f"  {scenario.name}: {summary_line(record)}", file=sys.stderr)
    finally:
        engine.stop()


def run_ours(work: Workload, *, cuda_graphs: bool = True) -> MethodResult:
    result = MethodResult()
    asyncio.run(run_ours_async(work, result, cuda_graphs=cuda_graphs))
    return result


# -- Unsloth, in a process of its own ---------------------------------------------------------------------------
def unsloth_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    if importlib.util.find_spec("unsloth") is None:
        return "unsloth is not installed (pip install 'loraserve[unsloth]')"
    return None


def save_for_unsloth(work: Workload, out: Path) -> tuple[Path, Path]:
    """Unsloth loads from disk: the model (when built in memory, ~50 s for 8B) and adapter a0 as a PEFT dir."""
    from safetensors.torch import save_file

    model_dir = work.model_dir
    if model_dir is None:
        model_dir = out / "model"
        started = time.perf_counter()
        work.model.save_pretrained(model_dir, safe_serialization=True)
        work.tokenizer.save_pretrained(model_dir)
        print(f"  saved the model for unsloth in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    adapter_dir = out / "adapter"
    dataclasses.replace(work.lora_config, base_model_name_or_path=str(model_dir)).save_pretrained(adapter_dir)
    state = {k: v.detach().to("cpu").contiguous() for k, v in work.adapters[adapter_name(0)].items()}
    save_file(state, adapter_dir / "adapter_model.safetensors")
    return model_dir, adapter_dir


def run_unsloth(work: Workload, *, timeout: float) -> MethodResult:
    with tempfile.TemporaryDirectory(prefix="engine-bench-unsloth-") as tmp:
        model_dir, adapter_dir = save_for_unsloth(work, Path(tmp))
        spec = {"model_dir": str(model_dir), "adapter_dir": str(adapter_dir), "max_context": work.max_context,
                "input_len": work.input_len, "output_len": work.output_len, "ttft_len": work.ttft_len,
                "prompt_high": work.prompt_high, "seed": work.seed, "adapters": len(work.adapters),
                "scenarios": [s.name for s in work.scenarios], "out": str(Path(tmp) / "unsloth.json")}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, __file__, "--unsloth-worker", str(spec_path)], cwd=REPO_ROOT,
                              stdout=sys.stderr, timeout=timeout, check=False)
        if proc.returncode != 0 or not Path(spec["out"]).is_file():
            return MethodResult(error=f"unsloth worker exited with {proc.returncode} (its output is above)")
        data = json.loads(Path(spec["out"]).read_text())
    return MethodResult(note=data.get("note"), warmup_s=data.get("warmup_s"), scenarios=data["scenarios"],
                        versions=data.get("versions"))


def unsloth_worker(spec_path: str) -> None:
    """Runs in the child: unsloth is imported before transformers, as it must be."""
    import unsloth
    from unsloth import FastLanguageModel

    spec = json.loads(Path(spec_path).read_text())
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=spec["model_dir"],
                                                         max_seq_length=spec["max_context"], dtype=None,
                                                         load_in_4bit=False)
    note = load_unsloth_adapter(model, spec["adapter_dir"])
    FastLanguageModel.for_inference(model)
    work = Workload(model=model, tokenizer=tokenizer, model_dir=Path(spec["model_dir"]), lora_config=None,
                    adapters={adapter_name(i): {} for i in range(spec["adapters"])}, input_len=spec["input_len"],
                    output_len=spec["output_len"], ttft_len=spec["ttft_len"], prompt_high=spec["prompt_high"],
                    seed=spec["seed"], scenarios=[SCENARIOS[n] for n in spec["scenarios"]])
    result = MethodResult(note=note)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    hf_generate(model, prompts(work, Scenario("warmup", 2)), new=4, pad_id=pad_id)
    result.warmup_s = time.perf_counter() - started
    for scenario in work.scenarios:
        if scenario.adapters == "none":
            result.scenarios[scenario.name] = {"skipped": True, "note": "no base run: the adapter stays loaded"}
            continue
        record_scenario(result, scenario, lambda s=scenario: unsloth_scenario(model, work, s, pad_id=pad_id))
    versions = {"unsloth": unsloth.__version__, "transformers": importlib.metadata.version("transformers")}
    Path(spec["out"]).write_text(json.dumps({"note": result.note, "warmup_s": result.warmup_s,
                                             "scenarios": result.scenarios, "versions": versions}))


def load_unsloth_adapter(model, adapter_dir: str) -> str:
    """transformers' load_adapter, as the server does; PeftModel only if that fails on this version."""
    note = "one adapter (a0) for every row: Unsloth's fused path ignores per-row adapter names"
    try:
        model.load_adapter(adapter_dir, adapter_name=adapter_name(0))
        return note
    except Exception as exc:  # try the other documented way and say so
        from peft import PeftModel

        PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name(0))
        return f"{note}; load_adapter failed ({type(exc).__name__}: {exc}), loaded with PeftModel"


def unsloth_scenario(model, work: Workload, scenario: Scenario, *, pad_id: int) -> tuple[dict, list[list[int]]]:
    batch, new = prompts(work, scenario), new_tokens(work, scenario)
    if scenario.ttft_only:
        return ttft_record(batch.shape[1], hf_ttft(lambda: hf_generate(model, batch, new=new, pad_id=pad_id))), []
    run = hf_generate(model, batch, new=new, pad_id=pad_id)
    return hf_decode_record(run, new=new, distinct=1), []


# -- roofline ----------------------------------------------------------------------------------------------------
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
    """Per decode scenario and number of distinct adapters: bytes read per step and the tok/s they allow."""
    weights, per_token = weight_bytes(work.model), kv_bytes_per_token(work.model)
    one_adapter = adapter_bytes(next(iter(work.adapters.values())))
    average_context = work.input_len + work.output_len / 2
    out = {"weight_bytes": weights, "kv_bytes_per_token": per_token, "adapter_bytes": one_adapter,
           "average_context": average_context, "bandwidth_GB_per_s": bandwidth / 1e9, "scenarios": {}}
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


# -- correctness -------------------------------------------------------------------------------------------------
def prefix_match(ours: list[int], theirs: list[int], length: int) -> float:
    """Fraction of the requested tokens that agree before the first difference."""
    same = 0
    for a, b in zip(ours, theirs):
        if a != b:
            break
        same += 1
    return same / length


def match_summary(rows: list[list[int]], reference: list[list[int]], length: int) -> dict:
    per_row = [prefix_match(a, b, length) for a, b in zip(rows, reference)]
    return {"per_row": per_row, "mean": statistics.fmean(per_row), "exact_rows": sum(1 for r in per_row if r == 1.0)}


def match_rates(methods: dict[str, MethodResult], output_len: int) -> dict:
    """Ours against hf_peft per scenario, token for token (same prompts, same adapters per row)."""
    ours, hf = methods.get("ours"), methods.get("hf_peft")
    if not ours or not hf:
        return {}
    return {name: match_summary(rows, hf.token_ids[name], output_len)
            for name, rows in ours.token_ids.items() if name in hf.token_ids}


def adapter_effect(methods: dict[str, MethodResult], output_len: int) -> dict | None:
    """hf_peft's streams8 against streams8_base on the same prompts: a match near 1 would mean the adapters
    barely change the output, and then the ours-vs-HF match could not catch a wrong adapter."""
    hf = methods.get("hf_peft")
    if not hf or not {"streams8", "streams8_base"} <= set(hf.token_ids):
        return None
    return match_summary(hf.token_ids["streams8"], hf.token_ids["streams8_base"], output_len)


# -- divergence: where ours leaves hf_peft, and how close the reference's own call was there -----------------------
DIVERGENCE_ROWS = 8  # rows per teacher-forced forward: 8 x 128 positions x 128256 fp32 logits is ~0.5 GB


def first_divergence(ours: list[int], reference: list[int]) -> int | None:
    """Index of the first differing token; None where they agree on every token both have (a short row of
    ours is counted in its short_rows, not here)."""
    return next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), None)


def divergence_at(logits: torch.Tensor, ours: list[int], reference: list[int]) -> dict | None:
    """logits: [new tokens, vocab] fp32, row k the reference's logits for its new token k given its own tokens
    before it, which up to the first divergence are ours too. gap = logit(reference's token) - logit(ours'),
    >= 0 up to the rounding between this one forward and generate's step by step; ours_rank: how many
    tokens the reference put strictly above ours (0: its argmax, or tied with it). The logits come out of
    the head in the model's dtype: in bf16 a gap is a multiple of its rounding step, 0 an exact tie. A gap
    of a few such steps at rank 1 is a near-tie that rounding can flip; a gap like the usual top1 - top2
    gap is a wrong token, not rounding."""
    index = first_divergence(ours, reference)
    if index is None:
        return None
    step = logits[index]
    mine = step[ours[index]]
    return {"index": index, "gap": float(step[reference[index]] - mine), "ours_rank": int((step > mine).sum())}


def top2_gaps(logits: torch.Tensor) -> list[float]:
    """top1 - top2 logit at every position: what a gap at a divergence is to be compared with."""
    top = logits.topk(2, dim=-1).values  # [..., 2]
    return (top[..., 0] - top[..., 1]).flatten().tolist()


def reference_logits(model, work: Workload, scenario: Scenario, rows: slice,
                     reference: list[list[int]]) -> torch.Tensor:
    """The PEFT model's logits for each of the reference's new tokens, teacher-forced in one forward over
    prompt + reference tokens, adapters per row as run_hf_scenario sets them: [rows, new tokens, vocab] fp32.

    Position j predicts token j + 1: new token k sits at S + k (S = prompt length), so its logits are those of
    position S + k - 1, and all N come from positions S - 1 .. S + N - 2. The last token only ever predicts
    what comes after the run, so it is left out of the input and the last N positions are exactly these.
    """
    generated = torch.tensor(reference[rows], dtype=torch.long)  # [b, N]
    new = generated.shape[1]
    ids = torch.cat([prompts(work, scenario)[rows], generated[:, :-1]], dim=1).to(model.device)  # [b, S + N - 1]
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False, "logits_to_keep": new}
    with torch.inference_mode():
        if scenario.adapters == "none":
            with model.disable_adapter():
                logits = model(**kwargs).logits
        else:
            logits = model(**kwargs, adapter_names=row_adapters(work, scenario)[rows]).logits
    if logits.shape[:2] != generated.shape:
        raise RuntimeError(f"logits {tuple(logits.shape)} for {tuple(generated.shape)} tokens")
    return logits.float()


def scenario_divergence(model, work: Workload, scenario: Scenario, ours: list[list[int]],
                        reference: list[list[int]]) -> dict:
    """A few rows per forward, only small statistics kept: all rows' logits at once would be GBs."""
    diverged, gaps = [], []
    for start in range(0, len(reference), DIVERGENCE_ROWS):
        rows = slice(start, start + DIVERGENCE_ROWS)
        logits = reference_logits(model, work, scenario, rows, reference)
        gaps += top2_gaps(logits)
        for i, (mine, theirs) in enumerate(zip(ours[rows], reference[rows])):
            found = divergence_at(logits[i], mine, theirs)
            if found:
                diverged.append({"row": start + i, **found})
        del logits
    return divergence_summary(diverged, rows=len(reference), top2=gaps)


def divergence_summary(diverged: list[dict], *, rows: int, top2: list[float]) -> dict:
    at = [d["gap"] for d in diverged]
    ranks = [d["ours_rank"] for d in diverged]
    return {"rows_diverged": len(diverged), "rows": rows,
            "gap_at_divergence": {"p50": percentile(at, 50), "p90": percentile(at, 90), "max": max(at)} if at else None,
            "ours_token_rank": {"max": max(ranks, default=None),
                                "counts": {str(r): ranks.count(r) for r in sorted(set(ranks))}},
            "top2_gap": {"p10": percentile(top2, 10), "p50": percentile(top2, 50)},
            "per_row": diverged}


def divergence(work: Workload, methods: dict[str, MethodResult]) -> dict:
    """Per decode scenario: at each row's first token where ours differs from hf_peft, how far apart the two
    tokens were in hf_peft's own logits. Explains a match below 1 (bf16 near-ties) or exposes a bug.

    Runs after every method: run_all unwrapped the PEFT model for ours, so it is wrapped again here and
    unwrapped at the end, one copy of the base weights throughout."""
    ours, hf = methods.get("ours"), methods.get("hf_peft")
    if not ours or not hf or ours.skipped or hf.skipped or ours.error or hf.error:
        return {}
    scenarios = [s for s in work.scenarios
                 if not s.ttft_only and s.name in ours.token_ids and s.name in hf.token_ids]
    if not scenarios:
        return {}
    print("divergence:", file=sys.stderr)
    model, out = peft_model(work), {}
    try:
        for scenario in scenarios:
            try:
                out[scenario.name] = scenario_divergence(model, work, scenario, ours.token_ids[scenario.name],
                                                         hf.token_ids[scenario.name])
            except Exception as exc:  # e.g. out of memory at 64 rows: the other scenarios still count
                out[scenario.name] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"  {scenario.name}: failed: {out[scenario.name]['error']}", file=sys.stderr)
                release_cuda_memory()
                continue
            record = out[scenario.name]
            print(f"  {scenario.name}: {record['rows_diverged']}/{record['rows']} rows diverged", file=sys.stderr)
    finally:
        work.model = model.unload()
        release_cuda_memory()
    return out


# -- machine and output ------------------------------------------------------------------------------------------
def versions() -> dict:
    out = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "accelerate", "unsloth"):
        try:
            out[package] = importlib.metadata.version(package)  # no import: unsloth must stay out of this process
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> dict:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def machine_info() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "versions": versions(), "git": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def method_json(result: MethodResult) -> dict:
    out = {"skipped": result.skipped, "error": result.error, "note": result.note, "warmup_s": result.warmup_s,
           "scenarios": result.scenarios}
    if result.versions:
        out["versions"] = result.versions
    if MATCH_SCENARIO in result.token_ids:
        out["token_ids"] = {MATCH_SCENARIO: result.token_ids[MATCH_SCENARIO]}
    return out


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def ratio(ours: dict | None, other: dict | None) -> float | None:
    """>1 means ours is better: tok/s over tok/s, or their TTFT over ours."""
    if not ours or not other:
        return None
    if "tok_s" in ours and "tok_s" in other:
        return ours["tok_s"] / other["tok_s"]
    if ours.get("ttft_ms") and other.get("ttft_ms"):
        return other["ttft_ms"]["p50"] / ours["ttft_ms"]["p50"]
    return None


def print_tables(out: dict) -> None:
    methods, match = out["methods"], out["match"]
    names = [m for m in METHODS if m in methods]

    def cell(method: str, scenario: str) -> dict | None:
        return methods[method]["scenarios"].get(scenario)

    print(f"\nthroughput tok/s (% of roofline); ttft512: TTFT p50 ms. Ratios > 1: ours better. "
          f"Bandwidth {out['bandwidth']['GB_per_s']:.0f} GB/s")
    print(f"{'scenario':<15}{'roofline':>10}" + "".join(f"{m:>18}" for m in names)
          + f"{'ours/hf_peft':>14}{'ours/unsloth':>14}{'match':>8}")
    for s in out["config"]["scenarios"]:
        roof = out["roofline"]["scenarios"].get(s, {})
        bound = roof.get(str(roof.get("distinct_adapters")))
        cells = []
        for m in names:
            r = cell(m, s)
            if not r or "error" in r or r.get("skipped"):
                cells.append("err" if r and "error" in r else "-")
            elif "tok_s" in r:
                cells.append(f"{r['tok_s']:.1f} ({fmt(r.get('pct_roofline'), '.0f')}%)")
            else:
                cells.append(f"{r['ttft_ms']['p50']:.1f} ms")
        ours = cell("ours", s) if "ours" in names else None
        vs_hf = ratio(ours, cell("hf_peft", s)) if "hf_peft" in names else None
        vs_unsloth = ratio(ours, cell("unsloth", s)) if "unsloth" in names else None
        print(f"{s:<15}{fmt(bound and bound['tok_s']):>10}" + "".join(f"{c:>18}" for c in cells)
              + f"{fmt(vs_hf, '.2f'):>14}{fmt(vs_unsloth, '.2f'):>14}{fmt(match.get(s, {}).get('mean'), '.2f'):>8}")

    print("\nlatency ms: TTFT p50 / TPOT p50 (all streams start together)")
    print(f"{'scenario':<15}" + "".join(f"{m:>18}" for m in names))
    for s in out["config"]["scenarios"]:
        cells = []
        for m in names:
            r = cell(m, s) or {}
            ttft, tpot = (r.get("ttft_ms") or {}).get("p50"), (r.get("tpot_ms") or {}).get("p50")
            cells.append(f"{fmt(ttft)} / {fmt(tpot)}" if ttft is not None else "-")
        print(f"{s:<15}" + "".join(f"{c:>18}" for c in cells))

    for m in names:
        info = methods[m]
        errors = {s: r["error"] for s, r in info["scenarios"].items() if "error" in r}
        for label, text in (("error", info["error"]), ("note", info["note"]), ("scenario errors", errors or None)):
            if text:
                print(f"{m} {label}: {text}")
    if out.get("divergence"):
        print_divergence(out["divergence"])


def print_divergence(divergence: dict) -> None:
    print("\nfirst divergence of ours from hf_peft, in hf_peft's own logits (teacher-forced): gap = logit(hf token) "
          "- logit(ours), in the model dtype's rounding steps.\nNear-ties: gaps far below the usual top1-top2 gap, "
          "ours' token ranked 1 (0: tied, 2: three close). A usual-sized gap or a higher rank is a wrong token.")
    print(f"{'scenario':<15}{'diverged':>10}{'gap p50':>10}{'gap max':>10}{'top1-top2 p10':>15}"
          f"{'top1-top2 p50':>15}{'ours rank max':>15}")
    for name, record in divergence.items():
        if "error" in record:
            print(f"{name:<15}  error: {record['error']}")
            continue
        at, top2 = record["gap_at_divergence"] or {}, record["top2_gap"]
        print(f"{name:<15}{record['rows_diverged']:>5}/{record['rows']:<4}{fmt(at.get('p50'), '.4f'):>10}"
              f"{fmt(at.get('max'), '.4f'):>10}{fmt(top2['p10'], '.4f'):>15}{fmt(top2['p50'], '.4f'):>15}"
              f"{fmt(record['ours_token_rank']['max'], 'd'):>15}")


# -- main --------------------------------------------------------------------------------------------------------
def build_workload(args, model, tokenizer, model_dir) -> Workload:
    vocab = min(model.config.vocab_size, len(tokenizer))  # the 8B shape has more ids than the tiny tokenizer
    adapters = {adapter_name(i): random_adapter(model, rank=args.rank, seed=args.seed + i)
                for i in range(args.adapters)}
    return Workload(model=model, tokenizer=tokenizer, model_dir=model_dir, lora_config=lora_config(args.rank),
                    adapters=adapters, input_len=args.input_len, output_len=args.output_len, ttft_len=args.ttft_len,
                    prompt_high=vocab, seed=args.seed, scenarios=[SCENARIOS[n] for n in args.scenarios],
                    prefill_chunk_tokens=args.prefill_chunk_tokens)


def skip_reason(method: str, args) -> str | None:
    if method == "hf_static" and not torch.cuda.is_available():
        return "needs CUDA (transformers only auto-compiles the static-cache decode there)"
    if method == "unsloth":
        if args.dtype != "bfloat16" and not unsloth_unavailable():
            # its loader picks its own dtype (bf16 where supported): it would not run at the chosen precision
            return f"runs in bf16 only here, not --dtype {args.dtype}"
        return unsloth_unavailable()
    return None


def run_method(method: str, work: Workload, args, hf_model) -> MethodResult:
    if method == "hf_peft":
        return run_hf_peft(hf_model, work)
    if method == "hf_static":
        return run_hf_static(hf_model, work, adapters=args.hf_static_adapters)
    if method == "unsloth":
        return run_unsloth(work, timeout=args.unsloth_timeout)
    return run_ours(work, cuda_graphs=method == "ours")


def run_all(args, work: Workload) -> dict[str, MethodResult]:
    """Unsloth first (it needs the untouched model on disk), then HF on a PEFT wrapping of the model, then
    ours on the model that unwrapping gives back: one copy of the weights in this process throughout."""
    order = [m for m in ("unsloth", "hf_peft", "hf_static", "ours_eager", "ours") if m in args.methods]
    results, hf_model = {}, None
    for method in order:
        reason = skip_reason(method, args)
        if reason:
            results[method] = MethodResult(skipped=True, note=reason)
            continue
        print(f"{method}:", file=sys.stderr)
        try:
            if method in ("hf_peft", "hf_static") and hf_model is None:
                hf_model = peft_model(work)
            if method.startswith("ours") and hf_model is not None:
                work.model, hf_model = hf_model.unload(), None
            results[method] = run_method(method, work, args, hf_model)
        except Exception as exc:  # e.g. ours before the new engine lands: record and go on
            results[method] = MethodResult(error=f"{type(exc).__name__}: {exc}")
            print(f"  failed: {results[method].error}", file=sys.stderr)
        release_cuda_memory()
    return {m: results[m] for m in args.methods}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None,
                   help="tiny (the default on CPU), llama3-8b-random (the default on CUDA), or a local model dir")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--quick", action="store_true", help="CPU sizes: input 32, output 16, TTFT prompt 64, 4 adapters")
    p.add_argument("--input-len", type=int, help="prompt tokens (default 128; --quick 32)")
    p.add_argument("--output-len", type=int, help="new tokens per stream (default 128; --quick 16)")
    p.add_argument("--ttft-len", type=int, help="prompt tokens of ttft512 (default 512; --quick 64)")
    p.add_argument("--adapters", type=int, help="distinct adapters (default 8; --quick 4)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--hf-static-adapters", choices=["mixed", "none"], default="mixed",
                   help="hf_static on the PEFT mixed-adapter model, or on the base model with adapters disabled")
    p.add_argument("--prefill-chunk-tokens", type=int, default=512, help="ours: prompt tokens prefilled per step")
    p.add_argument("--unsloth-timeout", type=float, default=1800.0, help="seconds for the Unsloth process")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="model weights and compute (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write everything here")
    p.add_argument("--unsloth-worker", help=argparse.SUPPRESS)  # internal: the Unsloth child process
    args = p.parse_args(argv)
    if args.unsloth_worker:
        return args
    quick = args.quick
    args.model = args.model or ("llama3-8b-random" if torch.cuda.is_available() else "tiny")
    args.dtype = args.dtype or default_dtype()
    args.input_len = args.input_len or (32 if quick else 128)
    args.output_len = args.output_len or (16 if quick else 128)
    args.ttft_len = args.ttft_len or (64 if quick else 512)
    args.adapters = args.adapters or (4 if quick else 8)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for value, known, flag in ((args.methods, METHODS, "--methods"), (args.scenarios, SCENARIOS, "--scenarios")):
        unknown = [v for v in value if v not in known]
        if unknown or not value:
            p.error(f"{flag}: unknown or empty {unknown}; choose from {','.join(known)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.unsloth_worker:
        unsloth_worker(args.unsloth_worker)
        return 0
    torch.manual_seed(args.seed)
    bandwidth = copy_bandwidth(quick=args.quick)
    started = time.perf_counter()
    model, tokenizer, model_dir = load_model(args.model, model_dtype(args.dtype))
    load_s = time.perf_counter() - started
    work = build_workload(args, model, tokenizer, model_dir)
    roof = roofline(work, bandwidth=bandwidth["GB_per_s"] * 1e9)  # before any wrapping adds LoRA parameters
    methods = run_all(args, work)
    diverged = divergence(work, methods)
    add_roofline_pct(methods, roof)
    config = {k: v for k, v in vars(args).items() if k not in ("json", "unsloth_worker")}
    config.update(dtype=str(model_dtype(args.dtype)), device=str(device()), model_load_s=load_s,
                  model_config={k: getattr(model.config, k, None) for k in (
                      "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "vocab_size")}, prompt_ids=[LOWEST_PROMPT_ID, work.prompt_high])
    out = {"machine": machine_info(), "config": config, "bandwidth": bandwidth, "roofline": roof,
           "methods": {m: method_json(r) for m, r in methods.items()},
           "match": match_rates(methods, args.output_len),
           "lora_vs_base_match": adapter_effect(methods, args.output_len), "divergence": diverged}
    print_tables(out)
    if args.json:
        Path(args.json).resolve().parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    ran = [r for r in methods.values() if not r.skipped]
    return 0 if any(r.error is None for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
