"""A base model's identity, so an adapter is never served on a model it was not trained for.

The fingerprint covers the architecture config, the tokenizer's vocabulary and special tokens, and
every weight's shape. Shapes come from building the model on the meta device from its config, so the
fingerprint is the same whether the weights were loaded in 16-bit, 4-bit or not at all.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Config keys that describe how a model was saved or run, not what it is.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "quantization_config",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "attn_implementation",
    "architectures",
    "unsloth_version",
    "unsloth_fixed",
    "pad_token_id",
}


def base_fingerprint(config: Any, tokenizer: Any) -> str:
    digest = hashlib.sha256()
    digest.update(_canonical(_config_identity(config)))
    digest.update(_canonical(_tokenizer_identity(tokenizer)))
    digest.update(_canonical(_weight_shapes(config)))
    return "sha256:" + digest.hexdigest()[:32]


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False).encode()


def _config_identity(config: Any) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}


def _tokenizer_identity(tokenizer: Any) -> dict:
    return {"vocab": sorted(tokenizer.get_vocab().items()), "eos": tokenizer.eos_token, "bos": tokenizer.bos_token}


def _weight_shapes(config: Any) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: list(p.shape) for name, p in model.state_dict().items()}
