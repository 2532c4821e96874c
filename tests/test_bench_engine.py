"""Smoke test of the in-process engine benchmark (python -m bench.engine_bench) on CPU with the tiny model.

Checks that the harness runs end to end and its bookkeeping is consistent; never asserts on speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.live import REPO_ROOT

pytestmark = pytest.mark.slow

OUTPUT_LEN = 8
SCENARIOS = {"bs1": 1, "streams8": 8}  # name -> streams


def test_engine_bench_hf_peft_and_ours(tmp_path):
    out = tmp_path / "engine.json"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))  # the tiny model builds here, not in ~/.cache
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.engine_bench",
            "--model",
            "tiny",
            "--quick",
            "--methods",
            "hf_peft,ours",
            "--scenarios",
            ",".join(SCENARIOS),
            "--input-len",
            "16",
            "--output-len",
            str(OUTPUT_LEN),
            "--json",
            str(out),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ours/hf_peft" in proc.stdout

    result = json.loads(out.read_text())
    assert result["config"]["scenarios"] == list(SCENARIOS) and result["config"]["output_len"] == OUTPUT_LEN
    assert set(result["methods"]) == {"hf_peft", "ours"}
    assert result["bandwidth"]["GB_per_s"] > 0
    assert result["machine"]["versions"]["torch"] and result["machine"]["date"]
    for name, streams in SCENARIOS.items():
        assert result["roofline"]["scenarios"][name]["distinct_adapters"] == min(streams, 4)  # --quick: 4 adapters

    hf = result["methods"]["hf_peft"]
    assert hf["error"] is None and not hf["skipped"]
    check_scenarios(hf)

    ours = result["methods"]["ours"]
    assert ours["error"] is None, ours["error"]
    check_scenarios(ours)
    assert all(r["short_rows"] == 0 for r in ours["scenarios"].values())
    assert len(ours["token_ids"]["streams8"]) == 8 and len(hf["token_ids"]["streams8"]) == 8
    match = result["match"]["streams8"]
    assert len(match["per_row"]) == 8 and 0 <= match["mean"] <= 1
    # fp32 on CPU, same prompts, same adapter per row: greedy tokens agree with HF + PEFT (1.0 when written).
    # A wrong adapter diverges at the first token (the random adapters move every row off the base model's
    # choice), so this margin tolerates one near-tie flip and still catches mix-ups.
    assert match["mean"] >= 0.75, match
    assert result["config"]["dtype"] == "torch.float32"  # the CPU default of --dtype

    # The divergence analysis runs whenever ours and hf_peft both ran: one entry per decode scenario, over all
    # rows. In fp32 on the CPU ours is HF's computation token for token, so no row may part from it.
    assert "first divergence of ours from hf_peft" in proc.stdout
    divergence = result["divergence"]
    assert set(divergence) == set(SCENARIOS)
    for name, streams in SCENARIOS.items():
        record = divergence[name]
        assert record["rows"] == streams, record
        assert record["rows_diverged"] == 0 and record["per_row"] == [] and record["gap_at_divergence"] is None, record
        assert 0 <= record["top2_gap"]["p10"] <= record["top2_gap"]["p50"], record


def check_scenarios(method: dict) -> None:
    for name, streams in SCENARIOS.items():
        record = method["scenarios"][name]
        assert "error" not in record, record
        assert record["streams"] == streams and record["tokens"] == OUTPUT_LEN * streams
        assert record["tok_s"] > 0 and record["wall_s"] > 0 and record["pct_roofline"] > 0
        assert 0 < record["ttft_ms"]["p50"] <= record["wall_s"] * 1000
        assert record["tpot_ms"]["p50"] > 0


def run_bench(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "engine.json"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.engine_bench",
            "--model",
            "tiny",
            "--quick",
            "--input-len",
            "16",
            "--output-len",
            str(OUTPUT_LEN),
            "--json",
            str(out),
            *extra,
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def test_engine_bench_sampled_scenarios(tmp_path):
    proc, result = run_bench(tmp_path, "--methods", "ours", "--scenarios", ",".join(SCENARIOS), "--sampling", "sampled")
    sampled = [f"{name}_sampled" for name in SCENARIOS]
    assert result["config"]["scenario_variants"] == sampled and result["config"]["sampling"] == ["sampled"]
    rows = [line.split()[0] for line in proc.stdout.splitlines() if line.split()]
    assert set(sampled) <= set(rows), proc.stdout
    ours = result["methods"]["ours"]
    assert ours["error"] is None, ours["error"]
    assert set(ours["scenarios"]) == set(sampled)
    for name, streams in SCENARIOS.items():
        record = ours["scenarios"][f"{name}_sampled"]
        assert record["streams"] == streams and record["tokens"] == OUTPUT_LEN * streams, record
        assert record["short_rows"] == 0 and record["tok_s"] > 0 and record["pct_roofline"] > 0
    assert result["match"] == {} and result["divergence"] == {}  # sampled rows are never compared token for token


FAKE_VLLM = '''
"""A stand-in for vllm with its offline API's names: checks what the benchmark's child sends, answers with
max_tokens tokens, and logs every call."""
import json, os, sys
__version__ = "0.0-fake"
LOG = os.environ["FAKE_VLLM_LOG"]

def log(**entry):
    with open(LOG, "a") as fh:
        fh.write(json.dumps(entry) + "\\n")

class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

class LLM:
    def __init__(self, model, **kwargs):
        log(event="init", model=model, kwargs=kwargs, heavy=[m for m in ("torch", "transformers") if m in sys.modules])
        self.llm_engine = None

    def generate(self, prompts, sampling_params, lora_request=None, use_tqdm=True):
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
        log(event="generate", rows=len(prompts), prompt_len=len(prompts[0]["prompt_token_ids"]),
            params=[p.kwargs for p in sampling_params],
            loras=[None if r is None else [r.lora_name, r.lora_int_id, os.path.isfile(os.path.join(r.lora_path,
                   "adapter_config.json"))] for r in loras])
        return [Output(p["prompt_token_ids"][-1], s.kwargs["max_tokens"]) for p, s in zip(prompts, sampling_params)]

class Output:
    def __init__(self, token, n):
        self.outputs = [type("Completion", (), {"token_ids": [token] * n})()]
'''


def fake_vllm_env(tmp_path) -> tuple[str, str]:
    site = tmp_path / "fake_site"
    request = "from dataclasses import dataclass\n\n\n@dataclass\nclass LoRARequest:\n" + "".join(
        f"    {field}\n" for field in ("lora_name: str", "lora_int_id: int", "lora_path: str")
    )
    for name, text in {
        "vllm/__init__.py": FAKE_VLLM,
        "vllm/inputs.py": "TokensPrompt = dict\n",
        "vllm/lora/__init__.py": "",
        "vllm/lora/request.py": request,
    }.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(text)
    env_file, log = tmp_path / "vllm_env.sh", tmp_path / "fake_vllm.log"
    # As /tmp/vllm_env.sh does on the GPU machine, only with the fake in place of /tmp/vllm_site.
    env_file.write_text(f"export PYTHONPATH={site} PATH={Path(sys.executable).parent}:$PATH FAKE_VLLM_LOG={log}\n")
    return str(env_file), str(log)


def test_engine_bench_vllm_child_with_a_fake_vllm(tmp_path):
    """The vllm method end to end on CPU: files and spec out, a child in the environment the env file gives
    (none of our dependencies imported there), the offline API called as the vLLM README says, records back."""
    env_file, log = fake_vllm_env(tmp_path)
    proc, result = run_bench(
        tmp_path,
        "--methods",
        "ours,vllm",
        "--scenarios",
        "bs1,streams8,ttft512",
        "--waves",
        "2",
        "--vllm-env",
        env_file,
    )
    assert "ours/vllm" in proc.stdout and "sampled / greedy" in proc.stdout
    vllm = result["methods"]["vllm"]
    assert vllm["error"] is None and not vllm["skipped"], vllm
    assert vllm["startup_s"] is not None and vllm["versions"]["vllm"] == "0.0-fake"
    for name, streams in SCENARIOS.items():
        for variant in (name, f"{name}_sampled"):
            record = vllm["scenarios"][variant]
            assert record["streams"] == streams and record["tokens"] == OUTPUT_LEN * streams, record
            assert record["short_rows"] == 0 and len(record["waves_tok_s"]) == 2 and record["pct_roofline"] > 0
    assert vllm["scenarios"]["ttft512"]["reps"] == 3 and vllm["scenarios"]["ttft512"]["prompt_len"] == 64
    assert len(vllm["token_ids"]["streams8"]) == 8 and set(result["match_vllm"]) == set(SCENARIOS)

    calls = [json.loads(line) for line in Path(log).read_text().splitlines()]
    init = calls[0]
    assert init["event"] == "init" and init["heavy"] == [], init
    assert {
        k: init["kwargs"][k]
        for k in ("enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "enable_prefix_caching", "max_num_seqs")
    } == {
        "enable_lora": True,
        "max_loras": 4,
        "max_lora_rank": 16,
        "max_cpu_loras": 4,
        "enable_prefix_caching": False,
        "max_num_seqs": 64,
    }
    eight = [c for c in calls[1:] if c["rows"] == 8 and c["params"][0]["max_tokens"] == OUTPUT_LEN]
    assert len(eight) == 4  # streams8 greedy and sampled, two waves each (warm-ups are shorter)
    for call in eight:
        assert [lora[:2] for lora in call["loras"]] == [[f"a{i % 4}", i % 4 + 1] for i in range(8)]
        assert all(lora[2] for lora in call["loras"])  # a PEFT dir on disk
        length = {"max_tokens": OUTPUT_LEN, "min_tokens": OUTPUT_LEN, "ignore_eos": True}
        for row, params in enumerate(call["params"]):
            assert params in ({**length, "temperature": 0}, {**length, "temperature": 1.0, "top_p": 0.95, "seed": row})


def test_profile_step_splits_a_first_token_into_host_phases_that_add_up(tmp_path):
    """bench/profile_step.py --prefill on the CPU's tiny model: each first token's phases, which must
    account for its wall time (the rest is small and never negative beyond clock noise)."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.profile_step", "--prefill", "24", "--model", "tiny"],
        cwd=REPO_ROOT,
        env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache")),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "phases:" in line]
    assert len(lines) == 4  # two requests, with an adapter and without
    for line in lines:
        values = dict(
            (part.rsplit(" ", 1)[0].strip(), float(part.rsplit(" ", 1)[1].removesuffix(" ms")))
            for part in line.split("phases:")[1].replace(" ms,", ",").split(",")
        )
        assert values["forward (host)"] > 0 and values["admission"] >= 0 and values["delivery"] >= 0
        assert values["rest"] > -0.5, line


def test_the_adapter_load_bench_measures_an_8b_adapter(capsys, monkeypatch):
    """Its adapters are what an 8B rank-16 load reads (448 tensors, 84 MB) and the slots take them; it prints the
    two sides of a load."""
    import sys

    from bench import adapter_load_bench

    weights = adapter_load_bench.state_dict(adapter_load_bench.projection_shapes_8b(), rank=16, seed=0)
    assert len(weights) == 448 and round(sum(t.nbytes for t in weights.values()) / 1e6) == 84
    monkeypatch.setattr(sys, "argv", ["adapter_load_bench", "--adapters", "2", "--rank", "2", "--device", "cpu"])
    adapter_load_bench.main()
    out = capsys.readouterr().out
    assert "2 adapters of 10 MB (448 tensors), rank 2, on cpu" in out and "keep (the worker)" in out


def test_the_start_up_split_reads_a_server_log():
    """The H100 server log of 2026-12-08 gives the split worked out by hand that day (its NOTES.md); a log with the
    engine process started first, and the kernels built beside the load, reads as such."""
    from pathlib import Path

    from bench.startup_split import split

    log = (Path(__file__).parents[1] / "bench/results/gpu-h100-2026-12-08-vllm/http/ours_server.log").read_text()
    parts = {p.name: round(p.seconds, 1) for p in split(log, total=55.5)}
    assert parts["process start → loading began (the server's imports, the /ready poll)"] == 8.2
    assert parts["loading began → the model's load began (engine process start, imports)"] == 7.1
    assert (parts["model load"], parts["engine state"], parts["8 adapters preloaded"]) == (13.0, 3.1, 9.3)
    assert (parts["warm-up: decode graphs"], parts["warm-up: sampler"]) == (6.9, 4.9)
    assert round(sum(v for k, v in parts.items() if not k.startswith("(beside)")), 1) == 55.5
    prelaunched = "\n".join(
        [
            "2026-12-09 10:00:05,000 INFO loraserve.runner: sampler kernels built during the model load in 2.0 s",
            "2026-12-09 10:00:05,800 INFO loraserve.runner: "
            "waited 0.2 s after the model load for the kernels built beside it",
            "2026-12-09 10:00:06,000 INFO loraserve.runner: model loaded in 4.8 s, engine state built in 1.0 s",
            "2026-12-09 10:00:06,500 INFO loraserve: base model /m loaded: backend=transformers device=cuda:0",
            "2026-12-09 10:00:07,500 INFO loraserve: adapter a0 version 1 loaded from a0 in 0.90 s",
            "2026-12-09 10:00:10,500 INFO loraserve.runner: warm-up: "
            "decode graphs 2.0 s, prefill graphs 0.5 s, sampler 0.0 s",
            "2026-12-09 10:00:10,600 INFO loraserve: ready: 1 adapters, 9.6 s after loading began",
        ]
    )
    parts = [(p.name, round(p.seconds, 1)) for p in split(prelaunched)]
    assert parts[0] == ("the model's load began before the server's loading did (engine process started first)", -1.0)
    assert ("(beside) sampler kernels", 2.0) in parts and ("1 adapters preloaded", 1.0) in parts
    assert ("waiting for the kernels built beside the load", 0.2) in parts
    assert ("warm-up: the rest, or what came before it that the log does not name", 0.5) in parts
    assert parts[-1] == ("→ ready", 0.1)
    late = prelaunched + "\n2026-12-09 10:00:11,000 INFO loraserve: adapter a1 version 2 loaded from a1 in 0.1 s"
    assert [(p.name, round(p.seconds, 1)) for p in split(late)] == parts  # what came after ready is not start-up
    assert round(sum(p.seconds for p in split(prelaunched) if not p.name.startswith("(beside)")), 1) == 9.6
