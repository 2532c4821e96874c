"""setup → load data → load model → fit → save, read top-down.

The adapter directory appears atomically: everything is written into a hidden temp dir beside
`--output` and renamed into place at the end, manifest last. An interrupted or failed run removes
the temp dir and leaves nothing at `--output`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from contract.fingerprint import base_fingerprint
from contract.lora import PICKLE_SUFFIXES
from contract.manifest import (
    AdapterManifest,
    BaseModelInfo,
    DatasetInfo,
    LoraInfo,
    LossInfo,
    TemplateInfo,
    write_manifest,
)
from contract.templates import PromptTemplate, resolve_template
from training.backend import Backend, choose_backend, load_model
from training.config import ConfigError, TrainConfig
from training.data import AlpacaRow, Dataset, load_dataset_rows


@dataclass
class TrainResult:
    output: Path
    manifest: AdapterManifest
    seconds: float
    tokens_per_second: float
    rows_kept: int
    rows_over_length: int


def train(cfg: TrainConfig, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> TrainResult:
    _check_output(cfg)
    template = resolve_template(cfg.template)
    data = load_dataset_rows(cfg.data, cfg.columns)
    backend = choose_backend(cfg, warn=log)
    log(f"backend: {backend.name} ({'CUDA' if backend.cuda else 'CPU'}); data: {len(data.rows)} rows from {cfg.data}")
    model, tokenizer = _load_model(cfg, backend, log)
    texts, over = _training_examples(data.rows, template, tokenizer, cfg)
    log(f"rows kept: {len(texts)}; rows over --max-seq-length {cfg.max_seq_length} (dropped): {over}")
    if not texts:
        raise ConfigError(f"every row is longer than --max-seq-length {cfg.max_seq_length} tokens")
    tmp = _staging_dir(cfg.output)
    try:
        progress, seconds = _fit(cfg, backend, model, tokenizer, texts, workdir=tmp / "_trainer")
        shutil.rmtree(tmp / "_trainer", ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        _drop_non_safetensors(tmp)
        manifest = write_manifest(
            tmp, _manifest(cfg, backend, template, tokenizer, model, data, len(texts), over, progress)
        )
        _move_into_place(tmp, cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokens = sum(len(t["ids"]) for t in texts) * _epochs_seen(progress, cfg, len(texts))
    return TrainResult(cfg.output, manifest, seconds, tokens / max(seconds, 1e-9), len(texts), over)


def _staging_dir(output: Path) -> Path:
    """A temp dir beside `output` (same filesystem, so the final rename is atomic). mkdtemp makes it
    0700; it gets the usual umask-based mode so a server running as another user can read the adapter."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def _check_output(cfg: TrainConfig) -> None:
    if cfg.output.exists() and not cfg.overwrite:
        raise ConfigError(f"--output {cfg.output} already exists (pass --overwrite to replace it)")
    try:
        cfg.output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a parent dir should be, no permission, ...
        raise ConfigError(f"--output {cfg.output}: cannot create {cfg.output.parent}: {exc.strerror or exc}") from exc


def _load_model(cfg: TrainConfig, backend: Backend, log: Callable[[str], None]):
    try:
        return load_model(cfg, backend, warn=log)
    except ValueError as exc:  # PEFT: target modules not found; transformers: bad model dir
        raise ConfigError(f"cannot prepare {cfg.base_model} for LoRA: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot load base model {cfg.base_model!r}: {exc}") from exc


def _training_examples(rows: list[AlpacaRow], template: PromptTemplate, tokenizer, cfg: TrainConfig):
    """Tokenized training texts; rows over the length limit are dropped, not truncated (a cut
    example would teach the model to stop mid-answer without EOS)."""
    eos = tokenizer.eos_token
    examples, over = [], 0
    for row in rows:
        prompt = template.prompt(row.instruction, row.input)
        text = template.training_text(row.instruction, row.input, row.output, eos)
        ids = tokenizer(text, add_special_tokens=True).input_ids
        if len(ids) > cfg.max_seq_length:
            over += 1
            continue
        examples.append({"text": text, "prompt": prompt, "completion": text[len(prompt) :], "ids": ids})
    return examples, over


def _fit(cfg: TrainConfig, backend: Backend, model, tokenizer, examples: list[dict], *, workdir: Path):
    from datasets import Dataset as HFDataset
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from training.progress import ProgressCallback

    columns = ["prompt", "completion"] if cfg.train_on_responses_only else ["text"]
    dataset = HFDataset.from_list([{c: ex[c] for c in columns} for ex in examples])
    train_set, eval_set = _split(dataset, cfg)
    progress = ProgressCallback()
    _check_trainer_choices(cfg)
    trainer_cls = SFTTrainer if _has_triton(backend) else _model_loss_trainer(SFTTrainer)
    trainer = trainer_cls(
        model=model,
        processing_class=tokenizer,
        train_dataset=train_set,
        eval_dataset=eval_set,
        args=_sft_config(SFTConfig, cfg, backend, workdir, has_eval=eval_set is not None),
        callbacks=[progress],
    )
    trainer.remove_callback(PrinterCallback)  # our bar shows the loss; no raw log dicts on stdout
    started = time.monotonic()
    trainer.train()
    _check_finite(model, progress)
    return progress, time.monotonic() - started


def _check_trainer_choices(cfg: TrainConfig) -> None:
    """Names transformers knows, checked here (it is imported by now; importing it before Unsloth's model
    load would cost Unsloth its patches), so a typo is one clear line, not a traceback."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for flag, value, known in (("--optim", cfg.optim, OptimizerNames), ("--scheduler", cfg.scheduler, SchedulerType)):
        names = sorted(choice.value for choice in known)
        if value not in names:
            raise ConfigError(f"{flag} {value!r} is unknown; choose one of {', '.join(names)}")


def _check_finite(model, progress) -> None:
    """A run that diverged must not be saved as an adapter (its weights would turn every answer to NaN)."""
    import math

    import torch

    advice = "try a lower --lr. Nothing was written to --output"
    for step, loss in progress.curve:
        if not math.isfinite(loss):
            raise ConfigError(f"training diverged: the loss became {loss} at step {step}; {advice}")
    if any(not torch.isfinite(p).all() for name, p in model.named_parameters() if "lora_" in name):
        raise ConfigError(f"training diverged: the adapter weights are not finite; {advice}")


def _has_triton(backend: Backend) -> bool:
    import importlib.util

    return backend.cuda and importlib.util.find_spec("triton") is not None


def _model_loss_trainer(SFTTrainer):
    """TRL computes the loss with a fused Triton LM-head kernel; CPU builds of torch ship no Triton, so
    there the model computes its own loss from the labels TRL's collator built (same masking)."""
    from transformers import Trainer

    class ModelLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return ModelLossSFTTrainer


def _split(dataset, cfg: TrainConfig):
    if cfg.eval_split <= 0 or len(dataset) < 4:
        return dataset, None
    parts = dataset.train_test_split(test_size=cfg.eval_split, seed=cfg.seed)
    return parts["train"], parts["test"]


def _sft_config(SFTConfig, cfg: TrainConfig, backend: Backend, workdir: Path, *, has_eval: bool):
    import torch

    bf16 = backend.cuda and torch.cuda.is_bf16_supported()
    return SFTConfig(
        output_dir=str(workdir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_steps,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        num_train_epochs=cfg.epochs or 1.0,
        learning_rate=cfg.lr,
        optim=cfg.optim,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.scheduler,
        seed=cfg.seed,
        max_length=cfg.max_seq_length,
        packing=cfg.packing,
        completion_only_loss=cfg.train_on_responses_only if cfg.train_on_responses_only else None,
        dataset_text_field="text",
        bf16=bf16,
        fp16=backend.cuda and not bf16,
        use_cpu=not backend.cuda,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="steps" if has_eval else "no",
        eval_steps=max(1, (cfg.max_steps or 50) // 5) if has_eval else None,
        report_to="none",
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN, not as 0.0 (which would look perfect)
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _drop_non_safetensors(adapter_dir: Path) -> None:
    """Only safetensors weights leave training: a pickle file is a code-execution risk for whoever loads it."""
    for path in adapter_dir.iterdir():
        if path.suffix in PICKLE_SUFFIXES and path.is_file():
            path.unlink()


def _manifest(
    cfg, backend, template, tokenizer, model, data: Dataset, kept: int, over: int, progress
) -> AdapterManifest:
    return AdapterManifest(
        name=cfg.name,
        base_model=BaseModelInfo(id=cfg.base_model, fingerprint=base_fingerprint(_base_config(model), tokenizer)),
        template=TemplateInfo(name=template.name, text=template.text),
        eos_token=tokenizer.eos_token,
        stop=[tokenizer.eos_token],
        lora=LoraInfo(
            r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=list(cfg.target_modules)
        ),
        training=cfg.training_args_record()
        | {
            "backend_notes": backend.notes,
            "eval_loss": progress.eval_losses,
            "steps_trained": progress.curve[-1][0] if progress.curve else 0,
        },
        dataset=DatasetInfo(
            source=data.source, sha256=data.sha256, rows=len(data.rows), rows_kept=kept, rows_over_length=over
        ),
        versions=_library_versions(),
        loss=LossInfo(final=progress.curve[-1][1] if progress.curve else None, curve=progress.curve),
        backend=backend.name,
    )


def _base_config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in (
        "loraserve",
        "torch",
        "transformers",
        "peft",
        "trl",
        "datasets",
        "unsloth",
        "unsloth_zoo",
        "bitsandbytes",
    ):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return found


def _move_into_place(tmp: Path, cfg: TrainConfig) -> None:
    if cfg.output.exists():  # --overwrite: swap the old dir out only once the new one is complete
        old = cfg.output.with_name(f".{cfg.output.name}.old-{os.getpid()}")
        os.replace(cfg.output, old)
        os.replace(tmp, cfg.output)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:  # --overwrite of a file
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, cfg.output)


def _epochs_seen(progress, cfg: TrainConfig, rows: int) -> float:
    samples = (progress.curve[-1][0] if progress.curve else 0) * cfg.batch_size * cfg.grad_accum
    return samples / max(rows, 1)
