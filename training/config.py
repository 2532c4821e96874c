"""Training settings: one dataclass that validates itself (defaults = Unsloth's notebook).

Each field carries its help text and, where the shell spells it otherwise, how its flag reads: the
`train` command builds its flags from these fields, so a default or a help text is written here only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from contract.backend import BACKENDS, BACKENDS_HELP
from contract.lora import PROJECTIONS
from contract.names import ADAPTER_NAME, ADAPTER_NAME_RULE

ALPACA_COLUMNS = ("instruction", "input", "output")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the flag."""


@dataclass(frozen=True)
class Flag:
    """A setting as a `train` flag. `decls` names it when the flag is not --field-name (or takes no
    value); `metavar` names its value where the type's name would not say it. Where the shell's form
    differs from the setting's (a comma-separated list, repeated FIELD=COLUMN pairs), `type` is the
    flag's, with its `default`, and `parse` turns its value into the setting."""

    help: str
    decls: tuple[str, ...] = ()
    metavar: str | None = None
    type: Any = None
    default: Any = None
    parse: Callable[[Any], Any] | None = None


def _setting(value: Any = MISSING, *, help: str, factory: Any = MISSING, **flag: Any) -> Any:
    """A field with default `value` (or `factory`), and its flag."""
    return field(default=value, default_factory=factory, metadata={"flag": Flag(help, **flag)})


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _column_mapping(pairs: list[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        name, sep, column = pair.partition("=")
        if not sep or not name or not column:
            raise ConfigError(f"--column expects FIELD=COLUMN (e.g. output=answer), got {pair!r}")
        mapping[name.strip()] = column.strip()
    return mapping


@dataclass
class TrainConfig:
    base_model: str = _setting(help="Base model: a local dir or a hub id.")
    data: str = _setting(help="Alpaca data: a hub dataset name or a local .json/.jsonl/.csv/.parquet file.")
    output: Path = _setting(help="Adapter dir to create (appears only when training succeeded).")
    template: str = _setting("alpaca", help="Prompt template: alpaca, alpaca-zh, or a template file.")
    name: str | None = _setting(None, help="Adapter name (default: the output dir's name).")
    max_seq_length: int = _setting(
        2048,
        help="Longest training text in tokens: longer rows are dropped, not cut. At most the base model's positions.",
    )
    load_in_4bit: bool = _setting(
        False,
        help="Load the base in 4-bit (Unsloth on CUDA, with bitsandbytes; elsewhere in full precision, with a note).",
        decls=("--load-in-4bit",),
    )
    r: int = _setting(16, help="LoRA rank.", decls=("--r",))
    lora_alpha: int = _setting(16, help="LoRA alpha: the update is scaled by lora_alpha / r.")
    lora_dropout: float = _setting(0.0, help="Dropout on the LoRA layers' input, in [0, 1).")
    target_modules: tuple[str, ...] = _setting(
        PROJECTIONS,
        help="Comma-separated module names.",
        metavar="NAMES",
        type=str,
        default=", ".join(PROJECTIONS),
        parse=_names,
    )
    batch_size: int = _setting(2, help="Rows per batch.")
    grad_accum: int = _setting(4, help="Batches per optimizer step (gradient accumulation).")
    warmup_steps: int = _setting(5, help="Steps of learning-rate warm-up.")
    max_steps: int | None = _setting(60, help="Optimizer steps (ignored when --epochs is given).")
    epochs: float | None = _setting(None, help="Train for this many epochs instead of --max-steps.")
    lr: float = _setting(2e-4, help="Peak learning rate.")
    optim: str = _setting(
        "adamw_8bit",
        help="Optimizer, by its transformers name. Without CUDA and bitsandbytes, adamw_8bit becomes adamw_torch.",
    )
    weight_decay: float = _setting(0.01, help="Weight decay, in [0, 1).")
    scheduler: str = _setting(
        "cosine", help="Learning-rate schedule, by its transformers name (cosine, linear, constant, ...)."
    )
    seed: int = _setting(3407, help="Random seed (LoRA init, data order, the eval split).")
    packing: bool = _setting(False, help="Pack rows together into sequences of --max-seq-length tokens (TRL).")
    train_on_responses_only: bool = _setting(False, help="Compute loss on the response only.")
    eval_split: float = _setting(0.0, help="Fraction of rows held out for evaluation.")
    columns: dict[str, str] = _setting(
        factory=dict,
        help="Map a field to your column: FIELD=COLUMN, e.g. output=answer. Repeatable.",
        decls=("--column",),
        metavar="FIELD=COLUMN",
        type=list[str],
        default=[],
        parse=_column_mapping,
    )
    backend: str = _setting("auto", help=BACKENDS_HELP)
    overwrite: bool = _setting(
        False, help="Replace an existing --output (swapped out once the new adapter is complete)."
    )

    @classmethod
    def from_flags(cls, **flags: Any) -> TrainConfig:
        """The config from the `train` command's flag values, one per field. Raises ConfigError."""

        def value(setting):
            parse = setting.metadata["flag"].parse
            return parse(flags[setting.name]) if parse else flags[setting.name]

        return cls(**{setting.name: value(setting) for setting in fields(cls)})

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
            (
                self.epochs is None or (self.epochs > 0 and math.isfinite(self.epochs)),
                "--epochs must be a positive number",
            ),
            (self.max_steps is not None or self.epochs is not None, "give --max-steps or --epochs"),
            (0 < self.lr < 1, "--lr must be in (0, 1)"),
            (math.isfinite(self.weight_decay) and 0 <= self.weight_decay < 1, "--weight-decay must be in [0, 1)"),
            (0 <= self.seed < 2**32, "--seed must be in [0, 2**32)"),
            (0.0 <= self.eval_split < 0.5, "--eval-split must be a fraction in [0, 0.5)"),
            (self.backend in BACKENDS, f"--backend must be one of {BACKENDS}"),
            (
                bool(ADAPTER_NAME.match(self.name or "")),
                f"--name (default: the output dir's name) must be {ADAPTER_NAME_RULE}",
            ),
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
