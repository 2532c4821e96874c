"""Which library loads the model, for training and serving alike: Unsloth when CUDA and the package are
present (or when asked for), plain transformers + PEFT otherwise.

`import unsloth` patches transformers (and TRL) for the whole process, so it must come before anything
imports them. `choose_backend` is where either side imports it: each calls it before its own loader, whose
`from unsloth import FastLanguageModel` then finds it imported. What a side does about a backend's limits
(4-bit without Unsloth) is that side's rule.
"""

from __future__ import annotations

import importlib.util

BACKENDS = ("auto", "unsloth", "transformers")
BACKENDS_HELP = "auto (Unsloth on CUDA if installed), unsloth or transformers."


class BackendUnavailable(RuntimeError):
    """`unsloth` was asked for where it cannot run; `missing` says what is lacking."""

    def __init__(self, missing: str) -> None:
        super().__init__(f"backend 'unsloth' needs {missing}")
        self.missing = missing


def choose_backend(requested: str) -> str:
    """ "unsloth" or "transformers" for `requested` (one of BACKENDS), Unsloth imported when it is chosen."""
    import torch

    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    cuda = torch.cuda.is_available()
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "unsloth" and not (cuda and has_unsloth):
        raise BackendUnavailable("CUDA" if not cuda else "the unsloth package (pip install 'loraserve[unsloth]')")
    chosen = requested if requested != "auto" else ("unsloth" if cuda and has_unsloth else "transformers")
    if chosen == "unsloth":
        import unsloth  # noqa: F401  first: it patches transformers, which loading imports (position_limit too)
    return chosen
