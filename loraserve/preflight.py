"""Checks `serve` and `train` run before anything slow: a wrong path is one line, not a hub traceback.

Given a path that does not exist, transformers takes it for a hub id and fails deep inside
huggingface_hub with "Repo id must be in the form ...". These checks say what is wrong with the
value as given. A value shaped like a hub id (`gpt2`, `org/name`) that is not a local dir is left
to transformers: it may be a real hub id.
"""

from __future__ import annotations

import re
from pathlib import Path

# huggingface_hub's repo id rule: name or namespace/name, from [\w.-], not starting or ending with - or .
_HUB_ID = re.compile(r"^(?![-.])[\w.-]{1,96}(?<![-.])(/(?![-.])[\w.-]{1,96}(?<![-.]))?$")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
PULL_HINT = "`loraserve models pull smollm2` makes a small local one"


def base_model_problem(base_model: str, *, flag: str = "--base-model") -> str | None:
    """What is wrong with a base model given as a local dir or hub id, or None when it may load."""
    if not base_model or not base_model.strip():
        return f"{flag} is empty: give a local model dir or a hub id ({PULL_HINT})"
    path = Path(base_model).expanduser()
    if path.is_dir():
        return _model_dir_problem(path, flag)
    if path.exists():
        return f"{flag} {base_model}: a file, not a model dir (a dir with config.json and weights)"
    if _HUB_ID.match(base_model) and not base_model.startswith(("~", "./")):
        return None
    return f"{flag} {base_model}: no such directory (give a local model dir or a hub id such as org/name; {PULL_HINT})"


def _model_dir_problem(path: Path, flag: str) -> str | None:
    if not (path / "config.json").is_file():
        return f"{flag} {path}: not a model dir (it has no config.json)"
    if not any((path / name).is_file() for name in WEIGHT_FILES) and not any(path.glob("*.safetensors")):
        return f"{flag} {path}: has config.json but no weights (model.safetensors or pytorch_model.bin)"
    return None


def adapter_root_problem(root: Path | None, adapters: dict[str, str]) -> str | None:
    """A missing root would serve 0 adapters silently; a preload outside it would fail after the model load."""
    if root is None:
        if adapters:
            return "--adapter needs --adapter-root (preloaded adapters are dirs under it)"
        return None
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        return f"--adapter-root (LORASERVE_ADAPTER_ROOT) {root} {what}"
    for name, relative in adapters.items():
        if not (root / relative).is_dir():
            return f"--adapter {name}={relative}: no adapter dir {root / relative}"
    return None


def serve_problem(settings) -> str | None:
    """The first problem of the server settings that would end start-up, or None."""
    return base_model_problem(settings.base_model, flag="--base-model (LORASERVE_BASE_MODEL)") or adapter_root_problem(
        settings.adapter_root, settings.adapters
    )
