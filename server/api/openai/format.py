"""Engine events → OpenAI's response bodies and stream chunks, for completions and chat completions.

One formatter per response: it holds the id, creation time and model shared by every chunk. Token
logprobs cover the generated tokens except EOS; each token's text is what it released (possibly "",
e.g. half a UTF-8 character), so the tokens add up to the returned text.
"""

from __future__ import annotations

import time
import uuid

from server.api.openai.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Delta,
    TokenLogprob,
    Usage,
)
from server.engine.events import FinalEvent, TokenEvent

FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


def usage(finals: list[FinalEvent]) -> Usage:
    """The prompt counts once however many choices were generated from it (as OpenAI counts)."""
    prompt = finals[0].prompt_tokens if finals else 0
    completion = sum(f.generated_tokens for f in finals)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _finish_reason(final: FinalEvent) -> str:
    return FINISH_REASONS.get(final.finish_reason, final.finish_reason)


def _scored(tokens: list[TokenEvent]) -> list[TokenEvent]:
    """The tokens listed in logprobs: not EOS, unless it carries text held back until then (a stop string's
    prefix that EOS proved was no stop), so the listed tokens always add up to the returned text."""
    return [t for t in tokens if not t.special or t.text]


class _Formatter:
    prefix = ""

    def __init__(self, model: str, *, logprobs: bool) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.logprobs = logprobs
        self.fingerprint: str | None = None  # the adapter version, known once the request is prepared

    def _common(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint}


class CompletionFormatter(_Formatter):
    prefix = "cmpl"

    def __init__(self, model: str, *, logprobs: bool) -> None:
        super().__init__(model, logprobs=logprobs)
        self._offsets: dict[int, int] = {}  # choice → characters streamed so far (for text_offset)

    def response(self, finals: list[FinalEvent]) -> Completion:
        choices = [
            CompletionChoice(
                index=i, text=f.generated_text, logprobs=self._logprobs(i, f.tokens), finish_reason=_finish_reason(f)
            )
            for i, f in enumerate(finals)
        ]
        return Completion(**self._common(), choices=choices, usage=usage(finals))

    def opening(self, index: int) -> Completion | None:
        return None

    def delta(self, index: int, token: TokenEvent) -> Completion | None:
        if not token.text and not (self.logprobs and not token.special):
            return None
        choice = CompletionChoice(index=index, text=token.text, logprobs=self._logprobs(index, [token]))
        return Completion(**self._common(), choices=[choice])

    def closing(self, index: int, final: FinalEvent) -> Completion:
        choice = CompletionChoice(index=index, text="", finish_reason=_finish_reason(final))
        return Completion(**self._common(), choices=[choice])

    def usage_chunk(self, finals: list[FinalEvent]) -> Completion:
        return Completion(**self._common(), choices=[], usage=usage(finals))

    def _logprobs(self, index: int, tokens: list[TokenEvent]) -> CompletionLogprobs | None:
        if not self.logprobs:
            return None
        scored, offsets = _scored(tokens), []
        for token in scored:
            offsets.append(self._offsets.get(index, 0))
            self._offsets[index] = offsets[-1] + len(token.text)
        return CompletionLogprobs(
            tokens=[t.text for t in scored], token_logprobs=[t.logprob for t in scored], text_offset=offsets
        )


class ChatFormatter(_Formatter):
    prefix = "chatcmpl"

    def response(self, finals: list[FinalEvent]) -> ChatCompletion:
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=f.generated_text),
                logprobs=self._logprobs(f.tokens),
                finish_reason=_finish_reason(f),
            )
            for i, f in enumerate(finals)
        ]
        return ChatCompletion(**self._common(), choices=choices, usage=usage(finals))

    def opening(self, index: int) -> ChatCompletionChunk:
        return self._chunk(ChatChunkChoice(index=index, delta=Delta(role="assistant", content="")))

    def delta(self, index: int, token: TokenEvent) -> ChatCompletionChunk | None:
        if not token.text and not (self.logprobs and not token.special):
            return None
        return self._chunk(
            ChatChunkChoice(index=index, delta=Delta(content=token.text), logprobs=self._logprobs([token]))
        )

    def closing(self, index: int, final: FinalEvent) -> ChatCompletionChunk:
        return self._chunk(ChatChunkChoice(index=index, delta=Delta(), finish_reason=_finish_reason(final)))

    def usage_chunk(self, finals: list[FinalEvent]) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self._common(), choices=[], usage=usage(finals))

    def _chunk(self, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self._common(), choices=[choice])

    def _logprobs(self, tokens: list[TokenEvent]) -> ChatLogprobs | None:
        if not self.logprobs:
            return None
        return ChatLogprobs(
            content=[
                TokenLogprob(token=t.text, logprob=t.logprob, bytes=list(t.text.encode())) for t in _scored(tokens)
            ]
        )
