"""What a run prints and writes: the machine, the tables, the JSON."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from bench.engine_bench.measure import MethodResult
from bench.engine_bench.workload import MATCH_SCENARIO, SAMPLED_SUFFIX

REPO_ROOT = Path(__file__).resolve().parents[2]
METHODS = ("hf_peft", "hf_static", "unsloth", "vllm", "ours", "ours_sdpa", "ours_eager")
BASELINES = ("hf_peft", "unsloth", "vllm")  # ours/<baseline> columns, where the baseline ran


# -- the machine ------------------------------------------------------------------------------------------------
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
            return subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def machine_info() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "gpu": gpu,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "versions": versions(),
        "git": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# -- JSON -------------------------------------------------------------------------------------------------------
def method_json(result: MethodResult) -> dict:
    out = {
        "skipped": result.skipped,
        "error": result.error,
        "note": result.note,
        "warmup_s": result.warmup_s,
        "startup_s": result.startup_s,
        "scenarios": result.scenarios,
    }
    if result.versions:
        out["versions"] = result.versions
    if MATCH_SCENARIO in result.token_ids:
        out["token_ids"] = {MATCH_SCENARIO: result.token_ids[MATCH_SCENARIO]}
    return out


def write_json(out: dict, path: str, *, quiet: bool = False) -> None:
    Path(path).resolve().parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))
    if not quiet:
        print(f"wrote {path}")


# -- tables -----------------------------------------------------------------------------------------------------
def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def speed_ratio(record: dict | None, other: dict | None) -> float | None:
    """How much faster `record` is than `other`: tok/s over tok/s, or their TTFT over its TTFT."""
    if not record or not other:
        return None
    if "tok_s" in record and "tok_s" in other:
        return record["tok_s"] / other["tok_s"]
    if record.get("ttft_ms") and other.get("ttft_ms"):
        return other["ttft_ms"]["p50"] / record["ttft_ms"]["p50"]
    return None


def cell_text(record: dict | None) -> str:
    if not record or "error" in record or record.get("skipped"):
        return "err" if record and "error" in record else "-"
    if "tok_s" in record:
        return f"{record['tok_s']:.1f} ({fmt(record.get('pct_roofline'), '.0f')}%)"
    return f"{record['ttft_ms']['p50']:.1f} ms"


def print_tables(out: dict) -> None:
    methods = out["methods"]
    names = [m for m in METHODS if m in methods]
    baselines = [b for b in BASELINES if b in names and not methods[b]["skipped"] and "ours" in names]
    matches = [(label, out[key]) for label, key in (("match", "match"), ("match vllm", "match_vllm")) if out.get(key)]
    scenarios = out["config"]["scenario_variants"]

    def cell(method: str, scenario: str) -> dict | None:
        return methods[method]["scenarios"].get(scenario)

    print(
        f"\nthroughput tok/s (% of roofline); ttft rows: TTFT p50 ms. Ratios > 1: ours better. "
        f"Bandwidth {out['bandwidth']['GB_per_s']:.0f} GB/s"
    )
    print(
        f"{'scenario':<21}{'roofline':>10}"
        + "".join(f"{m:>18}" for m in names)
        + "".join(f"{'ours/' + b:>14}" for b in baselines)
        + "".join(f"{label:>11}" for label, _ in matches)
    )
    for s in scenarios:
        roof = out["roofline"]["scenarios"].get(s, {})
        bound = roof.get(str(roof.get("distinct_adapters")))
        ratios = [speed_ratio(cell("ours", s), cell(b, s)) for b in baselines]  # > 1: ours better
        print(
            f"{s:<21}{fmt(bound and bound['tok_s']):>10}"
            + "".join(f"{cell_text(cell(m, s)):>18}" for m in names)
            + "".join(f"{fmt(r, '.2f'):>14}" for r in ratios)
            + "".join(f"{fmt(match.get(s, {}).get('mean'), '.2f'):>11}" for _, match in matches)
        )
    print_sampling_cost(out, names)

    print("\nlatency ms: TTFT p50 / TPOT p50 (all streams start together)")
    print(f"{'scenario':<21}" + "".join(f"{m:>18}" for m in names))
    for s in scenarios:
        cells = []
        for m in names:
            r = cell(m, s) or {}
            ttft, tpot = (r.get("ttft_ms") or {}).get("p50"), (r.get("tpot_ms") or {}).get("p50")
            cells.append(f"{fmt(ttft)} / {fmt(tpot)}" if ttft is not None else "-")
        print(f"{s:<21}" + "".join(f"{c:>18}" for c in cells))

    startups = [f"{m} {methods[m]['startup_s']:.1f}s" for m in names if methods[m].get("startup_s") is not None]
    if startups:
        print(
            "\nstart-up (ours: engine and adapters on a model already in memory; vllm: LLM(...) from files): "
            + ", ".join(startups)
        )
    for m in names:
        info = methods[m]
        errors = {s: r["error"] for s, r in info["scenarios"].items() if "error" in r}
        for label, text in (("error", info["error"]), ("note", info["note"]), ("scenario errors", errors or None)):
            if text:
                print(f"{m} {label}: {text}")
    if out.get("divergence"):
        print_divergence(out["divergence"])


def print_sampling_cost(out: dict, names: list[str]) -> None:
    """sampled / greedy speed per method: below 1, sampling costs that share of the greedy speed."""
    methods, pairs = out["methods"], []
    for s in out["config"]["scenario_variants"]:
        if s.endswith(SAMPLED_SUFFIX) and s.removesuffix(SAMPLED_SUFFIX) in out["config"]["scenario_variants"]:
            pairs.append((s.removesuffix(SAMPLED_SUFFIX), s))
    if not pairs:
        return
    print("\nsampled / greedy speed (temperature 1, top_p 0.95; < 1: sampling costs)")
    print(f"{'scenario':<21}" + "".join(f"{m:>18}" for m in names))
    for greedy, sampled in pairs:
        cells = [
            fmt(speed_ratio(methods[m]["scenarios"].get(sampled), methods[m]["scenarios"].get(greedy)), ".2f")
            for m in names
        ]
        print(f"{greedy:<21}" + "".join(f"{c:>18}" for c in cells))


def print_divergence(divergence: dict) -> None:
    print(
        "\nfirst divergence of ours from hf_peft, in hf_peft's own logits (teacher-forced): gap = logit(hf token) "
        "- logit(ours), in the model dtype's rounding steps.\nNear-ties: gaps far below the usual top1-top2 gap, "
        "ours' token ranked 1 (0: tied, 2: three close). A usual-sized gap or a higher rank is a wrong token."
    )
    print(
        f"{'scenario':<15}{'diverged':>10}{'gap p50':>10}{'gap max':>10}{'top1-top2 p10':>15}"
        f"{'top1-top2 p50':>15}{'ours rank max':>15}"
    )
    for name, record in divergence.items():
        if "error" in record:
            print(f"{name:<15}  error: {record['error']}")
            continue
        at, top2 = record["gap_at_divergence"] or {}, record["top2_gap"]
        print(
            f"{name:<15}{record['rows_diverged']:>5}/{record['rows']:<4}{fmt(at.get('p50'), '.4f'):>10}"
            f"{fmt(at.get('max'), '.4f'):>10}{fmt(top2['p10'], '.4f'):>15}{fmt(top2['p50'], '.4f'):>15}"
            f"{fmt(record['ours_token_rank']['max'], 'd'):>15}"
        )
