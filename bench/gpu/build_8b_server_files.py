"""Files for serving the random Llama-3-8B shape over HTTP: the model dir and N random adapter dirs.

    python3 bench/gpu/build_8b_server_files.py --out /tmp/serve8b --adapters 8 [--tokenizer full-vocab]

Writes OUT/model (safetensors + tokenizer) and OUT/adapters/a0..a{N-1} (PEFT dirs, no manifest: the
server uses its default template). The same model as bench.engine_bench builds (adapters seeded apart: 1000 + i).

--tokenizer tiny (the default) saves the tiny test tokenizer: 768 tokens, so nearly every id the random
8B model draws from its 128,256 decodes to no text, and a streaming route that sends text (the OpenAI
chunks) has next to nothing to send: a client that times first tokens by chunks then measures the end of
the stream. --tokenizer full-vocab saves a word-level tokenizer with one token per id ("t123"; the tiny
one's special tokens at their ids), so every generated token is text, as with Llama 3's own tokenizer,
and random-id prompts decode and encode back to the same ids.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.engine_bench.workload import lora_config, random_adapter, random_llama3_8b  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokenizer", choices=["tiny", "full-vocab"], default="tiny")
    args = parser.parse_args()
    from safetensors.torch import save_file

    started = time.perf_counter()
    model, tokenizer = random_llama3_8b()
    if args.tokenizer == "full-vocab":
        tokenizer = full_vocab_tokenizer(tokenizer, model.config.vocab_size)
    model.save_pretrained(args.out / "model", safe_serialization=True)
    tokenizer.save_pretrained(args.out / "model")
    for index in range(args.adapters):
        adapter_dir = args.out / "adapters" / f"a{index}"
        lora_config(args.rank).save_pretrained(adapter_dir)
        state = random_adapter(model, rank=args.rank, seed=1000 + index)
        save_file({k: v.to("cpu").contiguous() for k, v in state.items()}, adapter_dir / "adapter_model.safetensors")
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f}s")


def full_vocab_tokenizer(tiny, size: int):
    """One word-level token per id, named t<id>, except the tiny tokenizer's special tokens at their own ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {token: tiny.convert_tokens_to_ids(token) for token in tiny.all_special_tokens}
    taken = set(specials.values())
    vocab = {**specials, **{f"t{i}": i for i in range(size) if i not in taken}}
    words = Tokenizer(models.WordLevel(vocab, unk_token=tiny.unk_token))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=words,
        bos_token=tiny.bos_token,
        eos_token=tiny.eos_token,
        pad_token=tiny.pad_token,
        unk_token=tiny.unk_token,
    )


if __name__ == "__main__":
    main()
