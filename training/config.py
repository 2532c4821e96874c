"""Training settings: one dataclass that validates itself, built by the CLI (defaults = Unsloth's notebook)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from contract.names import ADAPTER_NAME, ADAPTER_NAME_RULE

SEVEN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALPACA_COLUMNS = ("instruction", "input", "output")
BACKENDS = ("auto", "unsloth", "transformers")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the flag."""


@dataclass
class TrainConfig:
    base_model: str
    data: str
    output: Path
    template: str = "alpaca"
    name: str | None = None
    max_seq_length: int = 2048
    load_in_4bit: bool = False
    r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = SEVEN_PROJECTIONS
    batch_size: int = 2
    grad_accum: int = 4
    warmup_steps: int = 5
    max_steps: int | None = 60
    epochs: float | None = None
    lr: float = 2e-4
    optim: str = "adamw_8bit"
    weight_decay: float = 0.01
    scheduler: str = "cosine"
    seed: int = 3407
    packing: bool = False
    train_on_responses_only: bool = False
    eval_split: float = 0.0
    columns: dict[str, str] = field(default_factory=dict)
    backend: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.output = Path(self.output).absolute()
        self.name = self.name or self.output.name
        if self.epochs is not None:
            self.max_steps = None
        self._validate()

    def _validate(self) -> None:
        checks = [
            (self.max_seq_length >= 16, "--max-seq-length must be at least 16"),
            (1 <= self.r <= 1024, "--r must be between 1 and 1024"),
            (self.lora_alpha >= 1, "--lora-alpha must be at least 1"),
            (0.0 <= self.lora_dropout < 1.0, "--lora-dropout must be in [0, 1)"),
            (len(self.target_modules) > 0, "--target-modules must name at least one module"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "--batch-size and --grad-accum must be at least 1"),
            (self.warmup_steps >= 0, "--warmup-steps must be 0 or more"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.epochs is None or (self.epochs > 0 and math.isfinite(self.epochs)), "--epochs must be a positive number"),
            (self.max_steps is not None or self.epochs is not None, "give --max-steps or --epochs"),
            (0 < self.lr < 1, "--lr must be in (0, 1)"),
            (math.isfinite(self.weight_decay) and 0 <= self.weight_decay < 1, "--weight-decay must be in [0, 1)"),
            (0 <= self.seed < 2**32, "--seed must be in [0, 2**32)"),
            (0.0 <= self.eval_split < 0.5, "--eval-split must be a fraction in [0, 0.5)"),
            (self.backend in BACKENDS, f"--backend must be one of {BACKENDS}"),
            (bool(ADAPTER_NAME.match(self.name or "")), f"--name (default: the output dir's name) must be {ADAPTER_NAME_RULE}"),
            (set(self.columns) <= set(ALPACA_COLUMNS), f"column mapping keys must be among {ALPACA_COLUMNS}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def training_args_record(self) -> dict:
        """The settings as recorded in the manifest (paths as given, no secrets)."""
        record = asdict(self)
        record["output"] = str(self.output)
        record["target_modules"] = list(self.target_modules)
        return record
