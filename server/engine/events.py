"""What the engine tells a caller about its request: token events, then one final or error event."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenEvent:
    id: int
    text: str  # text released by this token; may be "" while held back (UTF-8 or stop string)
    logprob: float
    special: bool
    last: bool = False  # the FinalEvent follows at once: streams can close without waiting a step


@dataclass
class FinalEvent:
    generated_text: str
    finish_reason: str  # "eos_token" | "stop_sequence" | "length"
    generated_tokens: int
    prompt_tokens: int
    seed: int | None
    tokens: list[TokenEvent]
    first_token_seconds: float
    total_seconds: float


@dataclass
class ErrorEvent:
    message: str
