"""The decode rows' attention as a split-KV ("flash-decoding") Triton kernel.

The decoder's definition is SDPA over K[:n, :, :span] under a length mask, with the G query heads of a
KV head in the query axis (Decoder._decode_attention). SDPA runs that as one program per (row, KV head):
8 programs for a 1-row 8B step, reading ~1 MB on 8 of 132 SMs (13 µs a layer on an H200, 0.42 ms of a
5.3 ms step). Here the span is cut into splits, one program per (row, KV head, split):

    phase 1, grid (n, Hkv, splits): the G query heads [G, D] against the split's keys, blocks of BLOCK
        positions, online softmax in float32; keeps its running max m, sum l and unnormalized output acc
    phase 2, grid (n * Hq): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, M = max_s m_s

A split reads only positions below its row's length (read on the device), so a graph captured for a
span bucket reads what the rows hold, not the bucket. A split wholly past the length keeps m = -inf,
l = 0, acc = 0 and weighs 2^-inf = 0; split 0 always holds position 0 (lengths are >= 1), so M is finite.
With one split (many rows: the grid is full without splitting) phase 1 writes the output itself.

The G query heads are padded to 16 rows (tl.dot's smallest side: the padding costs arithmetic, which is
idle here, not bytes). Both products take float32 operands, in tf32 on the tensor cores for 16-bit caches:
bf16 and fp16 values are exact in tf32, so the products are too (and the probabilities round to tf32, finer
than the bf16 flash attention rounds them to), and Triton 3.6's interpreter, which runs the CPU tests,
multiplies bf16 operands' bit patterns in tl.dot. A float32 cache multiplies in float32 ("ieee"), as SDPA.

The grid and the scratch depend on n and span alone (host integers): the launches are CUDA-graph safe.
Decoder uses it on CUDA once `matches_sdpa` held for its shapes; SDPA stays the definition.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

PROGRAMS = 2 * 132  # enough to keep an H200's 132 SMs busy twice over
MIN_SPLIT = 16  # positions; also tl.dot's smallest side
MAX_BLOCK = 64  # positions a program holds at once ([BLOCK, D] keys and values)
# Phase 1's warps. At blocks of 64 in bf16, 4 warps spill registers (404 bytes) and 8 do not (ptxas -v, sm_90):
# unmeasured on a GPU so far, so bench.decode_attention_bench times both.
NUM_WARPS = 4
MAX_SPLITS = 64  # phase 2 holds every split of a head at once: [MAX_SPLITS, D] float32
_LOG2_E = 1.4426950408889634


# Not specialized: the span of eager steps varies, and the lengths are a slice of a step's one upload at any
# 8-byte offset; specialized, each new divisibility of either would compile the kernel again mid-serving.
@triton.jit(do_not_specialize=["lengths", "span"])
def _split(
    q, q_row_stride, q_head_stride, k, v, slot_stride, head_stride, pos_stride, lengths, span, split, scale,
    out, part_acc, part_m, part_l,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    kv = tl.program_id(1)
    part = tl.program_id(2)
    begin = part * split
    end = tl.minimum(tl.minimum(begin + split, tl.load(lengths + row).to(tl.int32)), span)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    heads = kv * GROUP + g  # [GROUP_PAD] query heads; those past G are zero rows, never stored
    head_live = g < GROUP
    dim_live = d < HEAD_DIM
    queries = tl.load(
        q + row * q_row_stride + heads[:, None] * q_head_stride + d[None, :],
        mask=head_live[:, None] & dim_live[None, :],
        other=0.0,
    ).to(tl.float32)  # [GROUP_PAD, DIM_PAD]
    cache = row * slot_stride + kv * head_stride  # row i of the step lives in KV slot i
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)  # running max, in log2 units
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)  # running sum of 2^(score - m_i)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)
    start = begin
    while start < end:  # no iteration for a split past the row's length (a bound the interpreter takes)
        pos = start + tl.arange(0, BLOCK)
        live = pos < end
        at = cache + pos[:, None] * pos_stride + d[None, :]
        take = live[:, None] & dim_live[None, :]
        keys = tl.load(k + at, mask=take, other=0.0).to(tl.float32)  # [BLOCK, DIM_PAD]
        scores = tl.dot(queries, tl.trans(keys), input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK]
        scores = tl.where(live[None, :], scores, float("-inf"))
        top = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: the block has a live position
        decay = tl.exp2(m_i - top)  # exp2(-inf) = 0 on the first block
        p = tl.exp2(scores - top[:, None])
        l_i = l_i * decay + tl.sum(p, axis=1)
        values = tl.load(v + at, mask=take, other=0.0).to(tl.float32)
        acc = acc * decay[:, None] + tl.dot(p, values, input_precision=PRECISION)
        m_i = top
        start += BLOCK
    q_heads = GROUP * tl.num_programs(1)
    store = head_live[:, None] & dim_live[None, :]
    if DIRECT:  # one split: this is the answer
        o = acc / l_i[:, None]
        at = (row * q_heads + heads[:, None]) * HEAD_DIM + d[None, :]
        tl.store(out + at, o.to(out.dtype.element_ty), mask=store)
    else:
        at = (row * q_heads + heads) * tl.num_programs(2) + part  # [GROUP_PAD] in [n, Hq, splits]
        tl.store(part_m + at, m_i, mask=head_live)
        tl.store(part_l + at, l_i, mask=head_live)
        tl.store(part_acc + at[:, None] * HEAD_DIM + d[None, :], acc, mask=store)


@triton.jit(do_not_specialize=["splits"])
def _combine(
    part_acc, part_m, part_l, out, splits,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, MAX_SPLITS: tl.constexpr,
):  # fmt: skip
    row_head = tl.program_id(0).to(tl.int64)  # row * Hq + head: the scratch's and the output's leading index
    s = tl.arange(0, MAX_SPLITS)
    d = tl.arange(0, DIM_PAD)
    live = s < splits
    at = row_head * splits + s
    m_s = tl.load(part_m + at, mask=live, other=float("-inf"))
    l_s = tl.load(part_l + at, mask=live, other=0.0)
    weight = tl.exp2(m_s - tl.max(m_s, axis=0))  # 0 for empty splits and padding
    dim_live = d < HEAD_DIM
    acc = tl.load(part_acc + at[:, None] * HEAD_DIM + d[None, :], mask=live[:, None] & dim_live[None, :], other=0.0)
    o = tl.sum(weight[:, None] * acc, axis=0) / tl.sum(weight * l_s, axis=0)
    tl.store(out + row_head * HEAD_DIM + d, o.to(out.dtype.element_ty), mask=dim_live)


def decode_attention(
    q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, lengths: torch.Tensor, *, span: int, split: int | None = None
) -> torch.Tensor:
    """[n, Hq * D] in q's dtype: each row i's queries q [n, Hq, D] (row and head strides free) over KV slot i
    of K, V [slots, Hkv, L, D], positions 0..lengths[i]-1 (lengths [n] on the device, each in 1..span).
    `split`: positions per program, a power of 2 >= MIN_SPLIT; None: split_size's choice (checks force each)."""
    n, heads, head_dim = q.shape
    kv_heads = K.shape[1]
    assert q.stride(2) == 1 and K.stride() == V.stride() and K.stride(-1) == 1 and heads % kv_heads == 0
    split = split or split_size(rows=n, kv_heads=kv_heads, span=span)
    assert split >= MIN_SPLIT and split & (split - 1) == 0
    splits = triton.cdiv(span, split)
    assert splits <= MAX_SPLITS
    out = torch.empty(n, heads * head_dim, device=q.device, dtype=q.dtype)
    direct = splits == 1  # phase 1 writes `out`; no scratch (`out` stands in for it, unread)
    part_acc = out if direct else torch.empty(n, heads, splits, head_dim, device=q.device, dtype=torch.float32)
    stats = (out, out) if direct else torch.empty(2, n, heads, splits, device=q.device, dtype=torch.float32)  # m, l
    dim_pad = max(16, triton.next_power_of_2(head_dim))
    _split[(n, kv_heads, splits)](
        q, q.stride(0), q.stride(1), K, V, K.stride(0), K.stride(1), K.stride(2), lengths, span, split,
        _LOG2_E / math.sqrt(head_dim), out, part_acc, stats[0], stats[1],
        GROUP=heads // kv_heads, GROUP_PAD=max(16, triton.next_power_of_2(heads // kv_heads)),
        HEAD_DIM=head_dim, DIM_PAD=dim_pad, BLOCK=min(split, MAX_BLOCK), DIRECT=direct,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=NUM_WARPS,
    )  # fmt: skip
    if not direct:
        _combine[(n * heads,)](
            part_acc, stats[0], stats[1], out, splits, HEAD_DIM=head_dim, DIM_PAD=dim_pad, MAX_SPLITS=MAX_SPLITS,
            num_warps=4,
        )  # fmt: skip
    return out


def split_size(*, rows: int, kv_heads: int, span: int) -> int:
    """Positions per program: the smallest power of 2 (>= MIN_SPLIT) that still gives about PROGRAMS
    programs, larger where the span would need more than MAX_SPLITS splits. Many rows: one split."""
    wanted = triton.cdiv(PROGRAMS, rows * kv_heads)  # splits per (row, KV head)
    split = max(MIN_SPLIT, triton.next_power_of_2(triton.cdiv(span, wanted)))
    while triton.cdiv(span, split) > MAX_SPLITS:
        split *= 2
    return split


def supports(head_dim: int) -> bool:
    """A head is padded to a power of 2 of at least 16 (tl.dot's smallest side); past 256 the [BLOCK, D] tiles
    would not fit a program's registers."""
    return 0 < head_dim <= 256


def reference(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, lengths: torch.Tensor, *, span: int) -> torch.Tensor:
    """The decoder's own SDPA call under its length mask: [n, Hq * D]."""
    from server.engine.decoder import decode_mask, decode_sdpa

    return decode_sdpa(q, K, V, decode_mask(lengths, span, q.dtype))


def serves_here(device, dtype, *, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel applies to this head width and matches the ops it replaces on `device` (its check,
    which also builds it)."""
    return supports(head_dim) and matches_sdpa(device, dtype, heads=heads, kv_heads=kv_heads, head_dim=head_dim)


def matches_sdpa(device, dtype, *, heads: int, kv_heads: int, head_dim: int) -> bool:
    """The kernel against the SDPA call on random inputs laid out as the engine's (q a strided view of a wider
    q/k output, a cache with a scratch position, rows of lengths 1, span and between), for every block size
    with and without splits: run once before it is trusted (it also compiles each variant serving launches)."""
    gen = torch.Generator(device=device).manual_seed(0)
    lengths = torch.tensor([75, 1, 33, 16, 48], device=device)  # 16, 48: a split's end; 75: no split's
    n = lengths.shape[0]
    q = torch.randn(n, heads + kv_heads, head_dim, generator=gen, device=device).to(dtype)[:, :heads]  # [n, Hq, D]
    K, V = (torch.randn(n + 1, kv_heads, 97, head_dim, generator=gen, device=device).to(dtype) for _ in "kv")
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    # (span, split): blocks of 16, 32 and 64 positions over 5, 3 and 2 splits, then each block size in one split
    for span, split in ((75, 16), (75, 32), (75, 64), (75, 128), (16, 16), (30, 32)):
        within = lengths.clamp(max=span)
        want = reference(q, K, V, within, span=span).float()
        got = decode_attention(q, K, V, within, span=span, split=split).float()
        if not torch.allclose(got, want, rtol=tolerance, atol=tolerance):
            return False
    return True
