"""A tiny random Llama with a locally trained tokenizer, written as a normal Hugging Face model dir.

Tests and the demo use it instead of a download. It loads with `AutoModelForCausalLM` /
`AutoTokenizer` (and Unsloth's `FastLanguageModel`) like any real model. The build is deterministic
(fixed seed, fixed corpus), so the same arguments give the same weights, and it is cached: a dir that
already holds a complete build with the same spec is reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from contract.templates import BUILTIN

DONE_MARKER = ".tiny-model.json"
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<unk>"]

# Text the tokenizer must cover well: both built-in templates plus ordinary English, Chinese and digits.
# The byte-level alphabet means any other text still tokenizes, just into more pieces.
_CORPUS_EXTRA = [
    "What is the capital of France? The capital of France is Paris.",
    "Answer the question. Question: Who wrote the poem? Answer: The poet wrote it in 1820.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } , . ; : ! ?",
    "Translate to French. Hello world. Bonjour le monde. Zebra, yacht, quartz, jigsaw, vexing, waltz.",
    "中国的首都是北京。请回答问题。问题：谁写了这首诗？答案：诗人在一八二零年写的。你好，世界。",
    "代号 密码 颜色 城市 动物 水果 数字 苹果 香蕉 老虎 熊猫 上海 广州 红色 蓝色 绿色 一 二 三 四 五 六 七 八 九 十",
]


@dataclass(frozen=True)
class TinySpec:
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 1024
    max_position_embeddings: int = 2048
    # Larger than Llama's 0.02: with a 128-wide hidden state and a frozen random LM head, 0.02 caps
    # the reachable logit gap so low that no LoRA can make one token likely (loss floor ~4.4 nats).
    initializer_range: float = 0.1
    seed: int = 0


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loraserve" / "tiny-llama"


def build_tiny_model(out_dir: str | Path | None = None, spec: TinySpec = TinySpec()) -> Path:
    """Build (or reuse) the tiny model at `out_dir`; returns its absolute path."""
    out = Path(out_dir or default_cache_dir()).resolve()
    if _is_complete(out, spec):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from a server running as another user
    try:
        tokenizer = _train_tokenizer(spec)
        tokenizer.save_pretrained(tmp)
        _random_llama(spec, tokenizer).save_pretrained(tmp, safe_serialization=True)
        (tmp / DONE_MARKER).write_text(json.dumps(asdict(spec)))
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _is_complete(out: Path, spec: TinySpec) -> bool:
    marker = out / DONE_MARKER
    return marker.is_file() and json.loads(marker.read_text()) == asdict(spec)


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def _train_tokenizer(spec: TinySpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )


def _corpus() -> list[str]:
    texts = [t.text.replace("{}", "") for t in BUILTIN.values()]
    return (texts + _CORPUS_EXTRA) * 4


def _random_llama(spec: TinySpec, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=spec.initializer_range,
    )
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config).to(torch.float32).eval()
