"""The LoRA expand of a few rows as one Triton kernel that reads only each row's own adapter slot.

lora_slots.py's expand is a GEMM over every slot: `where(mask, x @ A^T, 0) @ B` reads all of B, slots × R
rows of it, whatever the rows' adapters. For a prompt chunk or many rows that is the cheap way. For the
few rows of a small decode step it reads mostly zeros' partners: one row with one adapter needs 1/slots
of B. Here each program takes one row and a block of output columns, finds the row's slot (-1: none,
nothing added), and adds its R products to the base output in place:

    out[t, c] += sum_r shrunk[t, (p(c) * slots + slot[t]) * R + r] * B[(p(c) * slots + slot[t]) * R + r, c]

where p(c) is the group's projection that owns column c (q, k or v; gate or up). The arithmetic is the
mask path's (float32 sums of the same products, one rounding); only the order of the sums differs.
For the gate/up group, `expand_gated` goes on to silu(gate) * up in the same launch (the decoder's
silu_mul, without rounding gate and up in between).

The residual add and RMSNorm after o_proj and down_proj stay fused.add_rms_norm's own launch: fused
here they took one program per row (the norm needs the whole row), so one SM read each row's slot of B,
25 µs a call against a few for this grid (bench/results/gpu-2026-12-01-fast-path-3/call2_profile.log).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 128  # output columns per program


@triton.jit
def _terms(
    shrunk_row, b, b_stride, cols, live, proj, slot, SLOTS: tl.constexpr, RANK: tl.constexpr, RANK_PAD: tl.constexpr
):
    """[BLOCK_N] float32: the LoRA terms of one row's columns `cols` (projection `proj` per column)."""
    ranks = tl.arange(0, RANK_PAD)
    rows = ((proj * SLOTS + slot) * RANK)[None, :] + ranks[:, None]  # [RANK_PAD, BLOCK_N] rows of B
    take = (ranks[:, None] < RANK) & live[None, :]
    a = tl.load(shrunk_row + rows, mask=take, other=0.0).to(tl.float32)
    w = tl.load(b + rows * b_stride + cols[None, :], mask=take, other=0.0).to(tl.float32)
    return tl.sum(a * w, axis=0)


@triton.jit
def _expand(
    shrunk, shrunk_stride, b, b_stride, out, out_stride, row_slots, width, first_end, second_end,
    SLOTS: tl.constexpr, RANK: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(1).to(tl.int64)
    slot = tl.load(row_slots + t)
    if slot >= 0:
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = cols < width
        proj = (cols >= first_end).to(tl.int64) + (cols >= second_end).to(tl.int64)  # [BLOCK_N]
        terms = _terms(shrunk + t * shrunk_stride, b, b_stride, cols, live, proj, slot, SLOTS, RANK, RANK_PAD)
        at = out + t * out_stride + cols
        base = tl.load(at, mask=live, other=0.0).to(tl.float32)
        tl.store(at, (base + terms).to(out.dtype.element_ty), mask=live)


@triton.jit
def _gated(
    shrunk, shrunk_stride, b, b_stride, out, out_stride, act, row_slots, half,
    SLOTS: tl.constexpr, RANK: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = cols < half
    gate = tl.load(out + t * out_stride + cols, mask=live, other=0.0).to(tl.float32)
    up = tl.load(out + t * out_stride + half + cols, mask=live, other=0.0).to(tl.float32)
    slot = tl.load(row_slots + t)
    if slot >= 0:
        row = shrunk + t * shrunk_stride
        zero = tl.zeros([BLOCK_N], dtype=tl.int64)
        gate += _terms(row, b, b_stride, cols, live, zero, slot, SLOTS, RANK, RANK_PAD)
        up += _terms(row, b, b_stride, cols + half, live, zero + 1, slot, SLOTS, RANK, RANK_PAD)
    silu = gate / (1.0 + tl.exp(-gate))
    tl.store(act + t * half + cols, (silu * up).to(act.dtype.element_ty), mask=live)


def expand_(
    out: torch.Tensor, shrunk: torch.Tensor, b: torch.Tensor, row_slots: torch.Tensor, *, slots: int, rank: int,
    ends: tuple[int, ...],
) -> torch.Tensor:  # fmt: skip
    """out [T, W] += each row's own slot's LoRA terms, in place. shrunk [T, P * slots * R] (x @ A^T),
    b [P * slots * R, W], row_slots [T] (-1: no adapter), `ends`: where each projection's columns end
    (the last is W). Row-strided views are read and written through their strides."""
    count, width = out.shape
    assert out.stride(1) == 1 and shrunk.stride(1) == 1 and b.stride(1) == 1 and len(ends) <= 3
    first_end, second_end = (list(ends[:-1]) + [width, width])[:2]
    grid = (triton.cdiv(width, BLOCK_N), count)
    _expand[grid](
        shrunk, shrunk.stride(0), b, b.stride(0), out, out.stride(0), row_slots, width, first_end, second_end,
        SLOTS=slots, RANK=rank, RANK_PAD=triton.next_power_of_2(rank), BLOCK_N=BLOCK_N, num_warps=4,
    )  # fmt: skip
    return out


def expand_gated(
    out: torch.Tensor, shrunk: torch.Tensor, b: torch.Tensor, row_slots: torch.Tensor, *, slots: int, rank: int
) -> torch.Tensor:
    """silu(gate) * up [T, W / 2] of a gate/up group's GEMM base columns out [T, W] (gate first) with each
    row's own slot's LoRA terms added on the way; `out` is only read."""
    count, width = out.shape
    assert out.stride(1) == 1 and shrunk.stride(1) == 1 and b.stride(1) == 1 and width % 2 == 0
    half = width // 2
    act = torch.empty(count, half, device=out.device, dtype=out.dtype)
    _gated[(triton.cdiv(half, BLOCK_N), count)](
        shrunk, shrunk.stride(0), b, b.stride(0), out, out.stride(0), act, row_slots, half,
        SLOTS=slots, RANK=rank, RANK_PAD=triton.next_power_of_2(rank), BLOCK_N=BLOCK_N, num_warps=4,
    )  # fmt: skip
    return act


def matches_the_mask_path(device, dtype, *, slots: int, rank: int, ends: tuple[int, ...], in_rows: int = 5) -> bool:
    """The kernels against the mask path's formula (and for a gate/up pair, silu(gate) * up after it) on
    random inputs laid out as the engine's are (views into wider GEMM outputs): run once per layout
    before they are trusted."""
    gen = torch.Generator(device=device).manual_seed(0)
    width, columns = ends[-1], len(ends) * slots * rank
    gemm = torch.randn(in_rows, width + columns + 3, generator=gen, device=device).to(dtype)
    base, shrunk = gemm[:, :width], gemm[:, width : width + columns]
    b = torch.randn(columns, width, generator=gen, device=device) / rank
    starts = torch.tensor((0, *ends[:-1]), device=device)
    column_projection = (torch.arange(width, device=device)[:, None] >= starts[None, 1:]).sum(-1)  # [W]
    row_projection = torch.arange(columns, device=device) // (slots * rank)  # [P * slots * R]
    b = torch.where(row_projection[:, None] == column_projection[None, :], b, 0.0).to(dtype)  # block diagonal
    row_slots = torch.arange(in_rows, device=device) % (slots + 1) - 1  # -1 (none), 0, 1, ...
    owner = torch.arange(columns, device=device) % (slots * rank) // rank
    want = torch.addmm(base.float(), torch.where(owner[None, :] == row_slots[:, None], shrunk, 0.0).float(), b.float())
    out = gemm.clone()[:, :width]  # written through its row stride, as the engine's base columns are
    got = expand_(out, shrunk, b, row_slots, slots=slots, rank=rank, ends=ends).float()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    if not torch.allclose(got, want, rtol=tolerance, atol=tolerance):
        return False
    if len(ends) == 2 and ends[0] * 2 == width:  # a gate/up pair
        gated = expand_gated(base, shrunk, b, row_slots, slots=slots, rank=rank).float()
        gate, up = want[:, : ends[0]], want[:, ends[0] :]
        return bool(torch.allclose(gated, torch.nn.functional.silu(gate) * up, rtol=tolerance, atol=tolerance))
    return True
