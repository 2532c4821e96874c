"""A progress bar with loss and ETA for the Trainer, and the loss curve it saw."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm
from transformers import TrainerCallback


class ProgressCallback(TrainerCallback):
    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.bar = None
        self.curve: list[tuple[int, float]] = []
        self.eval_losses: list[tuple[int, float]] = []
        self.started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()
        self.bar = tqdm(total=state.max_steps, desc="training", unit="step", file=self.stream, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.curve.append((state.global_step, float(logs["loss"])))
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")
        if "eval_loss" in logs:
            self.eval_losses.append((state.global_step, float(logs["eval_loss"])))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started
