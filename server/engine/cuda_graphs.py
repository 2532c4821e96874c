"""Decode steps replayed as CUDA graphs: the GPU fast path for the common case.

An eager step launches a couple of thousand small kernels; at small batches the GPU finishes each
before the CPU has issued the next, so a step costs the launches, not the memory traffic (DESIGN.md,
Performance method). A decode-only step has the same shape whenever it has the same number of rows
and attention span, so it is captured once per (rows bucket, span bucket, adapter terms or not) and replayed
(a step where no row has an adapter skips the LoRA terms and the riding shrink, as the eager pass does):

    rows buckets 1, 2, 4, 8, ... (capped at the KV slots); span buckets 256, 512, ... (capped at the context)

A step with fewer rows is padded with rows that write to the cache's scratch position (slots past
those in use are free); a shorter span is masked, as it is eagerly. Steps with prompt chunks are
replayed piecewise instead (piecewise_graphs.py). The adapter slots' buffers are read in place, so
uploads and evictions need no recapture; a re-layout for a larger rank does (`LoraSlots.layout`).

Each new graph's first replay is checked against the eager step on the same inputs (writing the
same keys and values twice is harmless); a mismatch or a capture error turns graphs off for good,
logged, and the engine goes on eagerly. This module knows nothing of requests or sequences.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from server.engine.decoder import Decoder, Step

log = logging.getLogger("loraserve.cuda_graphs")

_INPUTS = ("ids", "positions", "write_slots", "write_positions", "lora_slots", "decode_lengths")
SPAN_BUCKET = 256


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: Step  # static buffers, refilled before each replay
    padding: dict[str, torch.Tensor]  # the capture-time inputs: what rows past a step's own are set to
    logits: torch.Tensor  # [rows, V] written by each replay
    layout: int  # LoraSlots.layout at capture
    checked: bool = False  # its first replay for a real step matched the eager step
    replays: int = 0


class DecodeGraphs:
    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.enabled = True
        self.max_rows = decoder.cache.slots
        self.max_span = decoder.cache.max_len
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = GraphPool(decoder.lora)

    def forward(self, step: Step) -> torch.Tensor | None:
        """The step's logits [R, V] by graph replay; None when this step must run eagerly."""
        if not self.enabled or step.chunks or not step.decode_rows:
            return None
        span = min(_round_up(step.decode_span, SPAN_BUCKET), self.max_span)
        key = (_bucket(step.decode_rows, self.max_rows), span, step.any_adapter and self.decoder.lora.rank > 0)
        try:
            self._graphs = self._pool.current(self._graphs)
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._graphs[key] = self._capture(*key)
            logits = self._replay(entry, step)
            if not entry.checked:
                self._check(entry, step, logits)
            return logits
        except Exception:  # never fail a request for the fast path: log it and run eagerly from now on
            give_up(self, self._graphs, "CUDA graphs disabled after an error; decoding eagerly")
            return None

    def warm_up(self) -> None:
        """Capture every rows bucket at the first span bucket (a short context: the common case), with the
        adapters' terms and, when adapters are attached, without them too (steps where no row has one)."""
        rows, span = 1, min(SPAN_BUCKET, self.max_span)
        variants = (True, False) if self.decoder.lora.rank > 0 else (False,)
        while self.enabled:
            try:
                for with_lora in variants:
                    self._graphs[(rows, span, with_lora)] = self._capture(rows, span, with_lora)
            except Exception:
                give_up(self, self._graphs, "CUDA graphs disabled after a capture error; decoding eagerly")
            if rows >= self.max_rows:
                return
            rows = _bucket(rows + 1, self.max_rows)

    def _capture(self, rows: int, span: int, with_lora: bool) -> _Graph:
        cache = self.decoder.cache
        device = cache.K[0].device
        inputs = Step(
            ids=torch.zeros(rows, dtype=torch.long, device=device),
            positions=torch.zeros(rows, dtype=torch.long, device=device),
            write_slots=torch.arange(rows, device=device),
            write_positions=torch.full(
                (rows,), cache.scratch, dtype=torch.long, device=device
            ),  # capture writes nothing real
            lora_slots=torch.full((rows,), -1, dtype=torch.long, device=device),
            decode_rows=rows,
            decode_lengths=torch.ones(rows, dtype=torch.long, device=device),
            decode_span=span,
            chunks=[],
            logit_rows=torch.arange(rows, device=device),
            any_adapter=with_lora,
        )
        padding = {name: getattr(inputs, name).clone() for name in _INPUTS}  # free slots, scratch writes only
        with self._pool.side():
            for _ in range(2):  # warm-up outside the graph: kernels chosen, workspaces allocated
                self.decoder.forward(inputs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool.handle):
            logits = self.decoder.forward(inputs)
        log.info("captured a decode graph: %d rows, span %d, adapters %s", rows, span, "on" if with_lora else "off")
        return _Graph(graph=graph, inputs=inputs, padding=padding, logits=logits, layout=self.decoder.lora.layout)

    def _replay(self, entry: _Graph, step: Step) -> torch.Tensor:
        n, rows = step.decode_rows, entry.inputs.ids.shape[0]
        for name in _INPUTS:
            buffer = getattr(entry.inputs, name)
            buffer[:n].copy_(getattr(step, name))
            if n < rows:
                buffer[n:].copy_(entry.padding[name][n:])
        entry.graph.replay()
        entry.replays += 1
        # Rows riding along (no token wanted) are computed anyway; keep the wanted ones.
        return entry.logits[:n] if step.logit_rows.numel() == n else entry.logits[step.logit_rows]

    def _check(self, entry: _Graph, step: Step, logits: torch.Tensor) -> None:
        """The replay against the eager pass over the same padded rows (the same matmul shapes: with
        fewer rows, bf16 GEMMs may round differently, and 32 layers turn that into noise in the logits)."""
        full = self.decoder.forward(entry.inputs)  # [rows, V]: the static inputs still hold this step's values
        n = step.decode_rows
        agrees(logits, full[:n] if step.logit_rows.numel() == n else full[step.logit_rows], what="graph replay")
        entry.checked = True


class GraphPool:
    """What every capture of one kind shares: a memory pool, valid while the adapter layout it was captured
    under lasts, and one side stream for the warm-up passes before each capture."""

    def __init__(self, lora) -> None:
        self.lora = lora
        self.handle = torch.cuda.graph_pool_handle()
        # One side stream for the engine's lifetime: cuBLAS keeps a workspace (32 MiB on Hopper) for each
        # stream it has run on and never frees it, so a new stream per capture leaked that much at every
        # re-layout (measured: +846 MiB over the GPU churn run).
        self._side = torch.cuda.Stream()
        self._layout = lora.layout  # the layout every capture in the pool was made under

    def current(self, captures: dict) -> dict:
        """`captures` less those made under an older adapter layout (they read freed buffers and are never
        replayed): their buffers go back to the allocator now, not when (if ever) their key is used again."""
        layout = self.lora.layout
        if layout == self._layout:  # one comparison per step; the sweep only after a re-layout
            return captures
        self._layout = layout
        # A fresh pool for the new layout's captures: once the last graph of a pool is gone PyTorch frees the
        # pool, and capturing into its old handle fails an allocator assertion (seen on the GPU churn).
        self.handle = torch.cuda.graph_pool_handle()
        return {key: entry for key, entry in captures.items() if entry.layout == layout}

    @contextmanager
    def side(self):
        """Run the block on the side stream, ordered after and before the current stream's work."""
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            yield
        torch.cuda.current_stream().wait_stream(self._side)


def give_up(owner, captures: dict, message: str) -> None:
    """A fast path's error (called in its `except`): logged with the traceback, the path off for good (the
    engine goes on eagerly: the fast path never fails a request), its captures and their memory let go."""
    log.exception(message)
    owner.enabled = False
    captures.clear()


def agrees(replayed: torch.Tensor, eager: torch.Tensor, *, what: str) -> None:
    """Raise unless a replay's logits match the eager pass's over the same padded inputs (the same matmul
    shapes: with other shapes bf16 GEMMs may round differently, and 32 layers turn that into noise)."""
    if not torch.equal(replayed.argmax(-1), eager.argmax(-1)) or not torch.allclose(
        replayed, eager, rtol=1e-2, atol=1e-2
    ):
        raise RuntimeError(f"{what} differs from the eager step (max diff {(replayed - eager).abs().max():.3g})")


def _bucket(rows: int, cap: int) -> int:
    bucket = 1
    while bucket < rows:
        bucket *= 2
    return min(bucket, cap)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
