"""One request inside the engine: its prompt, parameters, generated tokens and slots."""

from __future__ import annotations

import itertools
import threading
import time

from server.engine.detokenize import Detokenizer, StopMatcher
from server.engine.events import TokenEvent
from server.engine.sampling import SamplingParams, draw_seed


class Sequence:
    """One request inside the engine. Written by the worker; `cancel` may be called from anywhere."""

    _ids = itertools.count(1)

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter_key: str | None,
        tokenizer,
        listener: tuple,
    ):
        self.id = next(self._ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.adapter_key = adapter_key
        self.listener = listener  # (loop, queue): where its events go (Engine.submit)
        self.cancelled = threading.Event()
        self.seed = draw_seed(params) if params.do_sample else None  # what its draws are a function of
        self.detok = Detokenizer(tokenizer)
        self.stops = StopMatcher(params.stop)
        self.generated: list[int] = []
        self.in_flight = 0  # tokens drawn on the device whose ids the host has not read yet
        self.tokens: list[TokenEvent] = []
        self.finish_reason: str | None = None
        self.enqueued = time.monotonic()
        self.first_token_at: float | None = None
        self.slot: int | None = None  # KV slot while running
        self.lora_slot = -1  # device adapter slot while running; -1 for the base model
        self.cached = 0  # positions of this sequence written to its KV slot

    def accept(self, token: int, logprob: float) -> tuple[TokenEvent, str | None]:
        """Append a token: its event (text released by it) and the finish reason it causes, if any."""
        self.in_flight -= 1
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.generated.append(token)
        is_eos = token in self.params.stop_token_ids
        text = "" if is_eos else self.stops.feed(self.detok.push(token))
        if is_eos:
            reason = "eos_token"
        elif self.stops.stopped:
            reason = "stop_sequence"
        elif len(self.generated) >= self.params.max_new_tokens:
            reason = "length"
        else:
            reason = None
        if reason:
            if not self.stops.stopped:  # complete characters the detokenizer held behind an incomplete one
                text += self.stops.feed(self.detok.flush())
                reason = "stop_sequence" if self.stops.stopped else reason
            text += self.stops.flush()
        event = TokenEvent(id=token, text=text, logprob=logprob, special=is_eos, last=reason is not None)
        self.tokens.append(event)
        return event, reason

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None
