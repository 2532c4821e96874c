"""loraserve: train LoRA adapters on Alpaca-style data and serve many of them on one base model."""

from contract import __version__  # noqa: F401  (one place for the version: contract/)
