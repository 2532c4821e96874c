"""The LoRA expand of a few rows as one Triton kernel that reads only each row's own adapter slot.

lora_slots.py's expand is a GEMM over every slot: `where(mask, x @ A^T, 0) @ B` reads all of B, slots × R
rows of it, whatever the rows' adapters. For a prompt chunk or many rows that is the cheap way. For the
few rows of a small decode step it reads mostly zeros' partners: one row with one adapter needs 1/slots
of B. Here each program takes one row and a block of output columns, finds the row's slot (-1: none,
nothing added), and adds its R products to the base output in place:

    out[t, c] += sum_r shrunk[t, (p(c) * slots + slot[t]) * R + r] * B[(p(c) * slots + slot[t]) * R + r, c]

where p(c) is the group's projection that owns column c (q, k or v; gate or up). The arithmetic is the
mask path's (float32 sums of the same products, one rounding); only the order of the sums differs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 128  # output columns per program


@triton.jit
def _expand(
    shrunk, shrunk_stride, b, b_stride, out, out_stride, row_slots, width, first_end, second_end,
    SLOTS: tl.constexpr, RANK: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(1)
    slot = tl.load(row_slots + t)
    if slot >= 0:
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = cols < width
        proj = (cols >= first_end).to(tl.int64) + (cols >= second_end).to(tl.int64)  # [BLOCK_N]
        ranks = tl.arange(0, RANK_PAD)
        rows = ((proj * SLOTS + slot) * RANK)[None, :] + ranks[:, None]  # [RANK_PAD, BLOCK_N] rows of B
        take = (ranks[:, None] < RANK) & live[None, :]
        a = tl.load(shrunk + t.to(tl.int64) * shrunk_stride + rows, mask=take, other=0.0).to(tl.float32)
        w = tl.load(b + rows * b_stride + cols[None, :], mask=take, other=0.0).to(tl.float32)
        at = out + t.to(tl.int64) * out_stride + cols
        base = tl.load(at, mask=live, other=0.0).to(tl.float32)
        tl.store(at, (base + tl.sum(a * w, axis=0)).to(out.dtype.element_ty), mask=live)


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


def matches_the_mask_path(device, dtype, *, slots: int, rank: int, ends: tuple[int, ...], in_rows: int = 5) -> bool:
    """The kernel against the mask path's formula on random inputs laid out as the engine's are (views
    into wider GEMM outputs): run once per layout before the kernel is trusted."""
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
    return bool(torch.allclose(got, want, rtol=tolerance, atol=tolerance))
