"""Unsloth, in a process of its own: importing it patches transformers for the whole process.

The parent (run_unsloth) saves the model and adapter a0 and starts

    python -m bench.engine_bench.unsloth_child SPEC.json

from the repository root; the child loads them with FastLanguageModel, runs every scenario with a0 on
every row (its fused path ignores per-row adapter names) and writes its records to the file SPEC names.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.engine_bench.hf_peft import hf_decode_record, hf_generate, hf_ttft
from bench.engine_bench.measure import Measured, MethodResult, record_scenario, repeat_waves, ttft_record
from bench.engine_bench.workload import (
    SavedWorkload,
    Scenario,
    Workload,
    adapter_name,
    new_tokens,
    prompts,
    scenario_named,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def unsloth_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    if importlib.util.find_spec("unsloth") is None:
        return "unsloth is not installed (pip install 'loraserve[unsloth]')"
    return None


# -- the parent's side --------------------------------------------------------------------------------------------
def run_unsloth(work: Workload, disk: SavedWorkload, *, timeout: float) -> MethodResult:
    spec = {
        "model_dir": str(disk.model_dir()),
        "adapter_dir": str(disk.adapter_dir(adapter_name(0))),
        "max_context": work.max_context,
        "input_len": work.input_len,
        "output_len": work.output_len,
        "ttft_len": work.ttft_len,
        "prompt_high": work.prompt_high,
        "seed": work.seed,
        "adapters": len(work.adapters),
        "waves": work.waves,
        "scenarios": [s.name for s in work.scenarios],
    }
    with tempfile.TemporaryDirectory(prefix="engine-bench-unsloth-") as tmp:
        spec["out"] = str(Path(tmp) / "unsloth.json")
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, "-m", "bench.engine_bench.unsloth_child", str(spec_path)],
            cwd=REPO_ROOT,
            stdout=sys.stderr,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0 or not Path(spec["out"]).is_file():
            return MethodResult(error=f"unsloth child exited with {proc.returncode} (its output is above)")
        data = json.loads(Path(spec["out"]).read_text())
    return MethodResult(
        note=data.get("note"), warmup_s=data.get("warmup_s"), scenarios=data["scenarios"], versions=data.get("versions")
    )


# -- the child's side ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Unsloth is imported before transformers, as it must be (nothing above imports transformers)."""
    import unsloth
    from unsloth import FastLanguageModel

    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=spec["model_dir"], max_seq_length=spec["max_context"], dtype=None, load_in_4bit=False
    )
    note = load_unsloth_adapter(model, spec["adapter_dir"])
    FastLanguageModel.for_inference(model)
    work = Workload(
        model=model,
        tokenizer=tokenizer,
        model_dir=Path(spec["model_dir"]),
        lora_config=None,
        adapters={adapter_name(i): {} for i in range(spec["adapters"])},
        input_len=spec["input_len"],
        output_len=spec["output_len"],
        ttft_len=spec["ttft_len"],
        prompt_high=spec["prompt_high"],
        seed=spec["seed"],
        scenarios=[scenario_named(n) for n in spec["scenarios"]],
        waves=spec["waves"],
    )
    result = MethodResult(note=note)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    hf_generate(model, prompts(work, Scenario("warmup", 2)), new=4, pad_id=pad_id)
    result.warmup_s = time.perf_counter() - started
    for scenario in work.scenarios:
        if scenario.adapters == "none":
            result.scenarios[scenario.name] = {"skipped": True, "note": "no base run: the adapter stays loaded"}
            continue
        record_scenario(result, scenario.name, lambda s=scenario: unsloth_scenario(model, work, s, pad_id=pad_id))
    versions = {"unsloth": unsloth.__version__, "transformers": importlib.metadata.version("transformers")}
    Path(spec["out"]).write_text(
        json.dumps(
            {"note": result.note, "warmup_s": result.warmup_s, "scenarios": result.scenarios, "versions": versions}
        )
    )
    return 0


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


def unsloth_scenario(model, work: Workload, scenario: Scenario, *, pad_id: int) -> Measured:
    batch, new = prompts(work, scenario), new_tokens(work, scenario)
    sampling = {"sampled": scenario.sampled, "seed": work.seed}
    if scenario.ttft_only:
        runs = hf_ttft(lambda: hf_generate(model, batch, new=new, pad_id=pad_id, **sampling))
        return ttft_record(batch.shape[1], runs), []

    def wave() -> Measured:
        run = hf_generate(model, batch, new=new, pad_id=pad_id, **sampling)
        return hf_decode_record(run, new=new, distinct=1), []

    return repeat_waves(wave, work.waves)


if __name__ == "__main__":
    sys.exit(main())
