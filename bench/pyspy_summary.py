"""Where a thread's host time goes, from py-spy's raw (collapsed) stacks: self and inclusive shares.

Raw py-spy output of a whole benchmark is tens of MB; this keeps the answer (a few dozen lines), so it
can be read where the profile was taken.

    py-spy record --threads --format raw -o stacks.txt -- python -m bench.profile_step --plain ...
    python -m bench.pyspy_summary stacks.txt [--thread _loop] [--top 30]

Only stacks that pass through a frame containing --thread are counted (default: the engine's worker loop).
"""

from __future__ import annotations

import argparse
from collections import Counter


def summarize(lines, *, thread: str) -> tuple[int, Counter, Counter]:
    """(samples, self counts by frame, inclusive counts by frame) of the stacks through `thread`."""
    total, leaf, inclusive = 0, Counter(), Counter()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_short(f) for f in stack.split(";")]
        start = next((i for i, f in enumerate(frames) if thread in f), None)
        if start is None:
            continue
        frames = frames[start:]
        n = int(count)
        total += n
        leaf[frames[-1]] += n
        for function in {f.rsplit(":", 1)[0] + ")" for f in frames}:  # by function: its lines vary
            inclusive[function] += n
    return total, leaf, inclusive


def _short(frame: str) -> str:
    """`fn (path/to/file.py:12)` → `fn (file.py:12)`: the function and where, without the machine's paths."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stacks")
    parser.add_argument("--thread", default="_loop (engine.py")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    with open(args.stacks) as f:
        total, leaf, inclusive = summarize(f, thread=args.thread)
    print(f"{total} samples through {args.thread!r}")
    for title, counts in (("inclusive", inclusive), ("self", leaf)):
        print(f"\n-- {title}")
        for frame, n in counts.most_common(args.top):
            print(f"  {100 * n / max(total, 1):5.1f}%  {frame}")


if __name__ == "__main__":
    main()
