"""vLLM, the anchor (../shared/gpu/vllm/README.md): its offline API in a process and Python environment of its own.

The parent (run_vllm) writes the model and adapters as files and every scenario's prompts, adapters and
lengths as JSON, then starts, with PYTHONPATH cleared and vLLM's environment file sourced,

    python3 -m bench.engine_bench.vllm_child SPEC.json

from the repository root. The child builds LLM(model, **spec["engine"]) (enable_lora, max_loras, ...), sends
each scenario as TokensPrompt prompts with a LoRARequest per row (round-robin) and SamplingParams forcing
the length (min_tokens = max_tokens, ignore_eos; greedy at temperature 0, sampled at temperature 1 and
top_p 0.95 with request i seeded by i), and writes raw timings and token ids; the parent turns them into
the same records as every other method's. Only the standard library is imported at the top of this
module, and the child imports nothing of ours beyond it: vLLM's environment has neither our dependencies
nor their versions.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE = "bench.engine_bench.vllm_child"
WARMUP_TOKENS = 4


def vllm_unavailable(env_file: str) -> str | None:
    """Why vllm cannot run here, or None. With no env file, vllm must be importable in this environment."""
    if env_file:
        if not Path(env_file).is_file():
            return f"no vLLM environment: {env_file} is missing (../shared/gpu/vllm/README.md installs it)"
        return None
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed in this environment (give --vllm-env FILE)"
    return None


# -- the parent's side --------------------------------------------------------------------------------------------
def engine_kwargs(work, *, gpu_memory_utilization: float) -> dict:
    """The README's LLM(...) arguments, sized to this workload (8 adapters of rank 16 give its exact values)."""
    import torch

    dtype = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}[
        next(work.model.parameters()).dtype
    ]
    adapters = len(work.adapters)
    return {
        "dtype": dtype,
        "enable_lora": True,
        "max_loras": adapters,
        "max_lora_rank": int(work.lora_config.r),
        "max_cpu_loras": adapters,
        "max_model_len": max(1024, work.max_context),
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_num_seqs": max(64, work.max_streams),
        "enable_prefix_caching": False,
    }


def build_spec(work, disk, *, gpu_memory_utilization: float) -> dict:
    from bench.engine_bench.measure import TTFT_REPS
    from bench.engine_bench.workload import TEMPERATURE, TOP_P, new_tokens, prompts, row_adapters

    adapters = [
        {"name": name, "id": index + 1, "path": str(disk.adapter_dir(name))}  # LoRA ids start at 1
        for index, name in enumerate(work.adapters)
    ]
    scenarios = [
        {
            "name": s.name,
            "prompts": prompts(work, s).tolist(),
            "adapters": row_adapters(work, s),
            "new_tokens": new_tokens(work, s),
            "ttft_only": s.ttft_only,
            "sampled": s.sampled,
            "keep_tokens": not (s.ttft_only or s.sampled),
        }
        for s in work.scenarios
    ]
    engine = engine_kwargs(work, gpu_memory_utilization=gpu_memory_utilization)
    return {
        "model_dir": str(disk.model_dir()),
        "engine": engine,
        "adapters": adapters,
        "scenarios": scenarios,
        "waves": work.waves,
        "ttft_reps": TTFT_REPS,
        "sampling": {"temperature": TEMPERATURE, "top_p": TOP_P},
    }


def child_command(env_file: str, spec_path: Path) -> list[str]:
    if not env_file:
        return [sys.executable, "-m", MODULE, str(spec_path)]
    # The env file prepends to PYTHONPATH: cleared first, so that our bundle's packages (another
    # transformers) never shadow what vLLM runs with.
    script = 'source "$1" && export VLLM_USE_FLASHINFER_SAMPLER=0 && exec python3 -m "$2" "$3"'
    return ["env", "-u", "PYTHONPATH", "bash", "-c", script, "vllm-child", env_file, MODULE, str(spec_path)]


def run_child(command: list[str], *, timeout: float) -> int:
    """The child leads a process group of its own: vLLM's engine-core process goes with it on a timeout."""
    env = dict(os.environ, VLLM_USE_FLASHINFER_SAMPLER="0", PYTHONUNBUFFERED="1")  # flashinfer is not shipped
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=sys.stderr, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  vllm child still running after {timeout:.0f}s: stopping it", file=sys.stderr)
        return -1
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM to what is left of the child's process group, then SIGKILL after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace
        try:
            os.killpg(proc.pid, sig)
            while time.monotonic() < deadline:
                time.sleep(0.2)
                proc.poll()  # reaps the leader: a zombie would keep the group alive
                os.killpg(proc.pid, 0)  # raises once the group is empty
        except ProcessLookupError:
            return


def run_vllm(work, disk, *, env_file: str, timeout: float, gpu_memory_utilization: float):
    """Our copy of the model leaves the GPU while vLLM runs: vLLM sizes itself by a share of the whole
    device (gpu_memory_utilization) and refuses to start where less than that is free."""
    import torch

    from bench.engine_bench.measure import MethodResult, release_cuda_memory

    spec = build_spec(work, disk, gpu_memory_utilization=gpu_memory_utilization)
    with tempfile.TemporaryDirectory(prefix="engine-bench-vllm-") as tmp:
        spec["out"] = str(Path(tmp) / "vllm.json")
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        offload = torch.cuda.is_available()
        if offload:
            work.model.to("cpu")
            release_cuda_memory()
            free, total = torch.cuda.mem_get_info()  # vLLM asks for gpu_memory_utilization x total of it
            print(f"  GPU memory free for vLLM: {free / 2**30:.1f} of {total / 2**30:.1f} GiB", file=sys.stderr)
        try:
            code = run_child(child_command(env_file, spec_path), timeout=timeout)
        finally:
            if offload:
                work.model.to("cuda")
        if not Path(spec["out"]).is_file():
            return MethodResult(error=f"vllm child exited with {code} before writing results (its output is above)")
        raw = json.loads(Path(spec["out"]).read_text())
    result = records(work, raw)
    if code != 0:
        result.error = f"vllm child exited with {code} (its output is above); scenarios it finished are kept"
    return result


def records(work, raw: dict):
    """The child's raw timings as the records every method gives: the median of the waves per decode scenario."""
    from bench.engine_bench.measure import MethodResult, decode_record, keep, median_wave, ttft_record
    from bench.engine_bench.workload import distinct_adapters, new_tokens

    note = (
        f"vLLM {raw.get('versions', {}).get('vllm')} offline API in its own process; start-up = LLM(...) "
        f"from files (load, compile, CUDA graphs), {raw.get('import_s', 0):.0f}s of imports before it"
    )
    result = MethodResult(
        note=note,
        startup_s=raw.get("startup_s"),
        warmup_s=raw.get("warmup_s"),
        versions={**raw.get("versions", {}), "engine": raw.get("engine")},
    )
    for s in work.scenarios:
        data = raw.get("scenarios", {}).get(s.name)
        if data is None or "error" in data:
            result.scenarios[s.name] = data or {"error": "not measured: the vllm child stopped before it"}
            continue
        if s.ttft_only:
            keep(result, s.name, ttft_record(work.ttft_len, data["ttft_s"]), [])
            continue
        new, waves = new_tokens(work, s), []
        for wave in data["waves"]:
            record = decode_record(
                streams=s.streams,
                distinct=distinct_adapters(work, s),
                tokens=sum(wave["tokens"]),
                wall=wave["wall"],
                ttfts=wave.get("ttft") or [],
                tpots=wave.get("tpot") or [],
            )
            record["short_rows"] = sum(1 for n in wave["tokens"] if n != new)
            waves.append((record, wave.get("token_ids") or []))
        keep(result, s.name, *median_wave(waves))
    return result


# -- the child's side: the standard library and vllm only -----------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    spec_path = Path((argv or sys.argv[1:])[0])
    spec = json.loads(spec_path.read_text())
    out = Path(spec["out"])
    started = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    try:
        from vllm.inputs import TokensPrompt
    except ImportError:  # a TypedDict: the plain dict is the same thing
        TokensPrompt = dict

    imported = time.perf_counter()
    llm = LLM(model=spec["model_dir"], **spec["engine"])
    raw = {
        "versions": versions(vllm),
        "engine": spec["engine"],
        "import_s": imported - started,
        "startup_s": time.perf_counter() - imported,
        "scenarios": {},
        "complete": False,
    }
    print(f"vllm child: LLM ready after {raw['startup_s']:.0f}s", file=sys.stderr)
    loras = {a["name"]: LoRARequest(a["name"], a["id"], a["path"]) for a in spec["adapters"]}

    def params(scenario: dict, new: int, row: int):
        length = {"max_tokens": new, "min_tokens": new, "ignore_eos": True}
        if scenario["sampled"]:
            return SamplingParams(**length, **spec["sampling"], seed=row)
        return SamplingParams(**length, temperature=0)

    def generate(scenario: dict, new: int):
        batch = [TokensPrompt(prompt_token_ids=ids) for ids in scenario["prompts"]]
        sampling = [params(scenario, new, row) for row in range(len(batch))]
        names = scenario["adapters"]
        lora = None if not any(names) else [loras[name] if name else None for name in names]
        begun = time.perf_counter()
        outputs = llm.generate(batch, sampling, lora_request=lora, use_tqdm=False)
        return outputs, time.perf_counter() - begun

    begun = time.perf_counter()
    for scenario in spec["scenarios"]:  # every shape, greedy and sampled, before anything is measured
        generate(scenario, 1 if scenario["ttft_only"] else WARMUP_TOKENS)
    raw["warmup_s"] = time.perf_counter() - begun
    for scenario in spec["scenarios"]:
        try:
            raw["scenarios"][scenario["name"]] = measure(scenario, generate, spec)
        except Exception as exc:  # e.g. out of memory: recorded, the others still run
            raw["scenarios"][scenario["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"vllm child: {scenario['name']} done", file=sys.stderr)
        out.write_text(json.dumps(raw))  # after each: what finished survives a crash or a timeout
    raw["complete"] = True
    out.write_text(json.dumps(raw))
    shutdown = getattr(getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
    if callable(shutdown):  # its engine-core process, now rather than at interpreter exit
        shutdown()
    return 0


def measure(scenario: dict, generate, spec: dict) -> dict:
    if scenario["ttft_only"]:
        generate(scenario, 1)  # warm-up for this prompt, as for the other methods
        return {"ttft_s": [generate(scenario, 1)[1] for _ in range(spec["ttft_reps"])]}
    waves = []
    for _ in range(max(spec["waves"], 1)):
        outputs, wall = generate(scenario, scenario["new_tokens"])
        wave = {"wall": wall, "tokens": [len(o.outputs[0].token_ids) for o in outputs], **latencies(outputs)}
        if scenario["keep_tokens"]:
            wave["token_ids"] = [list(o.outputs[0].token_ids) for o in outputs]
        waves.append(wave)
    return {"waves": waves}


def latencies(outputs) -> dict:
    """Per-request TTFT and TPOT where vLLM kept request metrics (it does when its stats are on); else none."""
    ttft, tpot = [], []
    for output in outputs:
        metrics = getattr(output, "metrics", None)
        first = getattr(metrics, "first_token_latency", None)
        first_ts, last_ts = getattr(metrics, "first_token_ts", None), getattr(metrics, "last_token_ts", None)
        n = len(output.outputs[0].token_ids)
        if first is None or first_ts is None or last_ts is None:
            return {}
        ttft.append(float(first))
        if n > 1:
            tpot.append((float(last_ts) - float(first_ts)) / (n - 1))
    return {"ttft": ttft, "tpot": tpot}


def versions(vllm) -> dict:
    out = {"vllm": getattr(vllm, "__version__", None), "python": sys.version.split()[0]}
    for package in ("torch", "transformers"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
