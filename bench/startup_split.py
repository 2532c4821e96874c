"""Where a server's start-up went, from its log: the parts between process start and /ready, in order.

    python -m bench.startup_split SERVER_LOG [--total SECONDS]

--total is process start to the first /ready 200 as the caller measured it (run_http_compare.sh's
startup_ours.json); without it the split starts where loading began. The log's own lines give the rest:
`ready: … s after loading began`, the runner's `model loaded in … s, engine state built in … s`, the server's
`base model … loaded` (the engine's hello), each adapter's `loaded from`, the kernels built beside the load, and
`warm-up: …`. Parts the log does not show are left out, not guessed.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO loraserve[\w.]*: "
_LINES = {
    "ready": re.compile(_STAMP + r"ready: \d+ adapters, ([\d.]+) s after loading began"),
    "model": re.compile(_STAMP + r"model loaded in ([\d.]+) s, engine state built in ([\d.]+) s"),
    "hello": re.compile(_STAMP + r"base model .* loaded: "),
    "adapter": re.compile(_STAMP + r"adapter \S+ version \S+ loaded from "),
    "kernels": re.compile(_STAMP + r"(.+) kernels built during the model load in ([\d.]+) s"),
    "waited": re.compile(_STAMP + r"waited ([\d.]+) s after the model load for the kernels built beside it"),
    "warm_up": re.compile(_STAMP + r"warm-up: (.*)"),
}


@dataclass
class Part:
    name: str
    seconds: float


def _time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def split(log: str, total: float | None = None) -> list[Part]:
    """The start-up's parts in order (their seconds sum to the whole, or to loading began → ready without
    `total`); beside the load, the kernels built in parallel, as `(beside) …` parts that add nothing."""
    found: dict[str, list[re.Match]] = {key: [] for key in _LINES}
    for line in log.splitlines():
        for key, pattern in _LINES.items():
            if match := pattern.match(line):
                found[key].append(match)
    if not found["ready"]:
        raise ValueError("no `ready:` line: the server never became ready in this log")
    ready = found["ready"][-1]
    ready_at, since_loading = _time(ready[1]), float(ready[2])
    found = {key: [m for m in matches if _time(m[1]) <= ready_at] for key, matches in found.items()}  # not after
    began = ready_at - since_loading
    parts = []
    if total is not None:  # the caller's poll of /ready (every 0.5 s in run_http_compare.sh) lands here too
        parts.append(
            Part("process start → loading began (the server's imports, the /ready poll)", total - since_loading)
        )
    at = began
    if found["model"]:
        model = found["model"][-1]
        built_at, load, state = _time(model[1]), float(model[2]), float(model[3])
        waited = float(found["waited"][-1][2]) if found["waited"] else 0.0
        to_load = built_at - load - waited - state - at  # negative where `serve` started the engine process first
        parts.append(
            Part("loading began → the model's load began (engine process start, imports)", to_load)
            if to_load >= 0
            else Part("the model's load began before the server's loading did (engine process started first)", to_load)
        )
        parts.append(Part("model load", load))
        parts += [Part(f"(beside) {m[2]} kernels", float(m[3])) for m in found["kernels"]]
        if waited:
            parts.append(Part("waiting for the kernels built beside the load", waited))
        parts.append(Part("engine state", state))
        at = built_at
    if found["hello"]:
        hello_at = _time(found["hello"][-1][1])
        parts.append(Part("→ the server has the engine (hello, tokenizer)", hello_at - at))
        at = hello_at
    if found["adapter"]:
        last = _time(found["adapter"][-1][1])
        parts.append(Part(f"{len(found['adapter'])} adapters preloaded", last - at))
        at = last
    if found["warm_up"]:
        warm = found["warm_up"][-1]
        warm_at = _time(warm[1])
        for name, seconds in re.findall(r"([^,]+?) ([\d.]+) s", warm[2]):
            parts.append(Part(f"warm-up: {name.strip()}", float(seconds)))
        covered = sum(p.seconds for p in parts if p.name.startswith("warm-up:"))
        parts.append(
            Part("warm-up: the rest, or what came before it that the log does not name", warm_at - at - covered)
        )
        at = warm_at
    parts.append(Part("→ ready", ready_at - at))
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--total", type=float, help="process start to the first /ready 200, in seconds")
    args = parser.parse_args()
    try:
        parts = split(args.log.read_text(errors="replace"), args.total)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {args.log}: {exc}") from None
    for part in parts:
        print(f"{part.seconds:7.1f} s  {part.name}")
    whole = sum(p.seconds for p in parts if not p.name.startswith("(beside)"))
    print(f"{whole:7.1f} s  {'process start' if args.total is not None else 'loading began'} → ready")


if __name__ == "__main__":
    main()
