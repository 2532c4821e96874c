"""Small statistics the benchmarks share (stdlib only: child processes in other environments import it too)."""

from __future__ import annotations


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered, pos = sorted(values), (len(values) - 1) * q / 100
    low, high = int(pos), min(int(pos) + 1, len(values) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
