"""loraserve: train LoRA adapters on Alpaca-style data and serve many of them on one base model."""

__version__ = "0.1.0"
