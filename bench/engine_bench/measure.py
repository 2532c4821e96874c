"""The records every method fills in, so that the report compares like with like."""

from __future__ import annotations

import gc
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.stats import percentile

TTFT_REPS = 3

Measured = tuple[dict, list[list[int]]]  # a scenario's record and its token ids per row ([] when not kept)


@dataclass
class MethodResult:
    skipped: bool = False
    error: str | None = None
    note: str | None = None
    warmup_s: float | None = None
    startup_s: float | None = None  # ready to serve: ours' engine with its adapters, vLLM's LLM(...)
    scenarios: dict[str, dict] = field(default_factory=dict)
    token_ids: dict[str, list[list[int]]] = field(default_factory=dict)  # scenario -> rows; not all go to JSON
    versions: dict | None = None  # a child process's own


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release_cuda_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def ms_stats(seconds: list[float]) -> dict | None:
    if not seconds:
        return None
    ms = [s * 1000 for s in seconds]
    return {"mean": statistics.fmean(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90), "max": max(ms)}


def decode_record(
    *, streams: int, distinct: int, tokens: int, wall: float, ttfts: list[float], tpots: list[float]
) -> dict:
    return {
        "streams": streams,
        "distinct_adapters": distinct,
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "ttft_ms": ms_stats(ttfts),
        "tpot_ms": ms_stats(tpots),
    }


def ttft_record(prompt_len: int, ttfts: list[float]) -> dict:
    return {"streams": 1, "prompt_len": prompt_len, "reps": len(ttfts), "ttft_ms": ms_stats(ttfts)}


def median_wave(waves: list[Measured]) -> Measured:
    """The wave of median tok/s (the lower middle one of an even count), with every wave's tok/s beside it."""
    ordered = sorted(waves, key=lambda wave: wave[0]["tok_s"])
    record, ids = ordered[(len(ordered) - 1) // 2]
    return {**record, "waves_tok_s": [wave[0]["tok_s"] for wave in waves]}, ids


def repeat_waves(measure: Callable[[], Measured], waves: int) -> Measured:
    return median_wave([measure() for _ in range(max(waves, 1))])


def record_scenario(result: MethodResult, name: str, measure: Callable[[], Measured]) -> None:
    """One scenario's failure (e.g. out of memory at 64 streams) is recorded; the others still run."""
    try:
        record, ids = measure()
    except Exception as exc:  # a benchmark reports failures and moves on
        result.scenarios[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"  {name}: failed: {result.scenarios[name]['error']}", file=sys.stderr)
        release_cuda_memory()
        return
    keep(result, name, record, ids)


def keep(result: MethodResult, name: str, record: dict, ids: list[list[int]]) -> None:
    result.scenarios[name] = record
    if ids:
        result.token_ids[name] = ids
    print(f"  {name}: {summary_line(record)}", file=sys.stderr)


def summary_line(record: dict) -> str:
    if record.get("skipped"):
        return f"skipped: {record.get('note')}"
    if "tok_s" in record:
        return f"{record['tok_s']:.1f} tok/s, wall {record['wall_s']:.2f}s"
    return f"ttft p50 {record['ttft_ms']['p50']:.1f} ms"
