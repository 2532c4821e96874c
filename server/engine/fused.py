"""The decoder's elementwise pieces (RMSNorm, residual + RMSNorm, RoPE, SiLU·up), each one kernel on CUDA.

Eagerly each is a handful of small kernels (RMSNorm alone is seven); at decode sizes a step costs its
launches more than its arithmetic, even replayed from a CUDA graph. On CUDA they are compiled once
with dynamic shapes (TorchInductor fuses each into one kernel); elsewhere, and if compiling fails,
the same functions run eagerly. The arithmetic is transformers' own (LlamaRMSNorm in float32, cast,
then the weight), so the CPU path stays token for token equal to HF.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("loraserve.fused")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after adding `delta`, and its norm (the next block's input)."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by cos/sin [T, 1, D] (rotate-half, as transformers' Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class Kernels:
    """The functions above, compiled for CUDA when asked; `enabled=False` or a CPU device: eager."""

    def __init__(self, *, compiled: bool) -> None:
        names = ("rms_norm", "add_rms_norm", "rope", "silu_mul")
        for name in names:
            fn = globals()[name]
            setattr(self, name, _compiled(fn) if compiled else fn)
        self.compiled = compiled


def _compiled(fn):
    try:
        compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    except Exception:  # no compiler here: eager is the same arithmetic
        log.exception("torch.compile unavailable for %s; running it eagerly", fn.__name__)
        return fn

    def call(*args):
        nonlocal compiled
        try:
            return compiled(*args)
        except Exception:  # a compiler failure must cost speed, never a request
            log.exception("compiled %s failed; running it eagerly from now on", fn.__name__)
            compiled = fn
            return fn(*args)

    call.__name__ = fn.__name__
    return call
