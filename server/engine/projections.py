"""A layer's projections that read the same input, computed as one matmul where the base allows.

q/k/v read the normed hidden state, and so do gate/up: one GEMM over their weights side by side
([sum(out), in]) replaces three or two launches, and the group's LoRA terms come from one
shrink and one expand (lora_slots.py). The fused weight becomes the storage of the modules' own
weights (each module's weight is a view of its rows), so fusing costs no memory.

The group's LoRA shrink rides along in the same GEMM: `ride(rows)` appends rows after the base's (the
adapter slots' A matrices live there), so `x @ [W; A]^T` yields the base output and every slot's
x @ A^T in one launch instead of two (at decode sizes a step costs its launches). A group whose
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
        self.out_features = sum(int(module.out_features) for module in modules)
        self.weight, self.bias = _fuse(modules) if _fusable(modules) else (None, None)
        self.riders = 0  # rows after the base's in `weight`: room for the LoRA shrink (lora_slots.py)

    def __call__(self, x: torch.Tensor, *, riders: bool = True) -> torch.Tensor:
        """[T, in] → [T, sum(out) + riders]: the base output, then the riding rows' products; with
        `riders=False` (no token of the step has an adapter) the base output alone, [T, sum(out)]."""
        if self.weight is not None:
            if riders or not self.riders:
                return F.linear(x, self.weight, self.bias)
            n = self.out_features  # the leading rows: a view, no copy
            return F.linear(x, self.weight[:n], None if self.bias is None else self.bias[:n])
        outs = [module(x) for module in self.modules]
        return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]

    @torch.no_grad()
    def ride(self, rows: int) -> torch.Tensor | None:
        """`rows` zeroed rows [rows, in] computed by this group's GEMM after the base's outputs (the
        storage grows when it has fewer); None when the group has no fused weight (a 4-bit base)."""
        if self.weight is None:
            return None
        if rows > self.riders:
            self._make_room(rows)
        tail = self.weight[self.out_features : self.out_features + rows]
        tail.zero_()
        return tail

    @torch.no_grad()
    def compact(self, rows: int) -> torch.Tensor | None:
        """Storage for exactly `rows` riding rows (0: the base alone), freeing spare room; the new rows,
        zeroed (the caller uploads them again), or None when the group has no fused weight."""
        if self.weight is None:
            return None
        if rows != self.riders:
            self._make_room(rows)
        return self.ride(rows)

    def _make_room(self, rows: int) -> None:
        """A new fused weight with `rows` riding rows; the modules' weights become views of it (the old
        storage is freed once nothing else holds it)."""
        base = self.weight[: self.out_features]
        weight = base.new_zeros(self.out_features + rows, base.shape[1])
        weight[: self.out_features].copy_(base)
        if self.bias is not None:
            bias = self.bias.new_zeros(self.out_features + rows)
            bias[: self.out_features].copy_(self.bias[: self.out_features])
            self.bias = bias
        _point_modules_at(self.modules, weight, self.bias)
        self.weight, self.riders = weight, rows


def layer_projections(layer) -> dict[str, GroupProjection]:
    return {group: GroupProjection([_module(layer, name) for name in names]) for group, names in GROUPS}


def all_fused(projections: list[dict[str, GroupProjection]]) -> bool:
    """Every group of every layer is one GEMM over plain 16/32-bit weights (not a 4-bit base, say)."""
    return all(group.weight is not None for layer in projections for group in layer.values())


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
    _point_modules_at(modules, weight, bias)
    return weight, bias


def _point_modules_at(modules: list[nn.Linear], weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The modules now read (and keep alive) their rows of the fused tensors."""
    start = 0
    for module in modules:
        stop = start + module.out_features
        module.weight = nn.Parameter(weight[start:stop], requires_grad=False)
        if module.bias is not None:
            module.bias = nn.Parameter(bias[start:stop], requires_grad=False)
        start = stop
