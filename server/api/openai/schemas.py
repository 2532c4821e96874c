"""Wire formats of the OpenAI-compatible API (/v1).

Requests convert themselves into the service's GenerationRequests, one per choice (`n`). OpenAI's
semantics are kept where they differ from the native API: temperature defaults to 1, which samples
(0 = greedy). Parameters we cannot honour are accepted only at their neutral value and otherwise
refused with a 400 naming them, never silently ignored; unknown fields likewise unless null.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_serializer

from server import bounds
from server.chat import ChatMessage, parse_messages
from server.errors import Invalid
from server.service import GenerationRequest

MAX_CHOICES = 8
SEED_MAX = 2**63 - 1
# Identifiers and bookkeeping that never change the output: accepted with any value, ignored.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier", "prompt_cache_key"}
NOT_AVAILABLE = {
    "top_logprobs": "top_logprobs is not available: this server returns only the chosen tokens' logprobs "
    "(logprobs: true, top_logprobs: 0 or unset)",
    "logprobs": "logprobs > 0 (top alternatives) is not available: logprobs: 0 returns the chosen tokens' logprobs",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool | None = None


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    NEUTRAL: ClassVar[dict[str, tuple]] = {
        "presence_penalty": (None, 0, 0.0),
        "frequency_penalty": (None, 0, 0.0),
        "logit_bias": (None, {}),
    }

    model: str = Field(
        min_length=1, max_length=256, description="An adapter's name, or the base model's id (GET /v1/models)."
    )
    max_tokens: StrictInt | None = Field(
        None,
        description="Tokens to generate at most (default: the server's).",
        json_schema_extra=bounds.NEW_TOKENS.schema(),
    )
    temperature: float | None = Field(
        None,
        description="Default 1, which samples (as in OpenAI's API); 0 = greedy.",
        json_schema_extra=bounds.TEMPERATURE.schema(),
    )
    top_p: float | None = Field(None, json_schema_extra=bounds.TOP_P.schema())
    n: StrictInt | None = Field(
        None, ge=1, le=MAX_CHOICES, description=f"Choices, 1 to {MAX_CHOICES}, generated concurrently."
    )
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=0, le=SEED_MAX, description="Choice i uses seed + i.")
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, description="Only 0 (not supported).")
    frequency_penalty: float | None = Field(None, description="Only 0 (not supported).")
    logit_bias: dict[str, float] | None = Field(None, description="Only empty (not supported).")
    user: str | None = Field(None, description="Accepted and ignored.")
    top_k: StrictInt | None = Field(
        None, description="Extension: as in the native API.", json_schema_extra=bounds.TOP_K.schema()
    )
    repetition_penalty: float | None = Field(
        None, description="Extension: as in the native API.", json_schema_extra=bounds.REPETITION_PENALTY.schema()
    )
    ignore_eos: StrictBool = Field(False, description="Extension (as vLLM's): generate exactly max_tokens.")

    def check(self) -> None:
        """Refuse, naming it, any parameter that would change the answer in a way this server cannot."""
        given = self.model_dump()
        for name, neutral in self.NEUTRAL.items():
            if given.get(name) not in neutral:
                raise Invalid(NOT_AVAILABLE.get(name, f"'{name}' is not supported by this server"), param=name)
        for name, value in (self.model_extra or {}).items():
            if value is not None and name not in IGNORED and name not in self.NEUTRAL:
                raise Invalid(f"unknown or unsupported parameter '{name}'", param=name)

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def field_names(self) -> dict[str, str]:
        """What this request calls the service's fields, so that errors name what the client sent."""
        return {"inputs": "prompt", "max_new_tokens": "max_tokens", "adapter_id": "model"}

    def generations(self, *, adapter: str | None, **prompt) -> list[GenerationRequest]:
        """One request per choice; the service validates every value."""
        temperature = 1.0 if self.temperature is None else self.temperature  # OpenAI's default samples
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [
            GenerationRequest(
                **prompt,
                adapter=adapter,
                max_new_tokens=self.max_new_tokens(),
                do_sample=temperature > 0,
                temperature=temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                repetition_penalty=self.repetition_penalty,
                seed=None if self.seed is None else (self.seed + i) % (SEED_MAX + 1),
                stop=stop,
                ignore_eos=self.ignore_eos,
                field_names=self.field_names(),
            )
            for i in range(self.choices)
        ]


class CompletionRequest(_OpenAIRequest):
    NEUTRAL = {
        **_OpenAIRequest.NEUTRAL,
        "logprobs": (None, 0),
        "echo": (None, False),
        "suffix": (None, ""),
        "best_of": (None, 1),
    }

    prompt: str | list[str] = Field(description="A raw prompt, used as is (a list must hold exactly one string).")
    logprobs: StrictInt | None = Field(None, ge=0, description="0 = the chosen tokens' logprobs; more: not available.")
    echo: StrictBool | None = None
    suffix: str | None = None
    best_of: StrictInt | None = None

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise Invalid(
                f"'prompt' is a list of {len(self.prompt)} strings; this server takes exactly one "
                "(send one request per prompt)",
                param="prompt",
            )
        return self.prompt[0]


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(description="system, developer, user or assistant; the last message is the user's.")
    content: str | list[dict[str, Any]] | None = Field(
        None, description='A string or a list of {"type": "text", "text"} parts.'
    )


class ChatCompletionRequest(_OpenAIRequest):
    NEUTRAL = {
        **_OpenAIRequest.NEUTRAL,
        "top_logprobs": (None, 0),
        "tools": (None, []),
        "tool_choice": (None, "none"),
        "functions": (None, []),
        "function_call": (None, "none"),
        "response_format": (None, {"type": "text"}),
        "modalities": (None, ["text"]),
        "audio": (None,),
        "prediction": (None,),
        "reasoning_effort": (None,),
        "web_search_options": (None,),
    }

    messages: list[ChatMessageIn]
    max_completion_tokens: StrictInt | None = Field(
        None,
        description="Preferred over max_tokens when both are given.",
        json_schema_extra=bounds.NEW_TOKENS.schema(),
    )
    logprobs: StrictBool | None = Field(None, description="The chosen tokens' logprobs.")
    top_logprobs: StrictInt | None = Field(None, description="Only 0: alternatives are not available.")

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def field_names(self) -> dict[str, str]:
        tokens = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        return super().field_names() | {"inputs": "messages", "max_new_tokens": tokens}

    def chat_messages(self) -> list[ChatMessage]:
        return parse_messages([m.model_dump() for m in self.messages])


# -- responses ----------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loraserve"
    parent: str | None = Field(None, description="For an adapter: the base model's id.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = Field(None, description="The adapter's version.")
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = Field(None, description="The adapter's version.")
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_nulls(self, handler) -> dict:
        """As OpenAI sends it: the role on the first chunk only, `{}` on the closing one."""
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every /v1 error: OpenAI's shape, which its clients turn into typed exceptions."""

    error: ErrorDetail
