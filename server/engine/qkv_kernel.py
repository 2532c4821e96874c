"""A small step's q/k/v epilogue as one Triton kernel: LoRA terms, RoPE and the KV-cache writes.

After the fused q/k/v GEMM the decoder runs, per layer, the LoRA expand, RoPE over q and k, and two
indexed writes of k and v into the cache: four launches, each nearly empty at decode sizes, where a
step's cost is its launches (a 1-row 8B step ran 1,008 kernels in 6.2 ms of GPU time). Here one
program per (token, head) reads the head's columns of the GEMM output, adds the token's own adapter
slot's terms (as lora_kernel.py does), rotates q and k heads (transformers' rotate-half, in float32
and rounded once, as the compiled fused.rope), and writes q out and k, v straight into their cache
cells. Decoder uses it for steps of at most lora_slots.EXPAND_KERNEL_ROWS tokens on CUDA, once
`matches_the_unfused_path` held for its shapes; the unfused path stays the definition.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qkv(
    qkv, qkv_stride, shrunk, shrunk_stride, b, b_stride, row_slots, cos, sin, positions,
    q_out, k_cache, v_cache, cache_slot_stride, cache_head_stride, cache_pos_stride, write_slots, write_positions,
    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    SLOTS: tl.constexpr, RANK: tl.constexpr, RANK_PAD: tl.constexpr, LORA: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    first = head * 2 * HALF  # the head's first column in [q heads | k heads | v heads]
    left = first + tl.arange(0, HALF)
    x1 = tl.load(qkv + t * qkv_stride + left).to(tl.float32)
    x2 = tl.load(qkv + t * qkv_stride + left + HALF).to(tl.float32)
    if LORA:
        slot = tl.load(row_slots + t)
        if slot >= 0:
            proj = (head >= Q_HEADS).to(tl.int64) + (head >= Q_HEADS + KV_HEADS).to(tl.int64)  # q, k or v
            ranks = tl.arange(0, RANK_PAD)
            rows = (proj * SLOTS + slot) * RANK + ranks  # [RANK_PAD]
            live = ranks < RANK
            a = tl.load(shrunk + t * shrunk_stride + rows, mask=live, other=0.0).to(tl.float32)[:, None]
            w1 = tl.load(b + rows[:, None] * b_stride + left[None, :], mask=live[:, None], other=0.0)
            w2 = tl.load(b + rows[:, None] * b_stride + left[None, :] + HALF, mask=live[:, None], other=0.0)
            x1 += tl.sum(a * w1.to(tl.float32), axis=0)
            x2 += tl.sum(a * w2.to(tl.float32), axis=0)
    if head < Q_HEADS + KV_HEADS:  # q and k rotate: [x1, x2] * cos + [-x2, x1] * sin
        at = tl.load(positions + t) * 2 * HALF + tl.arange(0, HALF)
        c1 = tl.load(cos + at).to(tl.float32)
        c2 = tl.load(cos + at + HALF).to(tl.float32)
        s1 = tl.load(sin + at).to(tl.float32)
        s2 = tl.load(sin + at + HALF).to(tl.float32)
        rotated1 = x1 * c1 - x2 * s1
        rotated2 = x2 * c2 + x1 * s2
        x1 = rotated1
        x2 = rotated2
    offsets = tl.arange(0, HALF)
    if head < Q_HEADS:
        dest = q_out + (t * Q_HEADS + head) * 2 * HALF + offsets
        tl.store(dest, x1.to(q_out.dtype.element_ty))
        tl.store(dest + HALF, x2.to(q_out.dtype.element_ty))
    else:
        kv_head = (head - Q_HEADS) % KV_HEADS
        cell = (
            tl.load(write_slots + t) * cache_slot_stride
            + kv_head * cache_head_stride
            + tl.load(write_positions + t) * cache_pos_stride
        )
        if head < Q_HEADS + KV_HEADS:
            tl.store(k_cache + cell + offsets, x1.to(k_cache.dtype.element_ty))
            tl.store(k_cache + cell + offsets + HALF, x2.to(k_cache.dtype.element_ty))
        else:
            tl.store(v_cache + cell + offsets, x1.to(v_cache.dtype.element_ty))
            tl.store(v_cache + cell + offsets + HALF, x2.to(v_cache.dtype.element_ty))


def qkv_epilogue(
    qkv: torch.Tensor, *, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
    K: torch.Tensor, V: torch.Tensor, write_slots: torch.Tensor, write_positions: torch.Tensor, lora=None,
) -> torch.Tensor:  # fmt: skip
    """q [T, heads, D] rotated, with k and v (rotated k) written into K, V [slots, kv_heads, L, D] at
    (write_slots[t], write_positions[t]). qkv [T, (heads + 2 kv_heads) D] is the GEMM's base columns (a
    row-strided view is fine); cos, sin [positions, D] are the decoder's tables. `lora`: None, or
    (shrunk [T, 3 slots R], B [3 slots R, (heads + 2 kv_heads) D], row_slots [T], slots, rank)."""
    count = qkv.shape[0]
    head_dim = K.shape[-1]
    assert qkv.stride(1) == 1 and K.stride() == V.stride() and K.stride(-1) == 1 and cos.is_contiguous()
    q = torch.empty(count, heads, head_dim, device=qkv.device, dtype=qkv.dtype)
    shrunk, b, row_slots, slots, rank = lora if lora is not None else (qkv, qkv, positions, 1, 1)
    _qkv[(count, heads + 2 * kv_heads)](
        qkv, qkv.stride(0), shrunk, shrunk.stride(0), b, b.stride(0), row_slots, cos, sin, positions,
        q, K, V, K.stride(0), K.stride(1), K.stride(2), write_slots, write_positions,
        Q_HEADS=heads, KV_HEADS=kv_heads, HALF=head_dim // 2,
        SLOTS=slots, RANK=rank, RANK_PAD=triton.next_power_of_2(rank), LORA=lora is not None,
        num_warps=4 if lora is not None else 1,  # the LoRA terms hold a [R, D / 2] tile of B
    )  # fmt: skip
    return q


def supports(head_dim: int) -> bool:
    """Triton's blocks are powers of 2: each half of a head must be one (64 for Llama's 128)."""
    half = head_dim // 2
    return head_dim % 2 == 0 and half > 0 and half & (half - 1) == 0


def serves_here(device, dtype, *, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel applies to this head width and matches the ops it replaces on `device` (its check,
    which also builds it)."""
    return supports(head_dim) and matches_the_unfused_path(
        device, dtype, heads=heads, kv_heads=kv_heads, head_dim=head_dim
    )


def matches_the_unfused_path(device, dtype, *, heads: int, kv_heads: int, head_dim: int, tokens: int = 5) -> bool:
    """The kernel against the decoder's unfused ops (the LoRA formula, fused.rope, indexed cache writes) on
    random inputs laid out as the engine's, with and without LoRA terms: run once before it is trusted."""
    from server.engine.fused import rope

    gen = torch.Generator(device=device).manual_seed(0)
    slots, rank, cells = 3, 4, 9
    width = (heads + 2 * kv_heads) * head_dim
    starts = torch.tensor([0, heads * head_dim, (heads + kv_heads) * head_dim], device=device)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    gemm = rand(tokens, width + 3 * slots * rank + 5).to(dtype)
    base, shrunk = gemm[:, :width], gemm[:, width : width + 3 * slots * rank]
    column_projection = (torch.arange(width, device=device)[:, None] >= starts[None, 1:]).sum(-1)
    row_projection = torch.arange(3 * slots * rank, device=device) // (slots * rank)
    b = torch.where(row_projection[:, None] == column_projection[None, :], rand(3 * slots * rank, width) / rank, 0.0)
    b = b.to(dtype)
    row_slots = torch.arange(tokens, device=device) % (slots + 1) - 1
    cos, sin = rand(cells, head_dim).to(dtype), rand(cells, head_dim).to(dtype)
    positions = torch.randint(0, cells, (tokens,), generator=gen, device=device)
    write_slots = torch.randperm(tokens, generator=gen, device=device) % 2
    write_positions = torch.randperm(cells, generator=gen, device=device)[:tokens]
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for lora in (None, (shrunk, b, row_slots, slots, rank)):
        x = base.float()
        if lora is not None:
            owner = torch.arange(3 * slots * rank, device=device) % (slots * rank) // rank
            x = torch.addmm(x, torch.where(owner[None, :] == row_slots[:, None], shrunk, 0.0).float(), b.float())
        x = x.view(tokens, heads + 2 * kv_heads, head_dim)
        rotated = rope(x[:, : heads + kv_heads], cos[positions].float()[:, None], sin[positions].float()[:, None])
        K = torch.zeros(2, kv_heads, cells, head_dim, device=device, dtype=dtype)
        V = torch.zeros_like(K)
        q = qkv_epilogue(
            base, heads=heads, kv_heads=kv_heads, cos=cos, sin=sin, positions=positions, K=K, V=V,
            write_slots=write_slots, write_positions=write_positions, lora=lora,
        )  # fmt: skip
        checks = [
            (q, rotated[:, :heads]),
            (K[write_slots, :, write_positions], rotated[:, heads:]),
            (V[write_slots, :, write_positions], x[:, heads + kv_heads :]),
        ]
        if not all(torch.allclose(got.float(), want, rtol=tolerance, atol=tolerance) for got, want in checks):
            return False
    return True
