"""The decode attention kernel against the decoder's SDPA call, on the GPU (server/engine/decode_attention.py).

    python3 -m bench.decode_attention_bench        (after `source bench/gpu/setup.sh`; ~30 s)

First the start-up trust check (`matches_sdpa`) at several shapes and dtypes, then, at the 8B shape (32 query
heads, 8 KV heads, D 128, bf16), microseconds per call of SDPA under the length mask and of the kernel, for
1 / 8 / 32 / 64 rows at spans 256 (full and half-filled rows), 1024 and 4096: the speed-up and the kernel's
read bandwidth, and the kernel at the other warp count (decode_attention.NUM_WARPS: 4 spill registers at blocks
of 64, 8 do not). Each result is checked against SDPA before it is timed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import sdpa_kernel
from triton.testing import do_bench

from server.engine import decode_attention as da
from server.engine.decoder import _ATTENTION_BACKENDS

HEADS, KV_HEADS, DIM, DTYPE = 32, 8, 128, torch.bfloat16  # Llama-3-8B


def trust_checks() -> None:
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for heads, kv, dim in ((32, 8, 128), (32, 32, 128), (28, 4, 128), (8, 2, 64), (6, 2, 80)):
            ok = da.matches_sdpa(torch.device("cuda"), dtype, heads=heads, kv_heads=kv, head_dim=dim)
            print(f"matches_sdpa {dtype} heads {heads}/{kv} D {dim}: {ok}", flush=True)


def inputs(rows: int, span: int, length: int):
    """q (a strided view, as the fused q/k/v output is), K, V [rows, Hkv, span + 1, D], lengths, SDPA's mask."""
    K = torch.randn(rows, KV_HEADS, span + 1, DIM, device="cuda", dtype=DTYPE)
    V = torch.randn_like(K)
    q = torch.randn(rows, HEADS + 2 * KV_HEADS, DIM, device="cuda", dtype=DTYPE)[:, :HEADS]
    lengths = torch.full((rows,), length, device="cuda")
    lengths[0] = span  # one row at the span (for 1 row: the only one)
    visible = torch.arange(span, device="cuda")[None] < lengths[:, None]
    storage = torch.full((rows, -(-span // 16) * 16), float("-inf"), device="cuda", dtype=DTYPE)
    mask = storage[:, :span].masked_fill_(visible, 0)[:, None, None]  # [rows, 1, 1, span], 16-aligned rows
    return q, K, V, lengths, mask


def time_one(rows: int, span: int, length: int) -> str:
    q, K, V, lengths, mask = inputs(rows, span, length)
    group = HEADS // KV_HEADS

    def sdpa():
        with sdpa_kernel(_ATTENTION_BACKENDS):
            keys, values = K[:, :, :span], V[:, :, :span]
            return F.scaled_dot_product_attention(q.view(rows, KV_HEADS, group, DIM), keys, values, attn_mask=mask)

    def kernel():
        return da.decode_attention(q, K, V, lengths, span=span)

    reference, got = sdpa().reshape(rows, -1).float(), kernel().float()
    assert torch.allclose(got, reference, rtol=3e-2, atol=3e-2), (got - reference).abs().max()
    t_sdpa = do_bench(sdpa, warmup=25, rep=200, return_mode="median") * 1e3  # µs
    t_kernel = do_bench(kernel, warmup=25, rep=200, return_mode="median") * 1e3
    default_warps, da.NUM_WARPS = da.NUM_WARPS, 8 if da.NUM_WARPS != 8 else 4  # the other warp count, same inputs
    try:
        assert torch.allclose(kernel().float(), reference, rtol=3e-2, atol=3e-2)
        t_other = do_bench(kernel, warmup=25, rep=200, return_mode="median") * 1e3
    finally:
        other_warps, da.NUM_WARPS = da.NUM_WARPS, default_warps
    read = lengths.sum().item() * KV_HEADS * DIM * 2 * DTYPE.itemsize  # keys and values
    split = da.split_size(rows=rows, kv_heads=KV_HEADS, span=span)
    return (
        f"{rows:4d} {span:5d} {length:5d} | {t_sdpa:7.1f} | {t_kernel:7.1f} | {t_sdpa / t_kernel:5.2f}x | "
        f"{read / t_kernel / 1e3:7.0f} | {split} | {other_warps} warps {t_other:7.1f}"
    )


def main() -> None:
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    trust_checks()
    header = f"rows  span length | sdpa µs | kernel µs ({da.NUM_WARPS} warps) | speed-up | kernel GB/s | split"
    print(header + " | the other warp count µs", flush=True)
    for rows in (1, 8, 32, 64):
        for span, length in ((256, 256), (256, 130), (1024, 1024), (4096, 4096)):
            print(time_one(rows, span, length), flush=True)


if __name__ == "__main__":
    main()
