"""The ranges a request's numbers must fall in: the service enforces them, the wire formats' request
models publish them in the OpenAPI spec (so clients and fuzzers see the same bounds the server checks)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.errors import Invalid


@dataclass(frozen=True)
class Bound:
    low: float
    high: float | None = None
    low_open: bool = False  # top_p 0 keeps no token at all

    def check(self, value, param: str) -> None:
        """Nothing to check when not given; else a finite number in range, or Invalid naming `param`."""
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Invalid(f"{param} must be a finite number", param=param)
        high = math.inf if self.high is None else self.high
        if value < self.low or value > high or (self.low_open and value == self.low):
            raise Invalid(f"{param} must be in {self}", param=param)

    def schema(self) -> dict:
        """JSON Schema keywords for this range (they constrain numbers only: a null stays allowed)."""
        out = {"exclusiveMinimum" if self.low_open else "minimum": self.low}
        if self.high is not None:
            out["maximum"] = self.high
        return out

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low}, {self.high if self.high is not None else 'inf'}]"


TEMPERATURE = Bound(0.0, 100.0)
TOP_P = Bound(0.0, 1.0, low_open=True)
REPETITION_PENALTY = Bound(0.01, 100.0)
TOP_K = Bound(0)  # 0 = off
NEW_TOKENS = Bound(1)  # the upper bound is a setting (max_new_tokens_cap), checked by the service
