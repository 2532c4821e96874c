"""Time the device-side token choice (server/engine/sampling.py) alone: greedy against sampled
(temperature 1, top-p 0.95, a seed per row) at 1 / 8 / 32 / 64 rows over a Llama-3 vocabulary, on
each path the engine may take: plain torch ops, and on CUDA the Triton kernel (sampling_kernel.py).
Also counts how often the two paths draw different tokens for the same rows.

    python -m bench.sampling_bench [--vocab 128256] [--device cuda] [--kernel-configs 1024x4x2,2048x8x1]

--kernel-configs times the kernel at other launch shapes too (BLOCK x NUM_WARPS x PROGRAMS_PER_SM of
sampling_kernel.py), to choose its constants on a new GPU.
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


def paths(device: str, configs: list[str]) -> dict:
    found = {"torch": choose_with_torch}
    if device.startswith("cuda"):
        from server.engine import sampling_kernel

        found["kernel"] = sampling_kernel.choose
        for config in configs:
            found[config] = with_constants(sampling_kernel, *map(int, config.split("x")))
    return found


def with_constants(module, block: int, warps: int, per_sm: int):
    """module.choose run with BLOCK, NUM_WARPS and PROGRAMS_PER_SM set to these for the call."""

    def choose(logits, rows):
        saved = module.BLOCK, module.NUM_WARPS, module.PROGRAMS_PER_SM
        module.BLOCK, module.NUM_WARPS, module.PROGRAMS_PER_SM = block, warps, per_sm
        try:
            return module.choose(logits, rows)
        finally:
            module.BLOCK, module.NUM_WARPS, module.PROGRAMS_PER_SM = saved

    return choose


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--kernel-configs", default="", help="BLOCKxNUM_WARPSxPROGRAMS_PER_SM,... beside the defaults")
    args = parser.parse_args()
    chooses = paths(args.device, [c for c in args.kernel_configs.split(",") if c])
    print(f"{'path':>11} {'rows':>5} {'greedy ms':>10} {'sampled ms':>11} {'sampled/greedy':>15} {'tokens differ':>14}")
    for n in (1, 8, 32, 64):
        logits = torch.randn(n, args.vocab, device=args.device) * 2
        reference = choose_with_torch(logits, row_params(rows(n, sampled=True), logits.device))[0]
        for name, choose in chooses.items():
            greedy = time_choice(choose, logits, rows(n, sampled=False), repeats=args.repeats)
            sampled = time_choice(choose, logits, rows(n, sampled=True), repeats=args.repeats)
            differ = (choose(logits, row_params(rows(n, sampled=True), logits.device))[0] != reference).sum().item()
            print(f"{name:>11} {n:>5} {greedy:>10.3f} {sampled:>11.3f} {sampled / greedy:>15.2f} {differ:>14}")


if __name__ == "__main__":
    main()
