"""Sampling parameters and the per-row choice of the next token.

Rows in a batch may carry different parameters, so choosing is per row (plain greedy rows together);
the forward pass is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A private RNG per request: the same seed gives the same text whatever else is running."""
    if not params.do_sample:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(params.seed if params.seed is not None else torch.seed())
    return gen


def choose_token(
    logits: torch.Tensor,  # [V] float32, one row
    params: SamplingParams,
    seen_ids: torch.Tensor | None,  # [N] prompt + generated ids; None when no repetition penalty applies
    generator: torch.Generator | None,
) -> tuple[int, float]:
    """The next token id and its log-probability under the distribution it was drawn from."""
    logits = _penalize_repeats(logits, seen_ids, params.repetition_penalty)
    if not params.do_sample:
        token = int(torch.argmax(logits))
        return token, float(torch.log_softmax(logits, dim=-1)[token])
    logits = _warp(logits / max(params.temperature, 1e-5), params)
    probs = torch.softmax(logits, dim=-1)
    token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
    return token, float(torch.log(probs[token].clamp_min(1e-30)))


def _penalize_repeats(logits: torch.Tensor, seen_ids: torch.Tensor | None, penalty: float) -> torch.Tensor:
    if penalty == 1.0 or seen_ids is None or seen_ids.numel() == 0:
        return logits
    logits = logits.clone()
    seen = logits[seen_ids]
    logits[seen_ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def _warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the token crossing top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def choose_tokens(logits: torch.Tensor, seqs: list) -> list[tuple[int, float] | None]:
    """The next (token, logprob) of each row of logits [R, V] for seqs[i] (with `params`,
    `generator`, `prompt_ids`, `generated`), or None for a row whose logits are not finite (NaN or
    +inf: nothing can be drawn from it). Plain greedy rows are chosen together with one transfer from
    the device; rows that sample or penalize repeats go through `choose_token` one by one."""
    chosen: list[tuple[int, float] | None] = [None] * len(seqs)
    is_plain = [not seq.params.do_sample and seq.params.repetition_penalty == 1.0 for seq in seqs]
    plain = [i for i, flag in enumerate(is_plain) if flag]
    if plain:
        rows = logits if len(plain) == len(seqs) else logits[torch.tensor(plain, device=logits.device)]  # [P, V]
        tokens = rows.argmax(dim=-1)  # [P]
        logprobs = torch.log_softmax(rows, dim=-1).gather(-1, tokens[:, None])[:, 0]  # [P]
        for i, token, logprob in zip(plain, tokens.tolist(), logprobs.tolist()):
            # A NaN or +inf anywhere in the row makes its log-softmax NaN: the check costs nothing more.
            chosen[i] = (token, logprob) if math.isfinite(logprob) else None
    others = [i for i, flag in enumerate(is_plain) if not flag]
    finite = torch.isfinite(logits[others]).all(dim=-1).tolist() if others else []  # one transfer for all
    for i, ok in zip(others, finite):
        if not ok:  # nothing can be drawn from NaN or +inf
            continue
        seq = seqs[i]
        # The repetition penalty needs every id seen so far; skip building that per token otherwise.
        penalized = seq.params.repetition_penalty != 1.0
        seen = torch.tensor(seq.prompt_ids + seq.generated, device=logits.device) if penalized else None
        chosen[i] = choose_token(logits[i], seq.params, seen, seq.generator)
    return chosen
