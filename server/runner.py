"""The model and the operations the engine's worker thread performs on it.

This is the only module on the server side that imports `unsloth`; it does so only when the
Unsloth backend is chosen (CUDA and the package present, or asked for). Every method here must be
called from the engine's worker thread: Unsloth's inference path is not thread-safe, and adapters
are switched by mutating the model.

LoRA adapters are attached through transformers' PEFT integration with a config and a state dict we
read and checked ourselves (never a path handed to a loader that might fall back to pickle). A batch
runs under one active adapter: PEFT's per-row `adapter_names` is ignored by Unsloth's fused decode
path (DESIGN.md), so the engine groups rows by adapter instead.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("loraserve.runner")


@dataclass
class BaseInfo:
    backend: str
    device: str
    dtype: str
    max_context: int
    fingerprint: str


class ModelRunner:
    def __init__(self, model, tokenizer, *, backend: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.backend = backend
        self.device = next(model.parameters()).device
        self.active: str | None = None
        self.attached: set[str] = set()
        self._adapters_enabled: bool | None = True  # None: unknown, settled by the next activate
        self._attn: list | None = None

    # -- adapters -------------------------------------------------------------------------------
    def attach(self, key: str, lora_config, state_dict: dict[str, torch.Tensor]) -> None:
        try:
            info = self.model.load_adapter(adapter_name=key, peft_config=lora_config, adapter_state_dict=state_dict)
        except BaseException:
            self._drop_partial(key)
            raise
        self.attached.add(key)
        missing = [k for k in getattr(info, "missing_keys", ()) if f".{key}." in k]  # other adapters show up too
        unexpected = list(getattr(info, "unexpected_keys", ()))
        if missing or unexpected:
            self.detach(key)
            raise ValueError(f"adapter weights do not fit the base model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        # load_adapter may change the active adapter, and the first one's fresh layers come enabled even
        # while base-model rows run: re-select and re-enable/disable before the next step.
        self.active, self._adapters_enabled = None, None

    def _drop_partial(self, key: str) -> None:
        """What a failed load_adapter (e.g. out of memory half-way) left of `key`: each retry would leak it."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if key in (getattr(self.model, "peft_config", None) or {}):
            self.model.delete_adapter(key)
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.delete_adapter(key)
        self.active, self._adapters_enabled = None, None

    def detach(self, key: str) -> None:
        if key in self.attached:
            self.model.delete_adapter(key)
            self.attached.discard(key)
            self.active = None

    def activate(self, key: str | None) -> None:
        if key == self.active and self._adapters_enabled == (key is not None):
            return
        if key is None:
            if self.attached:
                self.model.disable_adapters()
            self._adapters_enabled = False
        else:
            if not self._adapters_enabled:
                self.model.enable_adapters()
            self.model.set_adapter(key)
            self._adapters_enabled = True
        self.active = key

    # -- forward --------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids, attention_mask, position_ids, cache) -> tuple[torch.Tensor, Any]:
        """Logits of the last position per row [B, V] (float32) and the updated cache."""
        out = self.model(
            input_ids=input_ids,  # [B, S]
            attention_mask=attention_mask,  # [B, past + S]
            position_ids=position_ids,  # [B, S]
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            return_dict=True,
        )
        if isinstance(out, tuple):  # Unsloth's fused decode step answers a tuple whatever return_dict says
            logits, cache = out[0], out[1]
        else:
            logits, cache = out.logits, out.past_key_values
        return logits[:, -1, :].float(), cache

    # -- per-group decode state ------------------------------------------------------------------
    def swap_decode_state(self, state: dict | None) -> None:
        """Make `state` (from `decode_state`, or None for a fresh prefill) the model's decode state.

        Unsloth's fused decode keeps the KV cache in buffers on each attention module, not in the
        returned cache, and a prefill drops them: two groups stepping in turn would read each
        other's keys. So each group keeps its own buffers and they are swapped in before its step.
        References only, no copies. transformers' cache lives in the cache object: nothing to do.
        """
        if self.backend != "unsloth":
            return
        for index, attn in enumerate(self._attention_modules()):
            for name in _UNSLOTH_DECODE_BUFFERS:
                attn.__dict__.pop(name, None)
            if state is not None:
                attn.__dict__.update(state[index])

    def decode_state(self) -> dict | None:
        if self.backend != "unsloth":
            return None
        return {i: {n: attn.__dict__[n] for n in _UNSLOTH_DECODE_BUFFERS if n in attn.__dict__}
                for i, attn in enumerate(self._attention_modules())}

    def _attention_modules(self) -> list:
        if self._attn is None:
            self._attn = [m for m in self.model.modules() if hasattr(m, "q_proj") and hasattr(m, "o_proj")]
        return self._attn

    def new_cache(self):
        if self.backend == "unsloth":
            return None  # Unsloth builds its own cache on the first (prefill) call
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @staticmethod
    def merge_rows(cache, other):
        """`other`'s rows appended to `cache`'s, the shorter left-padded with zeros to the longer
        (the caller pads the attention masks to match, so the padding is never attended). None when
        these caches cannot be merged (Unsloth's cache lives in per-module buffers)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if type(cache) is not DynamicCache or type(other) is not DynamicCache:
            return None
        if any(type(layer) is not DynamicLayer for layer in (*cache.layers, *other.layers)):
            return None
        for mine, theirs in zip(cache.layers, other.layers):
            length = max(mine.keys.shape[-2], theirs.keys.shape[-2])
            mine.keys = torch.cat([_left_pad(mine.keys, length), _left_pad(theirs.keys, length)])  # [B1+B2, H, L, D]
            mine.values = torch.cat([_left_pad(mine.values, length), _left_pad(theirs.values, length)])
        return cache

    @staticmethod
    def select_rows(cache, rows: list[int]):
        """Keep only `rows` of the cache; None when this cache type cannot drop rows."""
        if hasattr(cache, "batch_select_indices"):
            cache.batch_select_indices(torch.tensor(rows, device=_cache_device(cache)))
            return cache
        return None


# Attributes Unsloth's decode path keeps on each attention module (unsloth/models/_decode_graphs.py).
_UNSLOTH_DECODE_BUFFERS = ("paged_attention", "paged_attention_K", "paged_attention_V", "temp_QA", "temp_KV",
                           "RH_Q", "temp_O", "attention")


def _left_pad(states: torch.Tensor, length: int) -> torch.Tensor:
    """[B, H, S, D] → [B, H, length, D] with zeros in front."""
    return torch.nn.functional.pad(states, (0, 0, length - states.shape[-2], 0))


def _cache_device(cache) -> torch.device:
    layer = cache.layers[0] if getattr(cache, "layers", None) else None
    keys = getattr(layer, "keys", None)
    return keys.device if keys is not None else torch.device("cpu")


def choose_backend(requested: str) -> str:
    cuda = torch.cuda.is_available()
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "unsloth" and not (cuda and has_unsloth):
        raise RuntimeError("backend 'unsloth' needs CUDA and the unsloth package (pip install 'loraserve[unsloth]')")
    if requested == "auto":
        return "unsloth" if cuda and has_unsloth else "transformers"
    return requested


def load_runner(base_model: str, *, backend: str, load_in_4bit: bool, max_context: int | None = None) -> ModelRunner:
    backend = choose_backend(backend)
    if backend == "unsloth":
        model, tokenizer = _load_unsloth(base_model, load_in_4bit=load_in_4bit, max_context=max_context)
    else:
        model, tokenizer = _load_transformers(base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ModelRunner(model, tokenizer, backend=backend)


def _load_unsloth(base_model: str, *, load_in_4bit: bool, max_context: int | None):
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=base_model, max_seq_length=max_context or 2048, dtype=None, load_in_4bit=load_in_4bit
    )
    FastLanguageModel.for_inference(model)
    return model, tokenizer


def _load_transformers(base_model: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype)
    return model.to("cuda" if cuda else "cpu").eval(), tokenizer
