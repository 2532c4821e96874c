"""Training throughput and peak VRAM: Unsloth vs plain transformers+PEFT+TRL, same machine, same data.

Each measurement runs in its own process (importing Unsloth patches transformers for the whole
process, so the plain path must run where Unsloth was never imported):

    python bench/gpu_train_bench.py build --out /tmp/llama8b          # random Llama-3-8B-shaped model
    python bench/gpu_train_bench.py run --backend unsloth --model /tmp/llama8b --json u.json
    python bench/gpu_train_bench.py run --backend transformers --model /tmp/llama8b --json t.json
    python bench/gpu_train_bench.py table u.json t.json

Random weights are fine for speed: the work per step depends on shapes, not values.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)


def build(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraserve.tiny_model import build_tiny_model

    tok_dir = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(
        **LLAMA3_8B,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    started = time.monotonic()
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"built {out} in {time.monotonic() - started:.0f}s")


def synthetic_data(path: Path, rows: int, words: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocab = "the quick brown fox jumps over lazy dog river castle tower code harbor song island mango".split()
    with path.open("w") as fh:
        for i in range(rows):
            text = " ".join(rng.choice(vocab) for _ in range(words))
            fh.write(json.dumps({"instruction": f"Continue story {i}.", "input": "", "output": text}) + "\n")


def run(args) -> dict:
    import torch

    from training.config import TrainConfig
    from training.fit import train

    work = Path(tempfile.mkdtemp())
    data = work / "data.jsonl"
    synthetic_data(data, rows=args.batch_size * args.grad_accum * args.steps, words=args.words)
    cfg = TrainConfig(
        base_model=str(args.model),
        data=str(data),
        output=work / "adapter",
        backend=args.backend,
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        load_in_4bit=args.load_in_4bit,
        max_seq_length=args.max_seq_length,
        warmup_steps=1,
        optim="adamw_8bit",
    )
    torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    result = train(cfg)
    wall = time.monotonic() - started
    record = {
        "backend": result.manifest.backend,
        "load_in_4bit": args.load_in_4bit,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "words_per_row": args.words,
        "train_seconds": round(result.seconds, 2),
        "wall_seconds_with_load": round(wall, 2),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "final_loss": result.manifest.loss.final,
        "gpu": torch.cuda.get_device_name(0),
        "versions": result.manifest.versions,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(record))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    return record


def table(paths: list[str]) -> None:
    rows = [json.loads(Path(p).read_text()) for p in paths if Path(p).is_file()]
    if not rows:
        print("no results")
        return
    base = next((r for r in rows if r["backend"] == "transformers" and not r["load_in_4bit"]), rows[0])
    print(f"{'backend':<14}{'4bit':<6}{'tok/s':>10}{'x plain':>9}{'peak GiB':>10}{'train s':>9}{'loss':>8}")
    for r in rows:
        ratio = r["tokens_per_second"] / base["tokens_per_second"]
        print(
            f"{r['backend']:<14}{str(r['load_in_4bit']):<6}{r['tokens_per_second']:>10.0f}{ratio:>9.2f}"
            f"{r['peak_vram_gib']:>10.1f}{r['train_seconds']:>9.1f}{r['final_loss']:>8.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--backend", choices=["unsloth", "transformers"], required=True)
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("--steps", type=int, default=8)
    r.add_argument("--batch-size", type=int, default=2)
    r.add_argument("--grad-accum", type=int, default=4)
    r.add_argument("--words", type=int, default=400)
    r.add_argument("--max-seq-length", type=int, default=2048)
    r.add_argument("--load-in-4bit", action="store_true")
    r.add_argument("--json")
    t = sub.add_parser("table")
    t.add_argument("paths", nargs="+")
    args = parser.parse_args()
    if args.cmd == "build":
        build(args.out)
    elif args.cmd == "run":
        run(args)
    else:
        table(args.paths)


if __name__ == "__main__":
    main()
