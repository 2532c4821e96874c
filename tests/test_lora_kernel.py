"""The LoRA expand kernel (server/engine/lora_kernel.py) against the mask path it replaces for small steps.

Without a GPU it runs in Triton's interpreter (conftest sets TRITON_INTERPRET); on the GPU machine the same
tests run it compiled. On CUDA the engine turns it on by itself (LoraSlots.use_expand_kernel at each layout);
here the tests turn it on.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.test_engine import EN, ZH, ids_of, make_engine, request, rows_of, run_together, served_state

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    "ends, slots, rank",
    [((8,), 2, 4), ((16, 24, 32), 3, 8), ((130, 260), 2, 5), ((300,), 1, 16), ((64, 100), 2, 4)],
    ids=["one projection", "q/k/v", "gate/up, widths off the block size", "one slot", "two unequal projections"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_gets_its_own_slots_terms_as_the_mask_path_gives_them(ends, slots, rank, dtype):
    """And then silu(gate) * up of them for a gate/up pair (the check covers both kernels)."""
    from server.engine import lora_kernel

    assert lora_kernel.matches_the_mask_path(DEVICE, dtype, slots=slots, rank=rank, ends=ends)


def test_generation_with_the_kernel_equals_generation_with_the_masks(tiny_model_dir, trained_adapters, monkeypatch):
    """The decoder's fused groups, both adapters and a base row in one batch of small steps: the same tokens."""
    from server.engine import lora_kernel

    launches = []
    for name in ("expand_", "expand_gated"):
        kernel = getattr(lora_kernel, name)
        monkeypatch.setattr(
            lora_kernel, name, lambda *a, kernel=kernel, **k: launches.append(kernel) or kernel(*a, **k)
        )
    # fp32 on a GPU too (no bf16 rounding), and eager: a graph's replay would not pass through Python
    state = served_state(tiny_model_dir, trained_adapters, dtype="float32", cuda_graphs=False)
    lora = state.runner.lora
    state.runner.decoder.use_qkv_kernel(enabled=False)  # so that expand_ serves q/k/v, on a GPU as here
    requests = [
        request(state, adapter=EN, row=rows_of(EN)[1], max_new_tokens=12),
        request(state, adapter=ZH, row=rows_of(ZH)[1], max_new_tokens=12),
        request(state, inputs="hello hello", max_new_tokens=12),
    ]
    lora.use_expand_kernel(enabled=False)
    assert lora.row_adapters(torch.tensor([0, 1, -1], device=DEVICE)).masks is not None
    launches.clear()
    with_masks = asyncio.run(run_together(make_engine(state), requests))
    assert not launches
    assert lora.use_expand_kernel()
    assert lora.row_adapters(torch.tensor([0, 1, -1], device=DEVICE)).masks is None
    launches.clear()  # (its check ran the kernel too)
    with_kernel = asyncio.run(run_together(make_engine(state), requests))
    assert [ids_of(r) for r in with_kernel] == [ids_of(r) for r in with_masks]
    assert len(launches) >= 4 * 2 * 10  # every group of both layers, in each decode step
    # gate/up by expand_gated; q/k/v, o_proj and down_proj by expand_ (the q/k/v kernel is off here)
    assert len({id(kernel) for kernel in launches}) == 2
    assert ids_of(with_kernel[0]) != ids_of(with_kernel[2])  # the adapters changed something


def test_a_kernel_that_differs_from_the_mask_path_is_not_used(tiny_model_dir, trained_adapters, monkeypatch, caplog):
    from server.engine import lora_kernel

    state = served_state(tiny_model_dir, trained_adapters, cuda_graphs=False)
    monkeypatch.setattr(lora_kernel, "matches_the_mask_path", lambda *args, **kwargs: False)
    assert not state.runner.lora.use_expand_kernel()
    assert state.runner.lora.row_adapters(torch.tensor([0], device=DEVICE)).masks is not None
    assert "expanding with masks" in caplog.text


def test_slots_wider_than_the_kernels_hold_expand_with_masks():
    from server.engine.lora_slots import KERNEL_MAX_RANK, LoraSlots
    from tests.test_engine_parts import SHAPES, adapter

    lora = LoraSlots(SHAPES, slots=2, device=DEVICE, dtype=torch.float32)
    lora.add("narrow", rank=8, scaling=1.0, state_dict=adapter(8, 1))
    assert lora.use_expand_kernel() and lora.row_adapters(torch.tensor([0], device=DEVICE)).masks is None
    lora.add("wide", rank=2 * KERNEL_MAX_RANK, scaling=1.0, state_dict=adapter(2 * KERNEL_MAX_RANK, 2))
    assert not lora.use_expand_kernel()  # (a re-layout on CUDA calls it itself)
    assert lora.row_adapters(torch.tensor([0], device=DEVICE)).masks is not None
