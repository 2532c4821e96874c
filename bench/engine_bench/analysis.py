"""Correctness beside the speed: token match rates, and where ours leaves hf_peft, how close that call was.

Greedy scenarios only: sampled rows draw from different random streams in each method.
"""

from __future__ import annotations

import statistics
import sys

import torch

from bench.engine_bench.hf_peft import peft_model
from bench.engine_bench.measure import MethodResult, release_cuda_memory
from bench.engine_bench.workload import Scenario, Workload, prompts, row_adapters
from bench.stats import percentile


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


def match_rates(methods: dict[str, MethodResult], work: Workload, *, reference: str = "hf_peft") -> dict:
    """Ours against `reference` per greedy scenario, token for token (same prompts, same adapters per row)."""
    ours, other = methods.get("ours"), methods.get(reference)
    if not ours or not other:
        return {}
    greedy = {s.name for s in work.scenarios if not s.sampled}
    return {
        name: match_summary(rows, other.token_ids[name], work.output_len)
        for name, rows in ours.token_ids.items()
        if name in greedy and name in other.token_ids
    }


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


def reference_logits(
    model, work: Workload, scenario: Scenario, rows: slice, reference: list[list[int]]
) -> torch.Tensor:
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


def scenario_divergence(
    model, work: Workload, scenario: Scenario, ours: list[list[int]], reference: list[list[int]]
) -> dict:
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
    return {
        "rows_diverged": len(diverged),
        "rows": rows,
        "gap_at_divergence": {"p50": percentile(at, 50), "p90": percentile(at, 90), "max": max(at)} if at else None,
        "ours_token_rank": {
            "max": max(ranks, default=None),
            "counts": {str(r): ranks.count(r) for r in sorted(set(ranks))},
        },
        "top2_gap": {"p10": percentile(top2, 10), "p50": percentile(top2, 50)},
        "per_row": diverged,
    }


def divergence(work: Workload, methods: dict[str, MethodResult]) -> dict:
    """Per decode scenario: at each row's first token where ours differs from hf_peft, how far apart the two
    tokens were in hf_peft's own logits. Explains a match below 1 (bf16 near-ties) or exposes a bug.

    Runs after every method: run_all unwrapped the PEFT model for ours, so it is wrapped again here and
    unwrapped at the end, one copy of the base weights throughout."""
    ours, hf = methods.get("ours"), methods.get("hf_peft")
    if not ours or not hf or ours.skipped or hf.skipped or ours.error or hf.error:
        return {}
    scenarios = [
        s
        for s in work.scenarios
        if not (s.ttft_only or s.sampled) and s.name in ours.token_ids and s.name in hf.token_ids
    ]
    if not scenarios:
        return {}
    print("divergence:", file=sys.stderr)
    model, out = peft_model(work), {}
    try:
        for scenario in scenarios:
            try:
                out[scenario.name] = scenario_divergence(
                    model, work, scenario, ours.token_ids[scenario.name], hf.token_ids[scenario.name]
                )
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
