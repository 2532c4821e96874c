"""Steps with prompt chunks, replayed piecewise: CUDA graphs between the layers' attentions.

A decode-only step is captured whole (cuda_graphs.py). A step carrying prompt chunks cannot be: its
attention depends on how many chunks it has, where each starts and how long it is. Everything else in
the pass (embedding, projections and their LoRA terms, norms, RoPE, cache writes, the MLP) depends only
on how many tokens it has. So per token bucket that part is captured as layers + 1 graphs, and each
layer's attention runs eagerly between them on the graphs' static buffers:

    [embed, norm, q/k/v of layer 0] attend 0 [o_proj, MLP of 0, q/k/v of 1] attend 1 ... [o_proj, MLP of L-1]

then the final norm and the head run eagerly on the rows whose logits are wanted. Eagerly, a prefill
step launches about a thousand kernels, each costing the host ~20 µs: on an H200 a 512-token prefill took
35 ms against 16 ms of GPU time; replayed piecewise, 19 ms (bench/results/gpu-2026-12-02-piecewise).

Token buckets: 16, 32, 64, 128, then multiples of 64 up to `max_tokens`; bigger steps run eagerly (there
the GPU's arithmetic, not the launches, sets the pace). Tokens past a step's own are padding: they write
to the cache's scratch position, use no adapter, and no operation mixes rows, so they change nothing.
A step with a LoRA term and one without use different captures (the masked terms cost arithmetic).
Each capture's first replay is checked against the same pieces run eagerly; a mismatch or an error
turns the piecewise path off, logged, and steps run eagerly. With `capture=False` the pieces run
eagerly on the same buffers (no CUDA needed): the tests check padding and buffers that way on a CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from server.engine.cuda_graphs import GraphPool, agrees, give_up
from server.engine.decoder import Decoder, Step, StepContext, running

log = logging.getLogger("loraserve.piecewise_graphs")

MAX_TOKENS = 512


@dataclass
class _Pieces:
    inputs: Step  # the token columns below, as the pieces' step
    columns: torch.Tensor  # [5, B]: ids, positions, write slots, write positions, adapter slots
    padding: torch.Tensor  # [5, B]: what tokens past a step's own are set to
    x: torch.Tensor  # [B, H] the residual stream between pieces
    q: torch.Tensor  # [B, Hq, D] the queries each piece leaves for the attention after it
    o: torch.Tensor  # [B, Hq * D] the attention's output, read by the next piece
    layout: int  # LoraSlots.layout at capture
    context: StepContext | None = None  # the captured first piece's, which the later pieces read
    graphs: list = field(default_factory=list)
    checked: bool = False
    replays: int = 0


class PiecewiseGraphs:
    def __init__(self, decoder: Decoder, *, max_tokens: int = MAX_TOKENS, capture: bool = True) -> None:
        self.decoder = decoder
        self.max_tokens = max_tokens
        self.enabled = True
        self._pieces: dict[tuple[int, bool], _Pieces] = {}
        self._pool = GraphPool(decoder.lora) if capture else None  # None: the pieces run eagerly

    def forward(self, step: Step) -> torch.Tensor | None:
        """The step's logits [R, V], its non-attention parts replayed; None when it must run eagerly."""
        tokens = step.ids.shape[0]
        if not self.enabled or not step.chunks or tokens > self.max_tokens:
            return None
        key = (token_bucket(tokens), step.any_adapter and self.decoder.lora.rank > 0)
        try:
            if self._pool is not None:
                self._pieces = self._pool.current(self._pieces)
            entry = self._pieces.get(key)
            if entry is None:
                entry = self._pieces[key] = self._build(*key)
            with running():
                self._fill(entry, step)
                masks = self.decoder.attention_masks(step)
                logits = self._run(entry, step, masks, replay=bool(entry.graphs))
                if entry.graphs and not entry.checked:
                    agrees(logits, self._run(entry, step, masks, replay=False), what="piecewise replay")
                    entry.checked = True
            entry.replays += 1
            return logits
        except Exception:  # never fail a request for the fast path: log it and run eagerly from now on
            give_up(self, self._pieces, "piecewise CUDA graphs disabled after an error; prefilling eagerly")
            return None

    def warm_up(self, with_lora: bool) -> None:
        """Capture every bucket now (adapter terms on or off), so that no request waits for it."""
        tokens = 0
        while self.enabled and tokens < self.max_tokens:
            tokens = token_bucket(tokens + 1)
            try:
                self._pieces[(tokens, with_lora)] = self._build(tokens, with_lora)
            except Exception:
                give_up(self, self._pieces, "piecewise CUDA graphs disabled after a capture error; prefilling eagerly")

    def _build(self, tokens: int, with_lora: bool) -> _Pieces:
        entry = self._buffers(tokens, with_lora)
        if self._pool is not None:
            with running():
                self._capture(entry)
            log.info("captured piecewise graphs: %d tokens, adapters %s", tokens, "on" if with_lora else "off")
        return entry

    def _buffers(self, tokens: int, with_lora: bool) -> _Pieces:
        d, cache = self.decoder, self.decoder.cache
        device, dtype = cache.K[0].device, cache.K[0].dtype
        pad = torch.tensor([0, 0, 0, cache.scratch, -1], device=device)  # id, position, slot, scratch, no adapter
        padding = pad[:, None].expand(5, tokens).contiguous()
        columns = padding.clone()
        inputs = Step(
            ids=columns[0],
            positions=columns[1],
            write_slots=columns[2],
            write_positions=columns[3],
            lora_slots=columns[4],
            decode_rows=0,
            decode_lengths=columns[0][:0],
            decode_span=0,
            chunks=[],
            logit_rows=columns[0][:0],
            any_adapter=with_lora,
        )
        hidden = d.embed.weight.shape[1]
        return _Pieces(
            inputs=inputs,
            columns=columns,
            padding=padding,
            x=torch.zeros(tokens, hidden, device=device, dtype=dtype),
            q=torch.zeros(tokens, d.heads, d.head_dim, device=device, dtype=dtype),
            o=torch.zeros(tokens, d.heads * d.head_dim, device=device, dtype=dtype),
            layout=d.lora.layout,
        )

    def _capture(self, entry: _Pieces) -> None:
        """Two eager passes over the padding first (kernels chosen, workspaces allocated, nothing real
        written), then each piece captured in order into the shared pool."""
        pieces = range(len(self.decoder.layers) + 1)
        with self._pool.side():
            for _ in range(2):
                context = None
                for index in pieces:
                    context = self._piece(entry, index, context)
        context = None
        for index in pieces:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool.handle):
                context = self._piece(entry, index, context)
            entry.graphs.append(graph)
        entry.context = context
        entry.layout = self.decoder.lora.layout

    def _piece(self, entry: _Pieces, index: int, context: StepContext | None) -> StepContext:
        """Piece `index`: the first layer's q/k/v after the embedding (0), else layer index-1's o_proj and
        MLP, then (but after the last layer) layer index's q/k/v. Returns the pass's StepContext."""
        d = self.decoder
        if index == 0:
            x, h, context = d.begin(entry.inputs, entry.inputs.ids)
        else:
            x, h = d.finish_layer(index - 1, entry.o, entry.x, context)
        entry.x.copy_(x)
        if h is not None:
            entry.q.copy_(d.qkv(index, h, entry.inputs, context))
        return context

    def _fill(self, entry: _Pieces, step: Step) -> None:
        """The step's token columns into the static ones, padding past them; decode rows' ids from the device."""
        tokens, n = step.ids.shape[0], step.decode_rows
        columns = (step.ids, step.positions, step.write_slots, step.write_positions, step.lora_slots)
        entry.columns[:, :tokens].copy_(torch.stack(columns))
        entry.columns[:, tokens:].copy_(entry.padding[:, tokens:])
        if n:
            entry.columns[0, :n].copy_(self.decoder.cache.last_token[:n])

    def _run(self, entry: _Pieces, step: Step, masks, *, replay: bool) -> torch.Tensor:
        """The pass: pieces (replayed, or run eagerly) with each layer's attention between them."""
        d, tokens = self.decoder, step.ids.shape[0]
        context = entry.context
        for index in range(len(d.layers) + 1):
            if index:
                entry.o[:tokens].copy_(d.attend(index - 1, entry.q[:tokens], step, masks))
            if replay:
                entry.graphs[index].replay()
            else:
                context = self._piece(entry, index, context)
        return d.logits(entry.x, step.logit_rows)


def token_bucket(tokens: int) -> int:
    """16, 32, 64, 128, then the next multiple of 64: padding stays under half a step, and under 64 tokens
    where the steps are big enough for arithmetic to count."""
    if tokens <= 128:
        bucket = 16
        while bucket < tokens:
            bucket *= 2
        return bucket
    return -(-tokens // 64) * 64
