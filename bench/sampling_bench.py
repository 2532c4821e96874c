"""Time the device-side token choice (server/engine/sampling.py) alone: greedy against sampled
(temperature 1, top-p 0.95, a seed per row) at 1 / 8 / 32 / 64 rows over a Llama-3 vocabulary, on
each path the engine may take: plain torch ops, and on CUDA the Triton kernel (sampling_kernel.py).
Also counts how often the two paths draw different tokens for the same rows.

    python -m bench.sampling_bench [--vocab 128256] [--device cuda] [--kernel-configs 1024x4x2x512x8,...]

Two timings per path: "step ms" is what a step pays on the host's clock (the rows' parameters built from the
host, the choice, the copy back), "device µs" the choice's launches alone on the GPU (triton's do_bench,
parameters built beforehand), which is what a GPU-bound step at 64 rows adds.

On CUDA the kernel also runs at the launch shapes it had before 2026-12-07 ("before": 1024x4x2x1024x4), so every
run is an A/B of the search pass's own shape. --kernel-configs times more shapes (BLOCK x NUM_WARPS x
PROGRAMS_PER_SM x SEARCH_BLOCK x SEARCH_WARPS of sampling_kernel.py), to choose its constants on a new GPU.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from server.engine.sampling import SamplingParams, choose_with_torch, row_params


def rows(n: int, *, sampled: bool) -> list:
    params = SamplingParams(16, do_sample=sampled, temperature=1.0, top_p=0.95 if sampled else 1.0)
    return [SimpleNamespace(params=params, seed=i, generated=[], in_flight=0, prompt_ids=[1]) for i in range(n)]


def time_choice(choose, logits: torch.Tensor, seqs: list, *, repeats: int) -> float:
    """Median milliseconds of one choice, parameters built from the host included (as in a step)."""
    times = []
    for _ in range(repeats):
        if logits.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        choose(logits, row_params(seqs, logits.device)).cpu()
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2]


BEFORE = "1024x4x2x1024x4"  # the kernel's launch shapes until 2026-12-07 (its search pass spilled registers)
SHAPES = ("BLOCK", "NUM_WARPS", "PROGRAMS_PER_SM", "SEARCH_BLOCK", "SEARCH_WARPS")


def paths(device: str, configs: list[str]) -> dict:
    found = {"torch": choose_with_torch}
    if device.startswith("cuda"):
        from server.engine import sampling_kernel

        found["kernel"] = sampling_kernel.choose
        for config in [BEFORE, *configs]:
            label = "before" if config == BEFORE else config
            found[label] = with_constants(sampling_kernel, *map(int, config.split("x")))
    return found


def with_constants(module, *values: int):
    """module.choose run with its launch shapes (SHAPES) set to `values` for the call."""

    def choose(logits, rows):
        saved = [getattr(module, name) for name in SHAPES]
        for name, value in zip(SHAPES, values, strict=True):
            setattr(module, name, value)
        try:
            return module.choose(logits, rows)
        finally:
            for name, value in zip(SHAPES, saved):
                setattr(module, name, value)

    return choose


def device_microseconds(choose, logits: torch.Tensor, seqs: list) -> float:
    """The choice's launches alone, on the device's clock (median µs); nan off CUDA."""
    if not logits.is_cuda:
        return float("nan")
    from triton.testing import do_bench

    params = row_params(seqs, logits.device)
    return do_bench(lambda: choose(logits, params), warmup=10, rep=100, return_mode="median") * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--kernel-configs", default="", help=f"{'x'.join(SHAPES)},... beside the defaults")
    args = parser.parse_args()
    chooses = paths(args.device, [c for c in args.kernel_configs.split(",") if c])
    print(
        f"{'path':>17} {'rows':>5} {'greedy step ms':>15} {'sampled step ms':>16} {'greedy device µs':>17} "
        f"{'sampled device µs':>18} {'tokens differ':>14}"
    )
    for n in (1, 8, 32, 64):
        logits = torch.randn(n, args.vocab, device=args.device) * 2
        reference = choose_with_torch(logits, row_params(rows(n, sampled=True), logits.device))[0]
        for name, choose in chooses.items():
            greedy = time_choice(choose, logits, rows(n, sampled=False), repeats=args.repeats)
            sampled = time_choice(choose, logits, rows(n, sampled=True), repeats=args.repeats)
            greedy_us = device_microseconds(choose, logits, rows(n, sampled=False))
            sampled_us = device_microseconds(choose, logits, rows(n, sampled=True))
            differ = (choose(logits, row_params(rows(n, sampled=True), logits.device))[0] != reference).sum().item()
            times = f"{greedy:>15.3f} {sampled:>16.3f} {greedy_us:>17.1f} {sampled_us:>18.1f}"
            print(f"{name:>17} {n:>5} {times} {differ:>14}")


if __name__ == "__main__":
    main()
