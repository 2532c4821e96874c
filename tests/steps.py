"""Driving the decoder by hand: one prompt's next-token logits through a runner (no engine running)."""

from __future__ import annotations

import torch

from server.engine.decoder import Chunk, Step


def prompt_step(ids: list[int], *, slot: int = 0, lora_slot: int = -1) -> Step:
    """A step that prefills `ids` into KV slot `slot` and asks for the logits of its last token."""
    n = len(ids)
    longs = lambda values: torch.tensor(list(values), dtype=torch.long)  # noqa: E731
    return Step(
        ids=longs(ids),
        positions=longs(range(n)),
        write_slots=longs([slot] * n),
        write_positions=longs(range(n)),
        lora_slots=longs([lora_slot] * n),
        decode_rows=0,
        decode_lengths=longs([]),
        decode_span=0,
        chunks=[Chunk(slot=slot, start=0, length=n)],
        logit_rows=longs([n - 1]),
        any_adapter=lora_slot >= 0,
    )


def prompt_logits(runner, ids: list[int], key: str | None = None) -> torch.Tensor:
    """[V] logits after `ids` under adapter `key` (None: the base model)."""
    lora_slot = runner.lora.acquire(key) if key else -1
    try:
        return runner.decoder.forward(prompt_step(ids, lora_slot=lora_slot))[0]
    finally:
        if key:
            runner.lora.release(key)
