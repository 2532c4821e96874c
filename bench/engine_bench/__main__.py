"""python -m bench.engine_bench: parse the flags, build the workload, run the methods, print and write the results.
(The package's docstring, bench/engine_bench/__init__.py, says what is measured.)"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

import bench.engine_bench as package
from bench.engine_bench.analysis import adapter_effect, divergence, match_rates
from bench.engine_bench.hf_peft import peft_model, run_hf_peft, run_hf_static
from bench.engine_bench.measure import MethodResult, release_cuda_memory
from bench.engine_bench.ours import run_ours
from bench.engine_bench.report import METHODS, machine_info, method_json, print_tables, write_json
from bench.engine_bench.roofline import add_roofline_pct, copy_bandwidth, roofline
from bench.engine_bench.unsloth_child import run_unsloth, unsloth_unavailable
from bench.engine_bench.vllm_child import run_vllm, vllm_unavailable
from bench.engine_bench.workload import (
    DTYPES,
    LOWEST_PROMPT_ID,
    SAMPLING_MODES,
    SCENARIOS,
    SavedWorkload,
    Workload,
    adapter_name,
    default_dtype,
    device,
    expand,
    load_model,
    lora_config,
    model_dtype,
    random_adapter,
)
from server.settings import ServerSettings

ORDER = ("unsloth", "hf_peft", "hf_static", "ours_eager", "ours_sdpa", "ours", "vllm")


def build_workload(args, model, tokenizer, model_dir) -> Workload:
    vocab = min(model.config.vocab_size, len(tokenizer))  # the 8B shape has more ids than the tiny tokenizer
    adapters = {
        adapter_name(i): random_adapter(model, rank=args.rank, seed=args.seed + i) for i in range(args.adapters)
    }
    return Workload(
        model=model,
        tokenizer=tokenizer,
        model_dir=model_dir,
        lora_config=lora_config(args.rank),
        adapters=adapters,
        input_len=args.input_len,
        output_len=args.output_len,
        ttft_len=args.ttft_len,
        prompt_high=vocab,
        seed=args.seed,
        scenarios=expand(args.scenarios, args.sampling),
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        waves=args.waves,
    )


def skip_reason(method: str, args) -> str | None:
    if method == "hf_static" and not torch.cuda.is_available():
        return "needs CUDA (transformers only auto-compiles the static-cache decode there)"
    if method == "unsloth":
        if args.dtype != "bfloat16" and not unsloth_unavailable():
            # its loader picks its own dtype (bf16 where supported): it would not run at the chosen precision
            return f"runs in bf16 only here, not --dtype {args.dtype}"
        return unsloth_unavailable()
    if method == "vllm":
        return vllm_unavailable(args.vllm_env)
    return None


def run_method(method: str, work: Workload, args, hf_model, disk: SavedWorkload) -> MethodResult:
    if method == "hf_peft":
        return run_hf_peft(hf_model, work)
    if method == "hf_static":
        return run_hf_static(hf_model, work, adapters=args.hf_static_adapters)
    if method == "unsloth":
        return run_unsloth(work, disk, timeout=args.unsloth_timeout)
    if method == "vllm":
        return run_vllm(
            work,
            disk,
            env_file=args.vllm_env,
            timeout=args.vllm_timeout,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        )
    return run_ours(work, cuda_graphs=method != "ours_eager", decode_kernel=method != "ours_sdpa")


def run_all(args, work: Workload, *, progress=None) -> dict[str, MethodResult]:
    """Unsloth first (it loads the untouched model from disk), then HF on a PEFT wrapping of the model, then
    ours on the model that unwrapping gives back, then vLLM (from disk too; it needs the GPU to itself, so
    our copy of the weights waits in host memory meanwhile, and ours' results exist before vLLM's start-up
    of two minutes): one copy of the weights in this process. `progress(results)` after each method."""
    order = [m for m in ORDER if m in args.methods]
    results, hf_model = {}, None
    with contextlib.ExitStack() as stack:
        root = (
            Path(args.save_dir)
            if args.save_dir
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="engine-bench-files-")))
        )
        disk = SavedWorkload(work, root)
        for method in order:
            reason = skip_reason(method, args)
            if reason:
                results[method] = MethodResult(skipped=True, note=reason)
                continue
            print(f"{method}:", file=sys.stderr)
            try:
                if method in ("hf_peft", "hf_static") and hf_model is None:
                    hf_model = peft_model(work)
                if method not in ("hf_peft", "hf_static") and hf_model is not None:  # PEFT wrapped it in place
                    work.model, hf_model = hf_model.unload(), None
                results[method] = run_method(method, work, args, hf_model, disk)
            except Exception as exc:  # e.g. a child that cannot start: record and go on
                results[method] = MethodResult(error=f"{type(exc).__name__}: {exc}")
                print(f"  failed: {results[method].error}", file=sys.stderr)
            release_cuda_memory()
            if progress:
                progress({m: results[m] for m in args.methods if m in results})
        if hf_model is not None:  # hf methods ran last: the analysis wraps the plain model again itself
            work.model = hf_model.unload()
    return {m: results[m] for m in args.methods}


def split_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.engine_bench", description=package.__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--model",
        default=None,
        help="tiny (the default on CPU), llama3-8b-random (the default on CUDA), or a local model dir",
    )
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument(
        "--sampling",
        default=",".join(SAMPLING_MODES),
        help="greedy, sampled or both (temperature 1, top_p 0.95, request i seeded with i)",
    )
    p.add_argument(
        "--waves", type=int, help="decode scenarios: report the median of this many waves (default 3; --quick 1)"
    )
    p.add_argument("--quick", action="store_true", help="CPU sizes: input 32, output 16, TTFT prompt 64, 4 adapters")
    p.add_argument("--input-len", type=int, help="prompt tokens (default 128; --quick 32)")
    p.add_argument("--output-len", type=int, help="new tokens per stream (default 128; --quick 16)")
    p.add_argument("--ttft-len", type=int, help="prompt tokens of ttft512 (default 512; --quick 64)")
    p.add_argument("--adapters", type=int, help="distinct adapters (default 8; --quick 4)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--hf-static-adapters",
        choices=["mixed", "none"],
        default="mixed",
        help="hf_static on the PEFT mixed-adapter model, or on the base model with adapters disabled",
    )
    p.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=ServerSettings.model_fields["prefill_chunk_tokens"].default,
        help="ours: prompt tokens prefilled per step (default: the server's)",
    )
    p.add_argument("--unsloth-timeout", type=float, default=1800.0, help="seconds for the Unsloth process")
    p.add_argument(
        "--vllm-env",
        default="/tmp/vllm_env.sh",
        help="file sourced (PYTHONPATH cleared first) before the vLLM process starts; '' = this "
        "environment (../shared/gpu/vllm/README.md)",
    )
    p.add_argument("--vllm-timeout", type=float, default=600.0, help="seconds for the vLLM process")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.85)
    p.add_argument(
        "--save-dir",
        help="where methods in other processes find the model and adapters as files; "
        "a model saved there before (same weights) is used again (default: a temp dir)",
    )
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="model weights and compute (default bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write everything here")
    args = p.parse_args(argv)
    quick = args.quick
    args.model = args.model or ("llama3-8b-random" if torch.cuda.is_available() else "tiny")
    args.dtype = args.dtype or default_dtype()
    args.input_len = args.input_len or (32 if quick else 128)
    args.output_len = args.output_len or (16 if quick else 128)
    args.ttft_len = args.ttft_len or (64 if quick else 512)
    args.adapters = args.adapters or (4 if quick else 8)
    args.waves = args.waves or (1 if quick else 3)
    args.methods, args.scenarios, args.sampling = (split_list(v) for v in (args.methods, args.scenarios, args.sampling))
    for value, known, flag in (
        (args.methods, METHODS, "--methods"),
        (args.scenarios, SCENARIOS, "--scenarios"),
        (args.sampling, SAMPLING_MODES, "--sampling"),
    ):
        unknown = [v for v in value if v not in known]
        if unknown or not value:
            p.error(f"{flag}: unknown or empty {unknown}; choose from {','.join(known)}")
    return args


def results_json(
    args,
    work: Workload,
    methods: dict[str, MethodResult],
    *,
    bandwidth: dict,
    roof: dict,
    load_s: float,
    diverged: dict | None = None,
) -> dict:
    add_roofline_pct(methods, roof)
    config = {k: v for k, v in vars(args).items() if k != "json"}
    config.update(
        dtype=str(model_dtype(args.dtype)),
        device=str(device()),
        model_load_s=load_s,
        scenario_variants=[s.name for s in work.scenarios],
        model_config={
            k: getattr(work.model.config, k, None)
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
            )
        },
        prompt_ids=[LOWEST_PROMPT_ID, work.prompt_high],
    )
    return {
        "machine": machine_info(),
        "config": config,
        "bandwidth": bandwidth,
        "roofline": roof,
        "methods": {m: method_json(r) for m, r in methods.items()},
        "match": match_rates(methods, work),
        "match_vllm": match_rates(methods, work, reference="vllm"),
        "lora_vs_base_match": adapter_effect(methods, args.output_len),
        "divergence": diverged or {},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    bandwidth = copy_bandwidth(quick=args.quick)
    started = time.perf_counter()
    model, tokenizer, model_dir = load_model(args.model, model_dtype(args.dtype))
    load_s = time.perf_counter() - started
    work = build_workload(args, model, tokenizer, model_dir)
    roof = roofline(work, bandwidth=bandwidth["GB_per_s"] * 1e9)  # before any wrapping adds LoRA parameters
    measured = {"bandwidth": bandwidth, "roof": roof, "load_s": load_s}

    def progress(done: dict[str, MethodResult]) -> None:  # a run cut short keeps the methods it finished
        if args.json:
            write_json(results_json(args, work, done, **measured), args.json, quiet=True)

    methods = run_all(args, work, progress=progress)
    out = results_json(args, work, methods, diverged=divergence(work, methods), **measured)
    print_tables(out)
    if args.json:
        write_json(out, args.json)
    ran = [r for r in methods.values() if not r.skipped]
    return 0 if any(r.error is None for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
