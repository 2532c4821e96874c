"""What every method runs: the model, its adapters, the prompts, the scenarios, and their copy on disk."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from contract.lora import PROJECTIONS

LOWEST_PROMPT_ID = 10  # below: the special tokens of the tiny tokenizer (and most real ones)
TEMPERATURE, TOP_P = 1.0, 0.95  # the sampled variant of every scenario; request i is seeded with i
SAMPLED_SUFFIX = "_sampled"
SAMPLING_MODES = ("greedy", "sampled")


@dataclass(frozen=True)
class Scenario:
    name: str
    streams: int
    adapters: str = "mixed"  # "mixed": row i gets adapter i % N; "none": the base model
    ttft_only: bool = False  # one prompt of --ttft-len tokens and one new token: time to first token
    sampled: bool = False  # temperature TEMPERATURE, top_p TOP_P, request i seeded with i

    @property
    def base_name(self) -> str:
        return self.name.removesuffix(SAMPLED_SUFFIX)


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("bs1", 1),
        Scenario("streams8", 8),
        Scenario("streams32", 32),
        Scenario("streams64", 64),
        Scenario("streams8_base", 8, adapters="none"),
        Scenario("ttft512", 1, ttft_only=True),
        Scenario("ttft512_base", 1, adapters="none", ttft_only=True),
    )
}
MATCH_SCENARIO = "streams8"  # its token ids go into the JSON; ours is checked token for token against hf_peft


def variant(scenario: Scenario, mode: str) -> Scenario:
    if mode == "greedy":
        return scenario
    return dataclasses.replace(scenario, name=scenario.name + SAMPLED_SUFFIX, sampled=True)


def expand(names: list[str], modes: list[str]) -> list[Scenario]:
    """Each named scenario in each sampling mode, greedy first: bs1, bs1_sampled, streams8, ..."""
    return [variant(SCENARIOS[name], mode) for name in names for mode in SAMPLING_MODES if mode in modes]


def scenario_named(name: str) -> Scenario:
    """The inverse of `variant` (child processes get names)."""
    base = SCENARIOS[name.removesuffix(SAMPLED_SUFFIX)]
    return variant(base, "sampled" if name.endswith(SAMPLED_SUFFIX) else "greedy")


@dataclass
class Workload:
    """Everything the methods share: the model, its adapters and lengths."""

    model: object
    tokenizer: object
    model_dir: Path | None  # None: built in memory (saved only when a method in another process needs it)
    lora_config: object
    adapters: dict[str, dict[str, torch.Tensor]]  # name -> PEFT-format state dict
    input_len: int
    output_len: int
    ttft_len: int
    prompt_high: int  # prompts draw ids from [LOWEST_PROMPT_ID, prompt_high)
    seed: int
    scenarios: list[Scenario]
    prefill_chunk_tokens: int = 512  # ours: prompt tokens per step (the server's LORASERVE_PREFILL_CHUNK_TOKENS)
    waves: int = 1  # decode scenarios: the median of this many waves is reported

    @property
    def max_context(self) -> int:
        return max(self.input_len + self.output_len, self.ttft_len + 1)

    @property
    def max_streams(self) -> int:
        return max(s.streams for s in self.scenarios)


# -- the model ------------------------------------------------------------------------------------------------
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
    config = LlamaConfig(
        **LLAMA3_8B,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
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


# -- adapters -----------------------------------------------------------------------------------------------------
def lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=rank, target_modules=list(PROJECTIONS), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"
    )


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
        a = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5  # [r, in]
        b = torch.randn(module.out_features, rank, generator=gen) * 0.25 / rank**0.5  # [out, r]
        dtype, dev = module.weight.dtype, module.weight.device
        state[f"base_model.model.{name}.lora_A.weight"] = a.to(dev, dtype)
        state[f"base_model.model.{name}.lora_B.weight"] = b.to(dev, dtype)
    return state


def adapter_name(index: int) -> str:
    return f"a{index}"


# -- prompts and rows ---------------------------------------------------------------------------------------------
def prompts(work: Workload, scenario: Scenario) -> torch.Tensor:
    """[B, S] int64 on the CPU, the same for every method; seeded by the shape, so streams8_base gets
    streams8's prompts (and a sampled variant its greedy one's) and the two show what the adapters change."""
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


# -- the workload on disk, for methods in a process of their own --------------------------------------------------
class SavedWorkload:
    """The model and adapters as files (a model dir, PEFT adapter dirs), each written on first use.

    A model built in memory takes ~50 s to save at 8B: under a --save-dir that already holds it (same
    shape, dtype and a fingerprint of its weights), the copy there is used again.
    """

    def __init__(self, work: Workload, root: Path) -> None:
        self.work, self.root = work, root
        self._model_dir: Path | None = None
        self._adapters: dict[str, Path] = {}

    def model_dir(self) -> Path:
        if self._model_dir is None:
            self._model_dir = self.work.model_dir or self._save_model(self.root / "model")
        return self._model_dir

    def adapter_dir(self, name: str) -> Path:
        if name not in self._adapters:
            self._adapters[name] = self._save_adapter(name, self.root / "adapters" / name)
        return self._adapters[name]

    def _save_model(self, out: Path) -> Path:
        stamp, stamp_path = model_stamp(self.work.model), out / "bench-stamp.json"
        if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
            print(f"  using the model saved in {out}", file=sys.stderr)
            return out
        started = time.perf_counter()
        stamp_path.unlink(missing_ok=True)  # written last: a save cut short is never taken for a whole one
        self.work.model.save_pretrained(out, safe_serialization=True)
        self.work.tokenizer.save_pretrained(out)
        stamp_path.write_text(json.dumps(stamp))
        print(f"  saved the model in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        return out

    def _save_adapter(self, name: str, out: Path) -> Path:
        from safetensors.torch import save_file

        config = dataclasses.replace(self.work.lora_config, base_model_name_or_path=str(self.model_dir()))
        config.save_pretrained(out)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.work.adapters[name].items()}
        save_file(state, out / "adapter_model.safetensors")
        return out


def model_stamp(model) -> dict:
    """Shape, dtype and a few weights' sums: enough to tell another build from this one."""
    params = dict(model.named_parameters())
    probes = [
        next(iter(params)),
        *(n for n in params if n.endswith(("layers.0.self_attn.q_proj.weight", "lm_head.weight"))),
    ]
    stamp = {
        "config": model.config.to_diff_dict(),
        "dtype": str(next(model.parameters()).dtype),
        "fingerprint": {n: float(params[n].detach().flatten()[:4096].float().sum()) for n in probes},
    }
    return json.loads(json.dumps(stamp, default=str))  # as it reads back from the file (tuples become lists)
