"""Which library trains: Unsloth on CUDA when installed, plain transformers + PEFT otherwise.

The choice is contract.backend's, shared with the server, and so is the one `import unsloth`: Unsloth
patches transformers and TRL when imported, so `choose_backend` runs first and `load_model` before
anything imports trl. What a backend cannot do (4-bit, 8-bit Adam without CUDA) is reported and
replaced, never a traceback.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from contract.backend import BackendUnavailable
from contract.backend import choose_backend as choose_library
from contract.base_config import position_limit
from contract.lora import is_targeted
from training.config import ConfigError, TrainConfig


@dataclass
class Backend:
    name: str  # "unsloth" | "transformers"
    cuda: bool
    notes: list[str] = field(default_factory=list)


def choose_backend(cfg: TrainConfig, warn: Callable[[str], None] = print) -> Backend:
    import torch

    try:
        name = choose_library(cfg.backend)  # imports unsloth when chosen, before the steps after this
    except BackendUnavailable as exc:
        raise ConfigError(f"--backend unsloth needs {exc.missing}") from exc
    backend = Backend(name=name, cuda=torch.cuda.is_available())
    _fallbacks(cfg, backend, warn)
    return backend


def _fallbacks(cfg: TrainConfig, backend: Backend, warn: Callable[[str], None]) -> None:
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if cfg.load_in_4bit and not (backend.cuda and has_bnb):
        _note(backend, warn, "--load-in-4bit needs CUDA and bitsandbytes; loading the base in full precision instead")
        cfg.load_in_4bit = False
    elif cfg.load_in_4bit and backend.name != "unsloth":
        _note(
            backend,
            warn,
            "--load-in-4bit is done by Unsloth; the transformers backend loads the base in full precision instead",
        )
        cfg.load_in_4bit = False
    if "8bit" in cfg.optim and not (backend.cuda and has_bnb):
        _note(backend, warn, f"--optim {cfg.optim} needs CUDA and bitsandbytes; using adamw_torch instead")
        cfg.optim = "adamw_torch"


def _note(backend: Backend, warn: Callable[[str], None], message: str) -> None:
    backend.notes.append(message)
    warn(f"note: {message}")


def load_model(cfg: TrainConfig, backend: Backend, warn: Callable[[str], None] = print) -> tuple[Any, Any]:
    """Base model with LoRA layers attached, and its tokenizer."""
    _cap_sequence_length(cfg, backend, warn)
    if backend.name == "unsloth":
        return _load_unsloth(cfg)
    return _load_transformers(cfg, backend)


def _cap_sequence_length(cfg: TrainConfig, backend: Backend, warn: Callable[[str], None]) -> None:
    """Rows past the base model's positions would train it where it never was (and see position_limit)."""
    limit = position_limit(cfg.base_model)
    if limit and cfg.max_seq_length > limit:
        _note(
            backend,
            warn,
            f"--max-seq-length {cfg.max_seq_length} is over the base model's {limit} positions; using {limit}",
        )
        cfg.max_seq_length = limit


def _load_unsloth(cfg: TrainConfig) -> tuple[Any, Any]:
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=cfg.base_model, max_seq_length=cfg.max_seq_length, dtype=None, load_in_4bit=cfg.load_in_4bit
    )
    _check_target_modules(model, cfg.target_modules)
    model = FastLanguageModel.get_peft_model(
        model,
        r=cfg.r,
        target_modules=list(cfg.target_modules),
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=cfg.seed,
    )
    return model, tokenizer


def _load_transformers(cfg: TrainConfig, backend: Backend) -> tuple[Any, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)
    dtype = torch.bfloat16 if backend.cuda and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=dtype)
    if backend.cuda:
        model = model.to("cuda")
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    _check_target_modules(model, cfg.target_modules)
    return get_peft_model(model, lora), tokenizer


def _check_target_modules(model, names) -> None:
    """PEFT raises only when no name matches, so a typo among real names would silently train fewer modules."""
    modules = [full for full, _ in model.named_modules()]
    missing = [n for n in names if not any(is_targeted(full, [n]) for full in modules)]
    if missing:
        raise ValueError(f"target modules {missing} not found in the base model")
