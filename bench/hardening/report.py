"""A scenario's result: the figures it prints and the failures it saw (empty when all held)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.stats import percentile


@dataclass
class Report:
    scenario: str
    figures: dict[str, object] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def check(self, holds: bool, failure: str) -> None:
        if not holds:
            self.failures.append(failure)

    def lines(self) -> list[str]:
        out = [f"== {self.scenario}: {'ok' if not self.failures else f'{len(self.failures)} FAILURES'}"]
        out += [f"   {key:<44} {_show(value)}" for key, value in self.figures.items()]
        out += [f"   FAIL {failure}" for failure in self.failures[:20]]
        if len(self.failures) > 20:
            out.append(f"   ... and {len(self.failures) - 20} more")
        return out


def ms(values: list[float], q: float) -> float | None:
    """The q-th percentile of `values` (seconds) in milliseconds, or None when there are none."""
    return round(percentile(values, q) * 1000, 1) if values else None


def mib(n: float) -> float:
    return round(n / 2**20, 2)


def _show(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
