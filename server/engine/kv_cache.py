"""The engine's KV cache: one preallocated slot of `max_len` positions per running sequence.

Keys and values of layer l live in K[l], V[l]: [slots, kv_heads, max_len + 1, head_dim]. Slots in
use are always 0 .. used-1 (a freed slot is refilled by moving the highest one into it), so a decode
step attends over the plain view K[l][:used, :, :length]: no gather, no copy. The extra position
`max_len` is scratch: rows that ride along in a step without a token of their own write there.

Sized once at start-up from the settings and, on a GPU, from free memory; never grows. When every
slot is taken, newcomers wait (the engine's queue) instead of failing.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("loraserve.kv_cache")


class SlotKVCache:
    def __init__(self, *, layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int, device, dtype) -> None:
        shape = (slots, kv_heads, max_len + 1, head_dim)
        self.K = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.V = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        # The token each slot's sequence drew last, written by the sampler on the device and read as
        # the next decode step's input: the host need not know it before launching that step.
        self.last_token = torch.zeros(slots, dtype=torch.long, device=device)
        self.slots, self.max_len = slots, max_len
        self.scratch = max_len  # the write position of rows without a token in this step
        self.used = 0

    @property
    def free(self) -> int:
        return self.slots - self.used

    def allocate(self) -> int | None:
        if self.used == self.slots:
            return None
        self.used += 1
        return self.used - 1

    def release(self, slot: int, *, top_length: int) -> int | None:
        """Free `slot`. When it was not the highest slot in use, the highest one's first `top_length`
        positions move into it: returns the slot that moved (its owner now lives at `slot`)."""
        top = self.used - 1
        self.used -= 1
        if slot == top:
            return None
        for cache in (*self.K, *self.V):
            cache[slot, :, :top_length].copy_(cache[top, :, :top_length])
        self.last_token[slot] = self.last_token[top]
        return top


def bytes_per_slot(*, layers: int, kv_heads: int, head_dim: int, max_len: int, dtype) -> int:
    return 2 * layers * kv_heads * (max_len + 1) * head_dim * torch.empty((), dtype=dtype).element_size()


def plan_slots(wanted: int, *, per_slot: int, device, memory_fraction: float) -> int:
    """How many slots to preallocate: `wanted`, or fewer when a GPU's free memory (times the
    fraction we may take) holds fewer. At least one, so a server always makes progress."""
    if device.type != "cuda":
        return wanted
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(free * memory_fraction) // per_slot
    if fits < wanted:
        log.warning(
            "KV cache: %d slots of %.1f MiB fit in %.0f%% of free GPU memory; asked for %d",
            fits,
            per_slot / 2**20,
            memory_fraction * 100,
            wanted,
        )
    return max(1, min(wanted, fits))
