"""What the next forward pass computes: which sequences decode, which prompt chunks prefill.

Pure bookkeeping over the running sequences (anything with `prompt_ids`, `generated`, `in_flight`,
`params.max_new_tokens`, `slot`, `lora_slot` and `cached`); the tensors it builds are the decoder's `Step`.

The step may be planned while the one before it still runs on the device: a decode row's input id
is the token its sequence drew last, which the decoder reads from the device (`SlotKVCache.last_token`),
so the host never waits for it. A sequence decodes when it has a token (drawn, or still in flight)
and may need another: one whose in-flight token is its last by length rides along instead.

Every KV slot in use gets a decode row, because decode attention reads the slots as one view. A
sequence still prefilling rides along in its row: it writes to the cache's scratch position and its
output is ignored. Prompt chunks are cut at fixed multiples of the chunk size, so how a prompt is
split never depends on what else is running, and at most `chunk_tokens` prompt tokens (or one
chunk) enter a step, so a long prompt delays running streams by a bounded amount per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from server.engine.decoder import Chunk, Step
from server.engine.transfer import to_device


@dataclass
class StepPlan:
    step: Step
    decoding: list  # sequences advanced by one token
    prefilling: list  # sequences whose prompt chunk is in the step, in chunk order
    sampled: list  # sequences that get a token from this step, in logit-row order
    sampled_slots: torch.Tensor  # [R] their KV slots: where the drawn tokens are kept for the next step


def plan_step(slots: list, prefilling: list, *, cache, chunk_tokens: int, device) -> StepPlan | None:
    """The next step over `slots` (slots[i] owns KV slot i) and `prefilling` (oldest first)."""
    decoding = [seq for seq in slots if decodes(seq)]
    chunks = _next_chunks(prefilling, chunk_tokens)
    if not decoding and not chunks:
        return None
    rows = _decode_rows(slots, cache.scratch) if decoding else []
    tokens = rows + [t for seq, chunk in chunks for t in _chunk_tokens(seq, chunk)]
    ends = accumulate((chunk.length for _, chunk in chunks), initial=len(rows))  # token offset after each chunk
    completing = [
        (seq, end)
        for (seq, chunk), end in zip(chunks, list(ends)[1:])
        if chunk.start + chunk.length == len(seq.prompt_ids)
    ]
    sampled = decoding + [seq for seq, _ in completing]
    logit_rows = [seq.slot for seq in decoding] + [end - 1 for _, end in completing]
    lengths = [seq.cached + 1 if decodes(seq) else 1 for seq in slots] if rows else []
    # Everything in one flat host buffer, one copy: [5 columns × T | logit rows | lengths | sampled slots]
    flat = [value for column in zip(*tokens) for value in column] + logit_rows + lengths + [seq.slot for seq in sampled]
    on_device = to_device(torch.tensor(flat, dtype=torch.long), device)
    t, r = len(tokens), len(logit_rows)
    ids, positions, write_slots, write_positions, lora_slots = on_device[: 5 * t].view(5, t)
    step = Step(
        ids=ids,
        positions=positions,
        write_slots=write_slots,
        write_positions=write_positions,
        lora_slots=lora_slots,
        decode_rows=len(rows),
        chunks=[chunk for _, chunk in chunks],
        logit_rows=on_device[5 * t : 5 * t + r],
        decode_lengths=on_device[5 * t + r : 5 * t + r + len(lengths)],
        decode_span=max(lengths, default=0),
        any_adapter=any(token[4] >= 0 for token in tokens),
    )
    return StepPlan(
        step=step,
        decoding=decoding,
        prefilling=[seq for seq, _ in chunks],
        sampled=sampled,
        sampled_slots=on_device[5 * t + r + len(lengths) :],
    )


def decodes(seq) -> bool:
    """Has a token to feed (drawn or in flight) and may still need one more."""
    drawn = len(seq.generated) + seq.in_flight
    return drawn > 0 and drawn < seq.params.max_new_tokens


def _decode_rows(slots: list, scratch: int) -> list[tuple[int, int, int, int, int]]:
    """(id, position, write slot, write position, adapter slot) of every slot's decode row. The id is a
    placeholder: the decoder reads each decode row's token from the device."""
    rows = []
    for index, seq in enumerate(slots):
        if decodes(seq):
            rows.append((0, seq.cached, index, seq.cached, seq.lora_slot))
        else:  # still prefilling: rides along without touching its cache or an adapter
            rows.append((0, 0, index, scratch, -1))
    return rows


def _next_chunks(prefilling: list, chunk_tokens: int) -> list[tuple[object, Chunk]]:
    chunks, budget = [], chunk_tokens
    for seq in prefilling:
        start = seq.cached
        length = min(chunk_tokens - start % chunk_tokens, len(seq.prompt_ids) - start)
        if chunks and length > budget:
            break
        chunks.append((seq, Chunk(slot=seq.slot, start=start, length=length)))
        budget -= length
    return chunks


def _chunk_tokens(seq, chunk: Chunk) -> list[tuple[int, int, int, int, int]]:
    return [
        (seq.prompt_ids[p], p, chunk.slot, p, seq.lora_slot) for p in range(chunk.start, chunk.start + chunk.length)
    ]
