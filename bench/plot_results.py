"""Plot benchmark JSON: aggregate tok/s against concurrent streams per method (python -m bench.engine_bench), and,
given bench/serving.py results, server tok/s and latency against concurrency. Writes one PNG.

    python bench/plot_results.py engine.json --out engine.png
    python bench/plot_results.py engine.json --serving before.json --serving after.json --out all.png
    python bench/plot_results.py run1.json run3.json --out both.png     # methods of several runs, labelled by file

Several engine files: each method is drawn from the file that has it (the first one wins), labelled
with the file's name when it is not the first, so runs are never mixed up silently; the roofline is the
first file's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METHOD_ORDER = ("hf_peft", "hf_static", "unsloth", "vllm", "ours")


def load_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install -e '.[dev]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only: no display on the machines these run on
    import matplotlib.pyplot as plt

    return plt


def decode_points(method: dict) -> list[tuple[int, float]]:
    """(streams, tok/s) of the greedy adapter scenarios that ran: bs1 and streamsN, not the base, sampled or
    TTFT ones."""
    points = [
        (r["streams"], r["tok_s"])
        for name, r in method.get("scenarios", {}).items()
        if "tok_s" in r and not name.endswith(("_base", "_sampled"))
    ]
    return sorted(points)


def roofline_points(engine: dict) -> list[tuple[int, float]]:
    points = []
    for name, bound in engine["roofline"]["scenarios"].items():
        own = bound.get(str(bound.get("distinct_adapters")))
        if own and not name.endswith(("_base", "_sampled")):
            points.append((bound["streams"], own["tok_s"]))
    return sorted(points)


def engine_title(engine: dict) -> str:
    cfg, machine = engine["config"], engine["machine"]
    return (
        f"{cfg['model']} on {machine.get('gpu') or machine.get('cpu')}: in {cfg['input_len']} / "
        f"out {cfg['output_len']}, {cfg['adapters']} adapters"
    )


def plot_engine(ax, engines: dict[str, dict]) -> None:
    drawn: set[str] = set()
    for index, (stem, engine) in enumerate(engines.items()):
        methods = engine["methods"]
        for name in [m for m in METHOD_ORDER if m in methods] + [m for m in methods if m not in METHOD_ORDER]:
            points = decode_points(methods[name])
            if points and name not in drawn:
                drawn.add(name)
                ax.plot(*zip(*points), marker="o", label=name if index == 0 else f"{name} ({stem})")
    engine = next(iter(engines.values()))
    roof = roofline_points(engine)
    if roof:
        ax.plot(*zip(*roof), linestyle="--", color="gray", label="memory roofline")
    ax.set(
        xscale="log", yscale="log", xlabel="concurrent streams", ylabel="aggregate tok/s", title=engine_title(engine)
    )
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)


def closed_loop_levels(serving: dict) -> list[dict]:
    return sorted((s for s in serving["levels"] if s["mode"] == "concurrency"), key=lambda s: s["level"])


def plot_serving(ax_tput, ax_latency, runs: dict[str, dict]) -> None:
    for label, serving in runs.items():
        levels = closed_loop_levels(serving)
        if not levels:
            continue
        x = [s["level"] for s in levels]
        (line,) = ax_tput.plot(x, [s["output_throughput"] for s in levels], marker="o", label=label)
        for metric, q, style in (("ttft_ms", "p50", "-"), ("ttft_ms", "p99", ":"), ("e2e_ms", "p50", "--")):
            y = [s[metric][q] if s[metric] else float("nan") for s in levels]
            ax_latency.plot(
                x,
                y,
                marker="o",
                linestyle=style,
                color=line.get_color(),  # one color per run
                label=f"{label} {metric[:-3]} {q}",
            )
    ax_tput.set(xlabel="concurrency (closed loop)", ylabel="output tok/s", title="server throughput")
    ax_latency.set(xlabel="concurrency (closed loop)", ylabel="ms", yscale="log", title="server latency")
    for ax in (ax_tput, ax_latency):
        ax.legend(fontsize="small")
        ax.grid(True, alpha=0.3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("engine", nargs="+", help="python -m bench.engine_bench --json output(s)")
    p.add_argument("--serving", action="append", default=[], help="bench/serving.py --json output (repeatable)")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    plt = load_pyplot()
    engines = {Path(path).stem: json.loads(Path(path).read_text()) for path in args.engine}
    serving = {Path(path).stem: json.loads(Path(path).read_text()) for path in args.serving}
    panels = 3 if serving else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5), squeeze=False)
    plot_engine(axes[0][0], engines)
    if serving:
        plot_serving(axes[0][1], axes[0][2], serving)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
