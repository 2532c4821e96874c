"""Time the device-side token choice (server/engine/sampling.py) alone: greedy against sampled
(temperature 1, top-p 0.95, a seed per row) at 1 / 8 / 64 rows over a Llama-3 vocabulary.

    python -m bench.sampling_bench [--vocab 128256] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from server.engine.sampling import SamplingParams, _race, choose_on_device, compiled_race, row_params


def rows(n: int, *, sampled: bool) -> list:
    params = SamplingParams(16, do_sample=sampled, temperature=1.0, top_p=0.95 if sampled else 1.0)
    return [SimpleNamespace(params=params, seed=i, generated=[], in_flight=0, prompt_ids=[1]) for i in range(n)]


def time_choice(logits: torch.Tensor, seqs: list, *, repeats: int, race=None) -> float:
    """Median milliseconds of one choice, parameters built from the host included (as in a step)."""
    times = []
    for _ in range(repeats):
        if logits.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        choose_on_device(logits, row_params(seqs, logits.device), race=race).cpu()
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    race = compiled_race(args.vocab, args.device) if args.device == "cuda" else None
    print(f"{'rows':>5} {'greedy ms':>10} {'sampled ms':>11} {'compiled race':>14} {'sampled/greedy':>15} same draws")
    for n in (1, 8, 64):
        logits = torch.randn(n, args.vocab, device=args.device) * 0.5
        greedy = time_choice(logits, rows(n, sampled=False), repeats=args.repeats)
        sampled = time_choice(logits, rows(n, sampled=True), repeats=args.repeats)
        fast = time_choice(logits, rows(n, sampled=True), repeats=args.repeats, race=race)
        probs, keys = torch.softmax(logits, -1), torch.arange(n, device=args.device)[:, None] * 7919
        same = race is None or torch.equal(race(probs, keys), _race(probs, keys))
        print(f"{n:>5} {greedy:>10.3f} {sampled:>11.3f} {fast:>14.3f} {fast / greedy:>15.2f} {same}")


if __name__ == "__main__":
    main()
