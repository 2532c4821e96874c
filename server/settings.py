"""Server settings: one pydantic-settings object, env prefix LORASERVE_, read once at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.backend import BACKENDS, BACKENDS_HELP


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASERVE_", extra="ignore")

    base_model: str = Field(description="Base model: a local dir or a hub id.")
    base_model_name: str | None = Field(None, description="Public name of the base model (default: its dir name).")
    adapter_root: Path | None = Field(None, description="Adapters load only from under this dir.")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="Adapters to preload: name → path under the root."
    )
    backend: str = Field("auto", description=BACKENDS_HELP)
    load_in_4bit: bool = Field(False, description="4-bit base (bitsandbytes); needs the unsloth backend.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights and KV cache dtype; auto: bfloat16 on a GPU that has it, else float32 "
        "(float32 on a GPU: exact comparisons, twice the memory).",
    )
    default_template: str = Field("alpaca", description="Template for adapters without a manifest and the base model.")

    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: SecretStr | None = Field(None, description="Bearer token for /admin; unset = admin API off.")
    api_keys: list[SecretStr] = Field(default_factory=list, description="Bearer keys for generation; empty = open.")

    max_new_tokens_cap: int = Field(1024, ge=1, description="Largest max_new_tokens / max_tokens a request may ask.")
    default_max_new_tokens: int = Field(
        256, ge=1, description="When a request names none (less if the context leaves less)."
    )
    max_input_chars: int = Field(100_000, ge=1, description="Longest prompt text (inputs, instruction, messages).")
    max_stop_sequences: int = Field(8, ge=0, description="Stop strings a request may give.")
    max_stop_chars: int = Field(64, ge=1, description="Longest stop string.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body (413 beyond).")
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="Time a request body may take to arrive, from its headers (408 beyond)."
    )
    max_header_bytes: int = Field(
        65536, ge=4096, description="Largest request line + headers (the connection is refused beyond)."
    )
    max_running: int = Field(32, ge=1, description="Sequences generating at once: one KV cache slot each.")
    max_context: int = Field(
        4096,
        ge=16,
        description="Tokens per KV slot (prompt + new), at most the model's limit. "
        "Every slot is preallocated at this length.",
    )
    kv_memory_fraction: float = Field(0.9, gt=0, le=1, description="Share of free GPU memory the KV cache may take.")
    prefill_chunk_tokens: int = Field(
        2048,  # an H200 at 64 streams: 7% more tok/s than 512 (bench/results/gpu-2026-12-01-fast-path-2)
        ge=16,
        description="Prompt tokens prefilled per step, beside decoding.",
    )
    adapter_slots: int = Field(8, ge=1, description="Adapters resident on the device; more stay in host memory (LRU).")
    cuda_graphs: bool = Field(
        True, description="Replay decode steps, and all but the attention of prefill steps, as CUDA graphs (GPU only)."
    )
    compile_kernels: bool = Field(
        True,
        description="Fuse norms, RoPE and SiLU into one kernel each with "
        "torch.compile (GPU only; a few seconds at start).",
    )
    max_queue: int = Field(64, ge=0, description="Requests waiting beyond max_running before 429.")
    max_adapters: int = Field(16, ge=1, description="Adapters loaded at once (device slots and host memory).")
    max_adapter_rank: int = Field(256, ge=1, description="Highest LoRA rank an adapter may have.")
    max_adapter_bytes: int = Field(2 * 1024**3, ge=1, description="Largest adapter, in bytes of weights.")
    drain_seconds: float = Field(10.0, ge=0, description="On shutdown, how long running requests may finish.")
    engine_process: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Run the engine in a process of its own, apart from the HTTP server's event loop (they would "
        "share one GIL); auto: on where an NVIDIA GPU's device file is present (checked without importing torch).",
    )
    gil_switch_seconds: float = Field(0.0005, gt=0, le=0.1, description="sys.setswitchinterval for the server process.")
    fault_injection: dict[str, int] = Field(
        default_factory=dict,
        description='Testing only: faults to inject once, e.g. {"decode_oom_rows": 3} '
        "(server/engine/faults.py). Empty = none.",
    )
    sse_ping_seconds: float = Field(15.0, gt=0, description="Keep-alive comment on quiet streams.")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in BACKENDS:
            raise ValueError(f"backend must be {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")
        return value

    @field_validator("fault_injection")
    @classmethod
    def _known_faults(cls, value: dict[str, int]) -> dict[str, int]:
        from server.engine.faults import FaultPlan  # (standard library only)

        FaultPlan.from_setting(value)  # its ValueError names the unknown fault: a setting error, before any loading
        return value

    def preload_problem(self) -> str | None:
        """Why `serve` cannot preload `adapters` (None if it can). They load several at once: over max_adapters,
        which one failed would depend on timing. (A cluster's adapters are a catalog, loaded per replica.)"""
        if len(self.adapters) > self.max_adapters:
            return (
                f"{len(self.adapters)} adapters to preload (LORASERVE_ADAPTERS, --adapter), more than max_adapters "
                f"({self.max_adapters}, LORASERVE_MAX_ADAPTERS)"
            )
        return None

    @property
    def public_base_name(self) -> str:
        return self.base_model_name or Path(self.base_model.rstrip("/")).name
