"""A layer's projections that read the same input, computed as one matmul where the base allows.

q/k/v read the normed hidden state, and so do gate/up: one GEMM over their weights side by side
([sum(out), in]) replaces three or two launches, and the group's LoRA terms come from one
shrink and one expand (lora_slots.py). The fused weight becomes the storage of the modules' own
weights (each module's weight is a view of its rows), so fusing costs no memory. A group whose
modules are not plain 16/32-bit Linear layers (a 4-bit base, say) calls each module and
concatenates: the same numbers, more launches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contract.lora import MLP_PROJECTIONS, PROJECTIONS

# The decoder's groups, in the order their outputs are concatenated.
GROUPS = (
    ("qkv", ("q_proj", "k_proj", "v_proj")),
    ("o_proj", ("o_proj",)),
    ("gate_up", ("gate_proj", "up_proj")),
    ("down_proj", ("down_proj",)),
)
_FUSABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
assert sorted(p for _, projs in GROUPS for p in projs) == sorted(PROJECTIONS)


class GroupProjection:
    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.weight, self.bias = _fuse(modules) if _fusable(modules) else (None, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[T, in] → [T, sum(out)]."""
        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        outs = [module(x) for module in self.modules]
        return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]


def layer_projections(layer) -> dict[str, GroupProjection]:
    return {group: GroupProjection([_module(layer, name) for name in names]) for group, names in GROUPS}


def _module(layer, name: str) -> nn.Module:
    return getattr(layer.mlp if name in MLP_PROJECTIONS else layer.self_attn, name)


def _fusable(modules: list[nn.Module]) -> bool:
    weights = [getattr(module, "weight", None) for module in modules]
    return (
        all(
            type(module) is nn.Linear and w is not None and w.dtype in _FUSABLE_DTYPES
            for module, w in zip(modules, weights)
        )
        and len({(w.dtype, w.device, w.shape[1]) for w in weights}) == 1
    )


@torch.no_grad()
def _fuse(modules: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    if len(modules) == 1:
        return modules[0].weight, modules[0].bias
    weight = torch.cat([module.weight for module in modules])  # [sum(out), in]
    has_bias = any(module.bias is not None for module in modules)
    bias = (
        torch.cat(
            [module.bias if module.bias is not None else weight.new_zeros(module.out_features) for module in modules]
        )
        if has_bias
        else None
    )
    start = 0
    for module in modules:  # the modules now read (and keep alive) rows of the fused tensors
        stop = start + module.out_features
        module.weight = nn.Parameter(weight[start:stop], requires_grad=False)
        if module.bias is not None:
            module.bias = nn.Parameter(bias[start:stop], requires_grad=False)
        start = stop
    return weight, bias
