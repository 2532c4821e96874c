"""Requests → engine work: adapter lookup, prompt formatting, validation of every bound, and the
one generation path (blocking = draining the stream)."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from contract.templates import PromptTemplate
from server import bounds, chat
from server.adapters.registry import AdapterRegistry, AdapterVersion
from server.engine.engine import Engine
from server.engine.events import ErrorEvent, FinalEvent, TokenEvent
from server.engine.sampling import SamplingParams
from server.errors import GenerationFailed, Invalid, ServeError
from server.metrics import Metrics
from server.settings import ServerSettings


@dataclass
class GenerationRequest:
    """What every wire format converts itself into."""

    inputs: str | None = None  # a raw prompt, used as is
    instruction: str | None = None  # or Alpaca fields, formatted with the adapter's template
    input: str = ""
    messages: list[chat.ChatMessage] | None = None  # or a conversation, rendered by server.chat
    adapter: str | None = None
    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks); stop strings still apply
    field_names: dict[str, str] = field(default_factory=dict)  # the wire format's names: errors say what clients sent

    def name(self, field_name: str) -> str:
        return self.field_names.get(field_name, field_name)


@dataclass
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterVersion | None  # pinned until the generation ends, then None
    adapter_name: str | None = None
    adapter_version: str | None = None

    @property
    def adapter_label(self) -> str:
        """For metrics and logs: the adapter name, or "base"."""
        return self.adapter_name or "base"


class GenerationService:
    def __init__(
        self,
        *,
        engine: Engine,
        registry: AdapterRegistry,
        settings: ServerSettings,
        metrics: Metrics,
        max_context: int,
        base_template: PromptTemplate,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.tokenizer = engine.tokenizer
        self.settings = settings
        self.metrics = metrics
        self.max_context = max_context
        self.base_template = base_template

    def prepare(self, req: GenerationRequest) -> Prepared:
        """Validate and convert; pins the adapter version until the stream from `stream` ends."""
        adapter = self._acquire(req)
        try:
            prompt, add_special_tokens = self._prompt(req, adapter)
            ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids
            params = self._sampling(req, adapter, prompt_tokens=len(ids))
        except BaseException:
            if adapter:
                self.registry.release(adapter)
            raise
        return Prepared(
            prompt_ids=ids,
            params=params,
            adapter=adapter,
            adapter_name=adapter.name if adapter else None,
            adapter_version=adapter.version if adapter else None,
        )

    def _acquire(self, req: GenerationRequest) -> AdapterVersion | None:
        if not req.adapter:
            return None
        try:
            return self.registry.acquire(req.adapter)
        except ServeError as exc:
            exc.param = req.name(exc.param) if exc.param else exc.param
            raise

    def stream(self, prep: Prepared) -> AsyncIterator[TokenEvent | FinalEvent]:
        """Admit now (Overloaded raises here), then token events and the final event; the iterator
        raises GenerationFailed on an in-engine error."""
        try:
            events = self.engine.generate(prep.prompt_ids, prep.params, prep.adapter.key if prep.adapter else None)
        except BaseException:
            self._release(prep)
            raise
        return self._observe(prep, events)

    async def _observe(self, prep: Prepared, events) -> AsyncIterator[TokenEvent | FinalEvent]:
        series = self.metrics.stream_series(prep.adapter_label)  # per token, a labels() costs more than observing
        series.prompt_tokens.inc(len(prep.prompt_ids))
        ttft, inter_token, generated = series.ttft, series.inter_token, series.generated
        last = time.monotonic()
        first = True
        try:
            async for event in events:
                if isinstance(event, ErrorEvent):
                    raise GenerationFailed(event.message)
                if isinstance(event, TokenEvent):
                    now = time.monotonic()
                    (ttft if first else inter_token).observe(now - last)
                    first, last = False, now
                    generated.inc()
                yield event
        finally:
            await events.aclose()
            self._release(prep)
            await self.registry.collect()

    async def complete(self, prep: Prepared) -> FinalEvent:
        async for event in self.stream(prep):
            if isinstance(event, FinalEvent):
                return event
        raise GenerationFailed("generation ended without a result")

    def _release(self, prep: Prepared) -> None:
        if prep.adapter is not None:
            self.registry.release(prep.adapter)
            prep.adapter = None

    # -- conversion and bounds ------------------------------------------------------------------
    def _prompt(self, req: GenerationRequest, adapter: AdapterVersion | None) -> tuple[str, bool]:
        """The prompt text, and whether the tokenizer should add its special tokens (BOS) to it."""
        if sum(x is not None for x in (req.inputs, req.instruction, req.messages)) > 1:
            raise Invalid(
                f"give either '{req.name('inputs')}' or 'instruction' (+ 'input'), not both", param=req.name("inputs")
            )
        if req.messages is not None:
            return self._chat_prompt(req.messages, adapter)
        if req.inputs is not None:
            text = req.inputs
            self._check_text(text, req.name("inputs"))
            return text, True
        if req.instruction is None:
            raise Invalid(
                f"the prompt is missing: give '{req.name('inputs')}' or 'instruction'", param=req.name("inputs")
            )
        self._check_text(req.instruction, "instruction")
        self._check_text(req.input, "input", allow_empty=True)
        template = adapter.template if adapter else self.base_template
        return template.prompt(req.instruction, req.input), True

    def _chat_prompt(self, messages: list[chat.ChatMessage], adapter: AdapterVersion | None) -> tuple[str, bool]:
        template = adapter.template if adapter else self.base_template
        if chat.uses_chat_template(template.name, self.tokenizer, is_base=adapter is None):
            text = chat.render_chat_template(self.tokenizer, messages)
            self._check_text(text, "messages")
            return text, False  # chat templates write their own BOS; adding one would double it
        instruction, input = chat.to_alpaca(messages)
        self._check_text(instruction, "messages")
        self._check_text(input, "messages", allow_empty=True)
        return template.prompt(instruction, input), True

    def _check_text(self, text: str, param: str, *, allow_empty: bool = False) -> None:
        if not allow_empty and not text.strip():
            raise Invalid(f"'{param}' is empty", param=param)
        if len(text) > self.settings.max_input_chars:
            raise Invalid(
                f"'{param}' is {len(text)} characters; the limit is {self.settings.max_input_chars}", param=param
            )
        if not _is_unicode(text):  # JSON's "\ud800" escapes decode to lone surrogates the tokenizer rejects
            raise Invalid(f"'{param}' is not valid Unicode (it contains a lone surrogate)", param=param)

    def _sampling(
        self, req: GenerationRequest, adapter: AdapterVersion | None, *, prompt_tokens: int
    ) -> SamplingParams:
        s = self.settings
        room = self.max_context - prompt_tokens
        if room < 1:
            raise Invalid(
                f"the prompt ({prompt_tokens} tokens) leaves no room for new tokens in the context of "
                f"{self.max_context} tokens",
                param=req.name("inputs"),
            )
        # Not given: the default, or as much as the context leaves (OpenAI's "up to the context").
        max_name = req.name("max_new_tokens")
        max_new = req.max_new_tokens if req.max_new_tokens is not None else min(s.default_max_new_tokens, room)
        low = bounds.NEW_TOKENS.low
        if isinstance(max_new, bool) or not isinstance(max_new, int) or not low <= max_new <= s.max_new_tokens_cap:
            raise Invalid(f"{max_name} must be an integer from {low} to {s.max_new_tokens_cap}", param=max_name)
        if prompt_tokens + max_new > self.max_context:
            raise Invalid(
                f"prompt ({prompt_tokens} tokens) + {max_name} ({max_new}) exceeds the context of "
                f"{self.max_context} tokens",
                param=max_name,
            )
        stop = self._stops(req.stop)
        bounds.TEMPERATURE.check(req.temperature, "temperature")
        bounds.TOP_P.check(req.top_p, "top_p")
        bounds.REPETITION_PENALTY.check(req.repetition_penalty, "repetition_penalty")
        if req.top_k is not None and (isinstance(req.top_k, bool) or req.top_k < bounds.TOP_K.low):
            raise Invalid(f"top_k must be {bounds.TOP_K.low} or more", param="top_k")
        temperature = 1.0 if req.temperature is None else req.temperature
        # Like TGI: any sampling parameter turns sampling on; temperature 0 means greedy (as in OpenAI's API).
        sampling = (
            req.do_sample
            or any(v is not None for v in (req.top_p, req.top_k))
            or (req.temperature is not None and req.temperature != 1.0)
        )
        do_sample = sampling and temperature > 0
        # A sampled answer gets a seed drawn here when the client sent none, and reports it (details.seed,
        # as TGI does), so that it can be generated again. Below 2**53: JavaScript clients read it exactly.
        seed = req.seed if req.seed is not None or not do_sample else secrets.randbelow(2**53)
        return SamplingParams(
            max_new_tokens=max_new,
            do_sample=do_sample,
            temperature=temperature,
            top_p=req.top_p if req.top_p is not None else 1.0,
            top_k=req.top_k or 0,
            repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None else 1.0,
            seed=seed,
            stop=tuple(stop) + _text_stops(adapter),
            stop_token_ids=() if req.ignore_eos else self._eos_ids(adapter),
        )

    def _stops(self, stop: list[str]) -> list[str]:
        s = self.settings
        if len(stop) > s.max_stop_sequences:
            raise Invalid(f"at most {s.max_stop_sequences} stop sequences", param="stop")
        for item in stop:
            if not isinstance(item, str) or not item:
                raise Invalid("stop sequences must be non-empty strings", param="stop")
            if len(item) > s.max_stop_chars:
                raise Invalid(f"a stop sequence is limited to {s.max_stop_chars} characters", param="stop")
        return stop

    def _eos_ids(self, adapter: AdapterVersion | None) -> tuple[int, ...]:
        ids = {self.tokenizer.eos_token_id}
        if adapter and adapter.eos_token:
            token_id = self.tokenizer.convert_tokens_to_ids(adapter.eos_token)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.add(token_id)
        return tuple(i for i in ids if i is not None)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text_stops(adapter: AdapterVersion | None) -> tuple[str, ...]:
    """The manifest's stop strings, minus the EOS token, which is matched by id (it never appears as text)."""
    if adapter is None:
        return ()
    return tuple(s for s in adapter.stop if s and s != adapter.eos_token)
