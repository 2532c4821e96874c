"""What a LoRA adapter directory holds, as both sides read and write it: the file names, the projections
an adapter may target, how a weight's key names its module, PEFT's rule for which modules a target name
selects, and the adapter_config.json settings the server applies (read without peft).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Weight files that unpickle when loaded (a code-execution risk): training deletes them, the server refuses them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

# The seven Llama projections LoRA targets (Unsloth's notebook default, and what the server applies).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# PEFT's names: [base_model.model.]<module>.lora_A|B[.<adapter name>].weight
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
_LAYER_PROJECTION = re.compile(r"layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<projection>\w+)$")


@dataclass(frozen=True)
class LoraKey:
    """A LoRA weight's key, parsed: `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` is
    part A of module `model.layers.3.self_attn.q_proj`, layer 3, projection q_proj."""

    module: str  # the module's path in the base model
    part: str  # "A" [r, in] or "B" [out, r]
    layer: int | None  # None, as projection, when the module is not a decoder layer's projection
    projection: str | None


def parse_lora_key(key: str) -> LoraKey | None:
    """The parts of a state-dict key, or None when it is not a LoRA A/B weight."""
    match = _KEY.match(key)
    if match is None:
        return None
    where = _LAYER_PROJECTION.search(match["module"])
    return LoraKey(
        module=match["module"],
        part=match["part"],
        layer=int(where["layer"]) if where else None,
        projection=where["projection"] if where else None,
    )


def is_targeted(module: str, target_modules: Iterable[str]) -> bool:
    """PEFT's rule for a list of target names: a module is targeted when its path is a name or ends in `.name`."""
    return any(module == name or module.endswith("." + name) for name in target_modules)


def lora_scaling(config: AdapterConfig) -> float:
    """What B @ A is multiplied by: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (PEFT's rule). Reads
    only r, lora_alpha and use_rslora, so a peft.LoraConfig (the engine benchmark's) gives the same."""
    return config.lora_alpha / (config.r**0.5 if config.use_rslora else config.r)


class AdapterConfigError(ValueError):
    """An adapter_config.json the server cannot apply as it stands; the message says which setting."""


# PEFT options that change what the weights mean; the server applies plain LoRA only.
_UNSUPPORTED_TRUE = ("use_dora", "use_rslora_lora_ga", "fan_in_fan_out")
_UNSUPPORTED_NONEMPTY = ("modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern", "layer_replication")


@dataclass(frozen=True)
class AdapterConfig:
    """The settings of adapter_config.json that decide what an adapter computes: for each targeted module,
    x @ A^T @ B^T * lora_scaling. Validates itself; `from_json` also refuses the options it does not model."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    base_model_name_or_path: str | None = None  # as PEFT recorded it; the manifest's fingerprint is what is checked

    def __post_init__(self) -> None:
        r, alpha, targets = self.r, self.lora_alpha, self.target_modules
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise AdapterConfigError(f"{CONFIG_FILE}: 'r' must be a positive integer, got {r!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
            raise AdapterConfigError(f"{CONFIG_FILE}: 'lora_alpha' must be a positive number, got {alpha!r}")
        if not (isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets)):
            raise AdapterConfigError(f"{CONFIG_FILE}: 'target_modules' must be a non-empty list of names")
        object.__setattr__(self, "target_modules", tuple(targets))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AdapterConfig:
        """The config from adapter_config.json's object. Raises AdapterConfigError naming what is wrong."""
        if data.get("peft_type", "LORA") != "LORA":
            raise AdapterConfigError(f"only LoRA adapters are served; this is {data.get('peft_type')!r}")
        name = data.get("base_model_name_or_path")
        config = cls(
            r=data.get("r"),
            lora_alpha=data.get("lora_alpha", data.get("r")),
            target_modules=data.get("target_modules"),
            use_rslora=bool(data.get("use_rslora", False)),
            base_model_name_or_path=name if isinstance(name, str) else None,
        )
        for key in _UNSUPPORTED_TRUE:
            if data.get(key):
                raise AdapterConfigError(f"{CONFIG_FILE}: {key}=true is not supported")
        for key in _UNSUPPORTED_NONEMPTY:
            if data.get(key):
                raise AdapterConfigError(f"{CONFIG_FILE}: {key} is not supported")
        if data.get("bias", "none") != "none":
            raise AdapterConfigError(f"{CONFIG_FILE}: bias={data.get('bias')!r} is not supported (only 'none')")
        return config
