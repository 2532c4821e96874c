"""Wire formats of the native API (TGI / LoRAX compatible).

Request models convert themselves into the service's GenerationRequest. Clients such as
huggingface_hub's InferenceClient send every TGI parameter, mostly null; those we do not implement
are accepted when null or at their neutral value and rejected with a 422 naming them otherwise,
never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from server import bounds
from server.service import GenerationRequest

StopList = Annotated[list[str], Field(max_length=64)]


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    adapter_id: str | None = Field(None, max_length=64, description="Adapter name; none = the base model.")
    adapter_source: str | None = None
    max_new_tokens: StrictInt | None = Field(
        None,
        description="Tokens to generate at most (capped by the server).",
        json_schema_extra=bounds.NEW_TOKENS.schema(),
    )
    do_sample: StrictBool = False
    temperature: float | None = Field(None, description="0 = greedy.", json_schema_extra=bounds.TEMPERATURE.schema())
    top_p: float | None = Field(None, json_schema_extra=bounds.TOP_P.schema())
    top_k: StrictInt | None = Field(None, description="0 = off.", json_schema_extra=bounds.TOP_K.schema())
    repetition_penalty: float | None = Field(None, json_schema_extra=bounds.REPETITION_PENALTY.schema())
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    stop: StopList = Field(default_factory=list)
    ignore_eos: StrictBool = Field(
        False,
        description="Extension (as vLLM's): keep generating past EOS, to exactly max_new_tokens (for benchmarks).",
    )
    details: StrictBool = False
    decoder_input_details: StrictBool = False
    return_full_text: StrictBool | None = None
    # TGI parameters we do not implement: accepted only when neutral.
    best_of: StrictInt | None = None
    typical_p: float | None = None
    truncate: StrictInt | None = None
    watermark: StrictBool | None = None
    top_n_tokens: StrictInt | None = None
    grammar: Any = None
    frequency_penalty: float | None = None
    # LoRAX parameters we do not implement: accepted only when neutral. (Its api_token is for downloading
    # adapters from a hub, which this server never does: accepted and unused.)
    response_format: Any = None
    adapter_parameters: Any = None
    merged_adapters: Any = None
    return_k_alternatives: StrictInt | None = None
    api_token: str | None = Field(None, max_length=512)

    @field_validator("adapter_source")
    @classmethod
    def _local_source(cls, value: str | None) -> str | None:
        if value not in (None, "", "local", "hub"):
            raise ValueError("adapter_source is not supported; adapters are loaded through /admin/adapters")
        return value

    def unsupported(self) -> list[str]:
        neutral = {
            "best_of": (None, 1),
            "typical_p": (None, 1.0),
            "truncate": (None,),
            "watermark": (None, False),
            "top_n_tokens": (None, 0),
            "grammar": (None,),
            "frequency_penalty": (None, 0.0),
            "return_full_text": (None, False),
            "decoder_input_details": (False,),
            "response_format": (None,),
            "adapter_parameters": (None,),
            "merged_adapters": (None,),
            "return_k_alternatives": (None, 0),
        }
        return [name for name, ok in neutral.items() if getattr(self, name) not in ok]


class GenerateRequest(BaseModel):
    # A prompt is required, raw or Alpaca: the service says so when neither is given; the spec says it too.
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "anyOf": [
                {"required": ["inputs"], "properties": {"inputs": {"type": "string"}}},
                {"required": ["instruction"], "properties": {"instruction": {"type": "string"}}},
            ]
        },
    )

    inputs: str | None = Field(None, description="Raw prompt, used as is.")
    instruction: str | None = Field(None, description="Alpaca instruction, formatted with the adapter's template.")
    input: str = Field("", description="Alpaca input (optional context).")
    adapter: str | None = Field(None, max_length=64, description="Adapter name (or parameters.adapter_id).")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: StrictBool = False

    def to_generation(self) -> GenerationRequest:
        p = self.parameters
        return GenerationRequest(
            inputs=self.inputs,
            instruction=self.instruction,
            input=self.input,
            adapter=self.adapter or p.adapter_id or None,
            max_new_tokens=p.max_new_tokens,
            do_sample=p.do_sample,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            repetition_penalty=p.repetition_penalty,
            seed=p.seed,
            stop=list(p.stop),
            ignore_eos=p.ignore_eos,
        )


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class StreamDetails(BaseModel):
    """Details on the last event of a stream."""

    finish_reason: str
    generated_tokens: int
    prompt_tokens: int
    seed: int | None
    adapter: str | None
    adapter_version: str | None


class Details(StreamDetails):
    """Details of a blocking generation: also every token."""

    prefill: list[Token] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    best_of_sequences: list | None = None
    top_tokens: list | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamResponse(BaseModel):
    index: int = 0
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None
    top_tokens: list | None = None


class ErrorBody(BaseModel):
    error: str
    error_type: str
    param: str | None = None
