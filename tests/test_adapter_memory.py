"""Unloading an adapter gives back its memory (tier a, no model): the host copy is freed, and the
device slots shrink back when the widest adapter leaves. Memory accounting is what /metrics reports."""

from __future__ import annotations

import gc
import weakref

import torch

from server.engine.lora_slots import LoraSlots
from tests.test_engine_parts import CPU, SHAPES, adapter, reference


def upload(lora: LoraSlots, key: str) -> None:
    """Into a device slot and unpinned again, as one request on it does."""
    assert lora.acquire(key) is not None
    lora.release(key)


def slots_with(*ranks: int) -> LoraSlots:
    lora = LoraSlots(SHAPES, slots=2, device=CPU, dtype=torch.float32)
    for index, rank in enumerate(ranks):
        lora.add(f"r{index}", rank=rank, scaling=1.0, state_dict=adapter(rank, index))
    return lora


def test_unload_frees_the_host_copy():
    lora = slots_with(2, 2)
    upload(lora, "r0")  # the device tier has held it too
    refs = [weakref.ref(t) for ab in lora.host["r0"].weights.values() for t in ab]
    kept = lora.host_bytes
    lora.remove("r0")
    gc.collect()
    assert all(ref() is None for ref in refs), "the unloaded adapter's host tensors are still referenced"
    assert lora.host_bytes == kept // 2 and list(lora.host) == ["r1"]


def test_unloading_the_widest_adapter_shrinks_the_device_slots():
    lora = slots_with(2, 8)
    upload(lora, "r1")
    wide = lora.device_bytes
    lora.remove("r1")
    assert lora.device_bytes == slots_with(2).device_bytes < wide  # as if the rank-8 one never came
    assert lora.rank == 2
    slot = lora.acquire("r0")  # the one left still answers exactly
    x = torch.randn(3, 4)
    out = lora.apply(0, "q_proj", x, torch.zeros(3, 6), lora.row_adapters(torch.tensor([slot] * 3)))
    torch.testing.assert_close(out, reference(adapter(2, 0), x, "q_proj", 1.0))


def test_no_adapter_left_means_no_device_slots():
    lora = slots_with(4)
    upload(lora, "r0")
    lora.remove("r0")
    assert (lora.device_bytes, lora.host_bytes, lora.rank) == (0, 0, 0)
    assert lora.row_adapters(torch.tensor([-1, -1])) is None  # base-model rows skip LoRA again
    lora.add("again", rank=2, scaling=1.0, state_dict=adapter(2, 5))  # and it grows back on the next load
    assert lora.device_bytes == slots_with(2).device_bytes


def test_pinned_host_copies_pack_into_few_blocks(monkeypatch):
    """On CUDA the host copies are pinned in blocks (one allocation of pinned memory costs milliseconds): every
    tensor keeps its values, dtype and shape, and the 448 tensors of an 8B-shaped adapter take a handful of
    blocks. Pinning itself needs CUDA; here torch.empty's pin flag is dropped and pin_memory copies."""
    from server.engine import lora_slots

    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())
    widths = {"q_proj": (4096, 4096), "gate_proj": (4096, 14336), "down_proj": (14336, 4096)}
    weights = {
        (layer, name): (torch.randn(16, width_in).bfloat16(), torch.randn(16, width_out).float())
        for layer in range(32)
        for name, (width_in, width_out) in widths.items()
    }
    weights[(32, "odd")] = (torch.ones(3, 5, dtype=torch.bfloat16), torch.arange(7, dtype=torch.float64))  # 30 bytes
    weights[(33, "odd")] = (torch.ones(3, dtype=torch.int8), torch.full((2, 3), 2.5))  # misaligned without padding
    packed = lora_slots.pinned(weights)
    for name, ab in weights.items():
        for original, copy in zip(ab, packed[name]):
            assert copy.dtype == original.dtype and torch.equal(copy, original)
            assert copy.data_ptr() % lora_slots.PIN_ALIGN == 0  # every view starts aligned for any dtype
    blocks = {t.untyped_storage().data_ptr() for ab in packed.values() for t in ab}
    total = sum(t.numel() * t.element_size() for ab in weights.values() for t in ab)
    assert len(blocks) <= total // lora_slots.PIN_BLOCK_BYTES + 2
    held = lora_slots._held_bytes(packed)  # what host_bytes reports: the blocks whole, their slack too
    assert held == len(blocks) * lora_slots.PIN_BLOCK_BYTES > total  # every block is a full one here
    huge = {(0, "q_proj"): (torch.zeros(lora_slots.PIN_BLOCK_BYTES // 2 + 1, dtype=torch.int16), torch.ones(2))}
    alone = lora_slots.pinned(huge)[(0, "q_proj")][0]
    assert torch.equal(alone, huge[(0, "q_proj")][0])  # over a block: pinned on its own
