"""LoRA weights for a batch that mixes adapters row by row, in a fixed number of device slots.

Every loaded adapter keeps a host copy (the "CPU tier"); at most `slots` of them are resident on the
device at once. Projections that read the same input form a group (q/k/v, gate/up: the decoder's
fused projections); each group g of each layer holds all slots of all its projections side by side:

    A[g]: [P * slots * R, in]          projection i, slot s owns rows (i * slots + s) * R ... + rank_s
    B[g]: [P * slots * R, sum(out)]    block diagonal: projection i's rows feed only its output columns,
                                       pre-multiplied by the adapter's scaling

so a batch whose row t runs adapter slot[t] gets the LoRA terms of a whole group from two matmuls and
a mask,

    delta = where(mask, x @ A[g]^T, 0) @ B[g]      mask[t, c] = ((c mod slots*R) // R == slot[t])

Where the group's base weight is fused (projections.py), A[g] rides in it: the base GEMM's output
already holds x @ A[g]^T after the base columns, and the shrink costs no launch of its own. `room`
gives each group's projection (an object with `ride(rows)` and `compact(rows)`, or None).

Whatever the mix of adapters, the number of kernel launches grows neither with the number of
distinct adapters in the batch nor with the projections of a group. On CUDA a step of a few rows
(EXPAND_KERNEL_ROWS) expands with lora_kernel.py instead, which reads only the rows' own slots of B.

R grows to the largest rank attached (buffers re-laid out once), and shrinks back when the widest
is unloaded: an unloaded adapter keeps no device memory. Zeroed columns and blocks contribute exact
zeros, so a row's result does not depend on its neighbours; `where` rather than a multiply, so that
even an overflow in another adapter's columns (inf * 0 = NaN) stays out of a row. Non-finite weights
are refused at load.

A resident adapter that no running sequence uses may be evicted (least recently used first) when
another needs its slot; its host copy stays, so it comes back with one copy. This module knows
nothing of requests: callers pin a slot with `acquire` and unpin it with `release`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Protocol

import torch
import torch.nn.functional as F

from contract.lora import PROJECTIONS, parse_lora_key
from server.engine.trust import passes

# Steps of at most this many rows expand with lora_kernel.py on CUDA (reads only the rows' own slots of B);
# larger ones with the masked GEMM over every slot, which reads all of B once however many rows share it.
EXPAND_KERNEL_ROWS = 8
# Wider slots than this expand with the masks: the kernels hold a [R, block] tile of B in registers.
KERNEL_MAX_RANK = 64
# Host copies are pinned in blocks of this size: each allocation of pinned memory costs milliseconds (an 8B
# model's adapter, pinned tensor by tensor, took 0.4-1.9 s over its 448 tensors on an H100), and blocks of one
# size freed by an unload are reused whole by the next load (PyTorch's pinned-memory cache).
PIN_BLOCK_BYTES = 8 << 20
PIN_ALIGN = 64  # bytes: a view into a block starts at a multiple of every dtype's size


@dataclass
class RowAdapters:
    """A step's adapter slot per row [T] (-1: none), and the masks when the mask path expands them."""

    slots: torch.Tensor
    masks: dict[int, torch.Tensor] | None


@dataclass
class HostAdapter:
    """One adapter in host memory: per (layer, projection), A [r, in] and scaling * B^T [r, out]."""

    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    nbytes: int = 0  # host memory it holds, once kept: its pinned blocks whole (slack included)


class LoraSlots:
    def __init__(
        self,
        shapes: dict[tuple[int, str], tuple[int, int]],
        *,
        slots: int,
        device,
        dtype,
        groups: tuple[tuple[str, tuple[str, ...]], ...] | None = None,
        room: Callable[[int, str], Room | None] | None = None,
    ) -> None:
        self.shapes = shapes  # (layer, projection) → (in_features, out_features)
        names = sorted({proj for _, proj in shapes}, key=PROJECTIONS.index)
        # group name → its projections, in output order; by default each projection alone, named after it
        self.groups = dict(groups) if groups is not None else {name: (name,) for name in names}
        self.group_of = {proj: (group, i) for group, projs in self.groups.items() for i, proj in enumerate(projs)}
        self.layers = sorted({layer for layer, _ in shapes})
        self.out_widths = {  # (layer, group) → the group's base output width
            (layer, group): sum(shapes[(layer, p)][1] for p in projs if (layer, p) in shapes)
            for layer in self.layers
            for group, projs in self.groups.items()
        }
        self.slots = slots
        self.device, self.dtype = device, dtype
        self.rank = 0  # R: the column width of one slot; 0 until an adapter is attached
        self.layout = 0  # bumped when the buffers are re-laid out (captured CUDA graphs read the old ones)
        self.A: dict[tuple[int, str], torch.Tensor] = {}
        self.B: dict[tuple[int, str], torch.Tensor] = {}
        self.host: dict[str, HostAdapter] = {}
        self.resident: OrderedDict[str, int] = OrderedDict()  # key → slot, least recently used first
        self.pins: dict[str, int] = {}
        self._room = room or (lambda layer, group: None)  # where a group's A may ride (its base projection)
        self.riding: set[tuple[int, str]] = set()  # groups whose A rides in the base GEMM's weight
        self.uploads = 0  # host → device copies so far (a reload counter for metrics and tests)
        self.group_ends = {  # (layer, group) → where each of its projections' output columns end
            (layer, group): tuple(accumulate(shapes[(layer, p)][1] for p in projs if (layer, p) in shapes))
            for layer in self.layers
            for group, projs in self.groups.items()
            if any((layer, p) in shapes for p in projs)
        }
        self._expand = None  # lora_kernel once trusted (use_expand_kernel), else None: the masks

    # -- the host tier ---------------------------------------------------------------------------
    def add(self, key: str, *, rank: int, scaling: float, state_dict: dict[str, torch.Tensor]) -> None:
        """`host_copy` then `keep`, in one call."""
        self.keep(key, self.host_copy(rank=rank, scaling=scaling, state_dict=state_dict))

    def host_copy(self, *, rank: int, scaling: float, state_dict: dict[str, torch.Tensor]) -> HostAdapter:
        """The adapter as the host tier keeps it: checked, scaled, cast. Any thread may call it (it reads only
        the shapes and touches no device), so a load's seconds of host work stay off the engine's worker.
        Raises ValueError when the tensors are not LoRA A/B weights of this model's projections."""
        return HostAdapter(rank, _host_weights(state_dict, self.shapes, rank=rank, scaling=scaling, dtype=self.dtype))

    def keep(self, key: str, adapter: HostAdapter) -> None:
        """Keep `adapter` as `key` (on the worker: it pins the host copy when the slots live on a GPU, and may
        re-lay out the slots). Pinning stays here because it is a CUDA call: made from another thread while the
        worker captures a graph, it would break the capture."""
        weights = pinned(adapter.weights) if self.device.type == "cuda" else adapter.weights
        if adapter.rank > self.rank:
            self._lay_out(adapter.rank)  # all or nothing: a failure (out of memory) leaves the old layout serving
        self.host[key] = HostAdapter(rank=adapter.rank, weights=weights, nbytes=_held_bytes(weights))

    def remove(self, key: str) -> None:
        if self.pins.get(key):
            raise RuntimeError(f"adapter {key} is in use by running sequences")
        self.host.pop(key, None)
        slot = self.resident.pop(key, None)
        if slot is not None:
            self._clear(slot)
        widest = max((adapter.rank for adapter in self.host.values()), default=0)
        if widest < self.rank:
            self._lay_out(widest)

    @property
    def host_bytes(self) -> int:
        """Host memory the loaded adapters' weights hold (memory accounting: unload must give it back). Pinned
        blocks count whole; PyTorch's pinned-memory cache may round a tensor pinned alone up to a power of two, and
        keeps freed blocks for the next load (neither shows here)."""
        return sum(adapter.nbytes for adapter in list(self.host.values()))

    @property
    def device_bytes(self) -> int:
        """Memory of the slot buffers (riding A rows included): sized by the widest adapter loaded, 0 when none is."""
        return _nbytes(list(self.A.values()) + list(self.B.values()))

    # -- the device tier -------------------------------------------------------------------------
    def acquire(self, key: str) -> int | None:
        """The device slot holding `key`, uploading it (evicting an unpinned one) when needed, and
        pinned until `release`. None when every slot is pinned by running sequences."""
        slot = self.resident.get(key)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self._upload(key, slot)
        self.resident.move_to_end(key)
        self.pins[key] = self.pins.get(key, 0) + 1
        return slot

    def soonest_free(self) -> str | None:
        """The resident adapter whose slot frees first if nothing new pins it: the fewest running
        requests, the least recently used among equals (None when no adapter is resident)."""
        # `resident` runs least recently used first, and min keeps the first of equals.
        return min(self.resident, key=lambda key: self.pins.get(key, 0), default=None)

    def release(self, key: str) -> None:
        self.pins[key] -= 1
        if not self.pins[key]:
            del self.pins[key]

    def row_adapters(self, row_slots: torch.Tensor) -> RowAdapters | None:
        """[T] slot per row (-1: no adapter) → what every layer's `apply` needs for these rows: the slots
        for the expand kernel (a few rows, on CUDA), else for each group width P the [T, P * slots * R] bool
        masks, True on the row's own slot's columns. None when no adapter is attached. (Callers skip it
        when no row has an adapter.) Built once per step: every layer uses the same."""
        if self.rank == 0:
            return None
        if self._expand is not None and row_slots.shape[0] <= EXPAND_KERNEL_ROWS:
            return RowAdapters(row_slots, masks=None)
        own = self._column_slots[None, :] == row_slots[:, None]  # [T, slots * R]
        return RowAdapters(row_slots, {width: own.repeat(1, width) for width in {len(p) for p in self.groups.values()}})

    def use_expand_kernel(self, enabled: bool = True) -> bool:
        """Expand small steps' rows with lora_kernel.py once it matches the mask path here on every group
        shape of the current layout (checked again at each re-layout); else, or without Triton, the masks."""
        self._expand = None
        if self.rank == 0 or self.rank > KERNEL_MAX_RANK or not enabled:
            return False

        def check() -> bool:
            from server.engine import lora_kernel

            shapes = {(self.slots, self.rank, ends) for ends in self.group_ends.values()}
            return all(
                lora_kernel.matches_the_mask_path(self.device, self.dtype, slots=slots, rank=rank, ends=ends)
                for slots, rank, ends in shapes
            )

        if not passes(check, kernel="LoRA expand", instead="expanding with masks"):
            return False
        from server.engine import lora_kernel

        self._expand = lora_kernel
        return True

    def apply(
        self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor, rows: RowAdapters | None
    ) -> torch.Tensor:
        """The base output plus the LoRA terms of `group`'s projections for every row of x [T, in]. `out` is
        the group's GEMM output [T, sum(out) + riding rows]: the base columns, then x @ A^T where A rides."""
        base, terms = self.operands(layer, group, x, out, rows)
        if terms is None:
            return base
        shrunk, b, row_slots, _, _ = terms
        if rows.masks is None:
            ends = self.group_ends[(layer, group)]
            return self._expand.expand_(base, shrunk, b, row_slots, slots=self.slots, rank=self.rank, ends=ends)
        # In place: the base columns are a row-strided view of the GEMM's output, which the GEMM writes through
        # its leading dimension; addmm would first copy them out, a copy kernel per group (4 per layer: likely
        # most of the 126 copies in a 1-row 8B step's profile, bench/results/gpu-2026-12-01-hardening-cluster/).
        return base.addmm_(torch.where(rows.masks[len(self.groups[group])], shrunk, 0.0), b)

    def gated(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor, rows: RowAdapters | None):
        """silu(gate) * up of a gate/up group with its LoRA terms, in one launch of the expand kernel (a small
        step on CUDA); None where the caller applies the terms and multiplies itself."""
        found = self._kernel_operands(layer, group, x, out, rows)
        if found is None:
            return None
        base, (shrunk, b, row_slots, slots, rank) = found
        return self._expand.expand_gated(base, shrunk, b, row_slots, slots=slots, rank=rank)

    def _kernel_operands(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor, rows: RowAdapters | None):
        """operands() where the expand kernel serves this step and some row has an adapter, else None."""
        if rows is None or rows.masks is not None:
            return None
        base, terms = self.operands(layer, group, x, out, rows)
        return None if terms is None else (base, terms)

    def operands(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor, rows: RowAdapters | None):
        """(base columns of `out`, LoRA terms) for a kernel that adds them itself (qkv_kernel.py): the terms
        are (shrunk [T, P * slots * R], B, row slots [T], slots, R), or None when no row has an adapter."""
        key = (layer, group)
        width = self.out_widths[key]
        base = out[:, :width] if out.shape[1] > width else out
        if rows is None or self.rank == 0:
            return base, None
        a = self.A[key]
        shrunk = out[:, width : width + a.shape[0]] if key in self.riding else F.linear(x, a)  # [T, P * slots * R]
        return base, (shrunk, self.B[key], rows.slots, self.slots, self.rank)

    # -- slot bookkeeping --------------------------------------------------------------------------
    def _free_slot(self) -> int | None:
        used = set(self.resident.values())
        for slot in range(self.slots):
            if slot not in used:
                return slot
        for key, slot in self.resident.items():  # least recently used first
            if not self.pins.get(key):
                del self.resident[key]
                return slot
        return None

    def _upload(self, key: str, slot: int) -> None:
        adapter = self.host[key]
        self._clear(slot)
        for (layer, proj), (a, b) in adapter.weights.items():
            group, index = self.group_of[proj]
            rows, cols = self._block(layer, proj, slot)
            self.A[(layer, group)][rows.start : rows.start + adapter.rank].copy_(a, non_blocking=True)
            self.B[(layer, group)][rows.start : rows.start + adapter.rank, cols].copy_(b, non_blocking=True)
        self.resident[key] = slot
        self.uploads += 1

    def _clear(self, slot: int) -> None:
        for layer, proj in self.shapes:
            group, _ = self.group_of[proj]
            rows, cols = self._block(layer, proj, slot)
            self.A[(layer, group)][rows].zero_()
            self.B[(layer, group)][rows, cols].zero_()

    def _block(self, layer: int, proj: str, slot: int) -> tuple[slice, slice]:
        """Projection `proj`'s slot `slot`: its rows of A and of B, and its output columns of B."""
        group, index = self.group_of[proj]
        start = (index * self.slots + slot) * self.rank
        out_start = sum(self.shapes[(layer, p)][1] for p in self.groups[group][:index])
        return slice(start, start + self.rank), slice(out_start, out_start + self.shapes[(layer, proj)][1])

    def _lay_out(self, rank: int) -> None:
        """Re-lay out the device buffers for slots `rank` wide (none at 0); resident adapters are uploaded
        again. All or nothing: a failure (out of memory) leaves the old layout serving."""
        A, B, riding = {}, {}, set()
        try:
            for layer, group, in_features, out_features in self._group_sizes():
                width = len(self.groups[group]) * self.slots * rank
                room = self._room(layer, group)
                a = room.ride(width) if room is not None else None  # zero rows at rank 0
                if a is not None:
                    riding.add((layer, group))
                if rank:
                    B[(layer, group)] = self._zeros(width, out_features)
                    A[(layer, group)] = a if a is not None else self._zeros(width, in_features)
        except BaseException:
            self._take_back_rows(riding)
            raise
        shrunk = rank < self.rank
        self.rank, self.A, self.B, self.riding = rank, A, B, riding
        if shrunk:
            self._compact()
        self._column_slots = torch.arange(self.slots * rank, device=self.device) // max(rank, 1)  # [slots * R]: owner
        self.layout += 1
        if self.device.type == "cuda":
            self.use_expand_kernel()
        for key, slot in list(self.resident.items()):
            self._upload(key, slot)

    def _group_sizes(self):
        """(layer, group, in_features, out_features) of every group the shapes have."""
        for layer in self.layers:
            for group, projs in self.groups.items():
                present = [p for p in projs if (layer, p) in self.shapes]
                if present:
                    yield layer, group, self.shapes[(layer, present[0])][0], self.out_widths[(layer, group)]

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=self.device, dtype=self.dtype)

    def _take_back_rows(self, moved: set[tuple[int, str]]) -> None:
        """A failed re-layout: the groups whose base weight already grew hold their A in new storage now.
        The old layout's rows are a prefix of the new room (no allocation), so point A there and upload again."""
        for layer, group in moved & self.riding:
            self.A[(layer, group)] = self._room(layer, group).ride(self.A[(layer, group)].shape[0])
        for key, slot in list(self.resident.items()):
            self._upload(key, slot)

    def _compact(self) -> None:
        """After a shrink, give the riding groups' spare rows back (a copy of each base weight, one at a
        time). Best effort: a group whose copy fails keeps its larger storage, which costs only memory."""
        for layer, group, _, _ in self._group_sizes():
            room = self._room(layer, group)
            if room is None:
                continue
            width = self.A[(layer, group)].shape[0] if (layer, group) in self.A else 0
            try:
                tail = room.compact(width)
            except torch.OutOfMemoryError:
                continue
            if (layer, group) in self.A and tail is not None:
                self.A[(layer, group)] = tail


class Room(Protocol):
    """A projection whose GEMM can compute A's rows too (projections.GroupProjection)."""

    def ride(self, rows: int) -> torch.Tensor | None: ...

    def compact(self, rows: int) -> torch.Tensor | None: ...


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _held_bytes(weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Bytes of the distinct storages behind the tensors: a pinned block counts once, whole."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for ab in weights.values() for t in ab}
    return sum(storages.values())


def pinned(weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """The same tensors copied into pinned host memory, packed into blocks of at most PIN_BLOCK_BYTES (a
    tensor larger than a block is pinned on its own)."""
    block_bytes = min(PIN_BLOCK_BYTES, sum(_aligned(t.nbytes) for ab in weights.values() for t in ab))  # a small
    block, used = None, 0  # adapter pins what it needs

    def place(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal block, used
        size = tensor.nbytes
        if size > block_bytes:
            return tensor.pin_memory()
        if block is None or used + size > block_bytes:
            block, used = torch.empty(block_bytes, dtype=torch.uint8, pin_memory=True), 0
        view = block[used : used + size].view(tensor.dtype).view(tensor.shape)
        used += _aligned(size)
        return view.copy_(tensor)

    return {name: (place(a), place(b)) for name, (a, b) in weights.items()}


def _aligned(size: int) -> int:
    return -(-size // PIN_ALIGN) * PIN_ALIGN


def _host_weights(
    state_dict: dict[str, torch.Tensor],
    shapes: dict[tuple[int, str], tuple[int, int]],
    *,
    rank: int,
    scaling: float,
    dtype,
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        parsed = parse_lora_key(key)
        name = (parsed.layer, parsed.projection) if parsed else None
        if name not in shapes:
            raise ValueError(
                f"{key!r} is not a LoRA weight of a servable projection "
                f"({', '.join(PROJECTIONS)} of layers 0-{max(layer for layer, _ in shapes)})"
            )
        parts.setdefault(name, {})[parsed.part] = tensor
    weights = {}
    for name, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"layer {name[0]} {name[1]} has lora_{next(iter(ab))} without its pair")
        in_features, out_features = shapes[name]
        if ab["A"].shape != (rank, in_features) or ab["B"].shape != (out_features, rank):
            raise ValueError(
                f"layer {name[0]} {name[1]}: A {tuple(ab['A'].shape)} / B {tuple(ab['B'].shape)} do not fit "
                f"rank {rank} and the base shape [{out_features}, {in_features}]"
            )
        if not (torch.isfinite(ab["A"]).all() and torch.isfinite(ab["B"]).all()):
            raise ValueError(f"layer {name[0]} {name[1]}: the weights hold NaN or infinite values (a diverged run?)")
        # Scaling folded into B in float32 before the cast: one rounding, as PEFT's (x@A@B)*s gets.
        a, b = ab["A"].to("cpu", dtype), (ab["B"].float() * scaling).t().to("cpu", dtype)  # the host tier
        weights[name] = (a.contiguous(), b.contiguous())
    return weights
