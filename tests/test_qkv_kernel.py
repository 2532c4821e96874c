"""The q/k/v epilogue kernel (server/engine/qkv_kernel.py: LoRA terms, RoPE and the KV-cache writes of a
small step in one launch) against the decoder's unfused ops, which stay its definition.

Without a GPU it runs in Triton's interpreter (conftest sets TRITON_INTERPRET); on the GPU machine the same
tests run it compiled. On CUDA the decoder turns it on by itself (Decoder.use_qkv_kernel); here the tests do.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.test_engine import EN, ZH, ids_of, make_engine, request, rows_of, run_together, served_state

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 32), (8, 8, 16), (6, 2, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_and_the_cache_cells_are_the_unfused_ops_results(heads, kv_heads, head_dim, dtype):
    from server.engine import qkv_kernel

    assert qkv_kernel.matches_the_unfused_path(DEVICE, dtype, heads=heads, kv_heads=kv_heads, head_dim=head_dim)


def test_head_sizes_whose_half_is_not_a_power_of_two_stay_unfused():
    from server.engine import qkv_kernel

    assert [qkv_kernel.supports(d) for d in (128, 64, 80, 96, 7)] == [True, True, False, False, False]


def test_generation_with_the_kernel_equals_generation_unfused(tiny_model_dir, trained_adapters, monkeypatch):
    """Both adapters and a base row in one batch: prefill chunks unfused, the small decode steps fused."""
    from server.engine import qkv_kernel

    launches = []
    epilogue = qkv_kernel.qkv_epilogue
    monkeypatch.setattr(qkv_kernel, "qkv_epilogue", lambda *a, **k: launches.append(1) or epilogue(*a, **k))
    # fp32 on a GPU too (no bf16 rounding), and eager: a graph's replay would not pass through Python
    state = served_state(tiny_model_dir, trained_adapters, dtype="float32", cuda_graphs=False)
    decoder = state.runner.decoder
    state.runner.lora.use_expand_kernel(enabled=False)  # the masks expand the other groups either way
    requests = [
        request(state, adapter=EN, row=rows_of(EN)[2], max_new_tokens=12),
        request(state, adapter=ZH, row=rows_of(ZH)[2], max_new_tokens=12),
        request(state, inputs="hello hello", max_new_tokens=12),
    ]
    decoder.use_qkv_kernel(enabled=False)
    unfused = asyncio.run(run_together(make_engine(state), requests))
    assert decoder.use_qkv_kernel()
    launches.clear()  # (its check ran the kernel too)
    fused = asyncio.run(run_together(make_engine(state), requests))
    assert [ids_of(r) for r in fused] == [ids_of(r) for r in unfused]
    assert len(launches) >= 2 * 10  # both layers, in each decode step
    assert ids_of(fused[0]) != ids_of(fused[2])  # the adapters changed something


def test_a_kernel_that_differs_from_the_unfused_ops_is_not_used(tiny_model_dir, trained_adapters, monkeypatch, caplog):
    from server.engine import qkv_kernel

    state = served_state(tiny_model_dir, trained_adapters)
    monkeypatch.setattr(qkv_kernel, "matches_the_unfused_path", lambda *args, **kwargs: False)
    assert not state.runner.decoder.use_qkv_kernel()
    assert state.runner.decoder.qkv_kernel is None and "unfused" in caplog.text
