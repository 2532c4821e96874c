"""Injected faults for the hardening runs: an out-of-memory error at one seam, never a real one.

Off unless the operator sets `LORASERVE_FAULT_INJECTION` (a setting, read once at start-up); no request
field reaches it. Each fault fires once:

    decode_oom_rows: N     the first forward pass of decode rows alone, N or more of them, raises
    adapter_load_oom: N    the N-th adapter attach since start-up (preloads count) raises

The runner consults it at the top of `forward` and `attach` (worker thread only: no lock).
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("decode_oom_rows", "adapter_load_oom")


@dataclass
class FaultPlan:
    decode_oom_rows: int | None = None
    adapter_load_oom: int | None = None
    attaches: int = 0

    @classmethod
    def from_setting(cls, setting: dict[str, int]) -> FaultPlan:
        unknown = sorted(set(setting) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown fault {unknown[0]!r} (known: {', '.join(KINDS)})")
        return cls(**setting)

    def before_forward(self, *, decode_rows: int, prompt_chunks: int) -> None:
        armed = self.decode_oom_rows
        if armed is not None and not prompt_chunks and decode_rows >= armed:
            self.decode_oom_rows = None
            raise _injected(f"a decode step of {decode_rows} rows")

    def before_attach(self) -> None:
        self.attaches += 1
        if self.attaches == self.adapter_load_oom:
            self.adapter_load_oom = None
            raise _injected(f"adapter load {self.attaches}")


def _injected(where: str):
    # The type a real CUDA OOM raises (constructible without a GPU), so every handler sees the real thing. torch is
    # imported here only: the engine process is started before the server imports it (engine_process/launch.py).
    import torch

    return torch.OutOfMemoryError(f"injected fault (LORASERVE_FAULT_INJECTION): out of memory in {where}")
