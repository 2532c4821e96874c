"""Files for serving the random Llama-3-8B shape over HTTP: the model dir and N random adapter dirs.

    python3 bench/gpu/build_8b_server_files.py --out /tmp/serve8b --adapters 8

Writes OUT/model (safetensors + tokenizer) and OUT/adapters/a0..a{N-1} (PEFT dirs, no manifest: the
server uses its default template). The same model and adapters as bench/engine_bench.py builds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.engine_bench import lora_config, random_adapter, random_llama3_8b  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    from safetensors.torch import save_file

    started = time.perf_counter()
    model, tokenizer = random_llama3_8b()
    model.save_pretrained(args.out / "model", safe_serialization=True)
    tokenizer.save_pretrained(args.out / "model")
    for index in range(args.adapters):
        adapter_dir = args.out / "adapters" / f"a{index}"
        lora_config(args.rank).save_pretrained(adapter_dir)
        state = random_adapter(model, rank=args.rank, seed=1000 + index)
        save_file({k: v.to("cpu").contiguous() for k, v in state.items()}, adapter_dir / "adapter_model.safetensors")
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
