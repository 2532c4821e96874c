"""`loraserve train` end to end on the tiny model (the CPU tier): it really learns, records what it did,
fails cleanly, falls back on CPU, and leaves nothing half-written at --output when interrupted."""

from __future__ import annotations

import math
import signal
import threading
import time
from importlib.metadata import version as dist_version
from pathlib import Path

import pytest

import loraserve
from contract.fingerprint import base_fingerprint
from contract.lora import PROJECTIONS as SEVEN_PROJECTIONS
from contract.manifest import MANIFEST_FILE, adapter_sha256, read_manifest
from contract.templates import PromptTemplate, resolve_template
from training.data import AlpacaRow, load_dataset_rows

pytestmark = pytest.mark.slow

ADAPTER_NAMES = ["facts-en", "facts-zh"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
FEW_STEPS = {"max_steps": 3, "optim": "adamw_torch"}
FACTS_EN = Path(loraserve.__file__).parent / "demo_data" / "facts_en.jsonl"


# --- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """In-process generation on one thread, for the reason the CLI runs get OMP_NUM_THREADS=1 (conftest)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_base(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def greedy_response(model, tokenizer, template: PromptTemplate, row: AlpacaRow) -> str:
    """What a server would answer: greedy decode of the serving prompt, stopped at EOS, prompt stripped."""
    import torch

    prompt = template.prompt(row.instruction, row.input)
    enc = tokenizer(prompt, return_tensors="pt")  # [1, S]
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=40,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # [1, S + new]
    return template.extract_response(tokenizer.decode(out[0]), prompt, tokenizer.eos_token)


def wrong_answers(model, tokenizer, template: PromptTemplate, rows: list[AlpacaRow]) -> list[tuple[str, str]]:
    """(answer, expected) for each row whose greedy answer is not exactly the trained output."""
    answers = [(greedy_response(model, tokenizer, template, row), row.output) for row in rows]
    return [pair for pair in answers if pair[0] != pair[1]]


def base_mean_token_loss(
    model_dir: Path, template: PromptTemplate, rows: list[AlpacaRow], *, responses_only: bool
) -> float:
    """The untrained model's mean next-token loss over the training texts (or their responses only):
    what step 1 of a run logs, since LoRA starts as a no-op and one batch holds every row."""
    import torch
    import torch.nn.functional as F

    model, tokenizer = load_base(model_dir)
    total, count = 0.0, 0
    for row in rows:
        text = template.training_text(row.instruction, row.input, row.output, tokenizer.eos_token)
        ids = tokenizer(text, return_tensors="pt").input_ids  # [1, S]
        start = len(tokenizer(template.prompt(row.instruction, row.input)).input_ids) if responses_only else 1
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]  # [S-1, V]: position i predicts token i+1
        losses = F.cross_entropy(logits, ids[0, 1:], reduction="none")[start - 1 :]
        total, count = total + losses.sum().item(), count + len(losses)
    return total / count


def demo_rows(trained_adapters, name: str) -> tuple[list[AlpacaRow], PromptTemplate]:
    data, template = trained_adapters.sources[name]
    return load_dataset_rows(str(data)).rows, resolve_template(template)


def assert_clean_error(proc, expected: str) -> str:
    """Exit 2, no traceback, exactly one `error:` line and it is the last thing printed."""
    stderr_lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in stderr_lines if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(errors) == 1 and stderr_lines[-1] == errors[0], proc.stderr
    assert expected in errors[0]
    assert "done:" not in proc.stdout
    return errors[0]


def temp_dirs_beside(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f".{output.name}.tmp-*"))


class StderrPump:
    """Drains a child's stderr in a thread (the progress bar redraws with \\r, so readline would block)."""

    def __init__(self, proc) -> None:
        self.buffer = bytearray()
        self.thread = threading.Thread(target=self._pump, args=(proc.stderr,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:
        while chunk := stream.read1(65536):
            self.buffer += chunk

    def wait_for(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while needle.encode() not in self.buffer:
            if time.monotonic() > deadline or not self.thread.is_alive():
                return needle.encode() in self.buffer
            time.sleep(0.05)
        return True

    def text(self) -> str:
        self.thread.join(timeout=10)
        return self.buffer.decode("utf-8", "replace")


def signal_during_training(train_cli, output: Path, sig: int) -> tuple[int, str]:
    """Start a run that would take hours, send `sig` once the progress bar is up; (exit code, stderr)."""
    proc = train_cli.start(data=FACTS_EN, output=output, max_steps=100_000, optim="adamw_torch")
    pump = StderrPump(proc)
    try:
        assert pump.wait_for("training:", timeout=180), f"no progress bar; stderr:\n{pump.text()[-3000:]}"
        proc.send_signal(sig)
        returncode = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return returncode, pump.text()


# --- the real fine-tune ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_adapter_answers_its_training_rows_and_the_base_does_not(trained_adapters, tiny_model_dir, name):
    from peft import PeftModel

    rows, template = demo_rows(trained_adapters, name)
    base, tokenizer = load_base(tiny_model_dir)
    base_wrong = wrong_answers(base, tokenizer, template, rows)
    tuned = PeftModel.from_pretrained(base, trained_adapters.dirs[name]).eval()
    tuned_wrong = wrong_answers(tuned, tokenizer, template, rows)

    # Base: at most 10% right (else the check proves nothing). Adapter: at least 90% right.
    assert len(base_wrong) >= 0.9 * len(rows), f"the base model alone knows {len(rows) - len(base_wrong)} facts"
    assert len(tuned_wrong) <= 0.1 * len(rows), f"{len(tuned_wrong)}/{len(rows)} wrong, e.g. {tuned_wrong[:3]}"


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_manifest_records_the_run(trained_adapters, tiny_model_dir, name):
    adapter_dir = trained_adapters.dirs[name]
    data, template_name = trained_adapters.sources[name]
    manifest = read_manifest(adapter_dir)
    base, tokenizer = load_base(tiny_model_dir)

    assert manifest.name == name
    assert (manifest.template.name, manifest.template.text) == (template_name, resolve_template(template_name).text)
    assert manifest.eos_token == tokenizer.eos_token == "</s>" and manifest.stop == ["</s>"]
    assert (manifest.lora.r, manifest.lora.lora_alpha) == (16, 16)
    assert manifest.lora.target_modules == list(SEVEN_PROJECTIONS)
    assert manifest.dataset.source == str(data)
    assert manifest.dataset.sha256 == load_dataset_rows(str(data)).sha256
    assert (manifest.dataset.rows, manifest.dataset.rows_kept, manifest.dataset.rows_over_length) == (16, 16, 0)
    assert manifest.training["max_steps"] == 200 and manifest.training["lr"] == 0.01
    assert manifest.training["eval_loss"] == []
    assert manifest.backend == "transformers"
    assert manifest.base_model.id == str(tiny_model_dir)
    assert manifest.base_model.fingerprint == base_fingerprint(base.config, tokenizer)
    for dist in ("torch", "transformers", "peft", "trl"):
        assert manifest.versions[dist] == dist_version(dist)
    assert manifest.adapter_sha256 == adapter_sha256(adapter_dir)
    assert manifest.version == manifest.adapter_sha256[:12]


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_loss_curve(trained_adapters, tiny_model_dir, name):
    rows, template = demo_rows(trained_adapters, name)
    loss = read_manifest(trained_adapters.dirs[name]).loss
    steps = [step for step, _ in loss.curve]

    assert loss.final < 0.5
    assert loss.curve and loss.curve[-1][1] == loss.final
    assert steps == sorted(steps) and steps[-1] == 200
    # Without --train-on-responses-only the loss covers the whole text, prompt included.
    expected_first = base_mean_token_loss(tiny_model_dir, template, rows, responses_only=False)
    assert loss.curve[0][1] == pytest.approx(expected_first, abs=1e-3)


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_adapter_dir_holds_only_safetensors_weights(trained_adapters, name):
    from safetensors import safe_open

    adapter_dir = trained_adapters.dirs[name]
    files = {p.name for p in adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", MANIFEST_FILE} <= files
    assert not [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    assert not [p for p in adapter_dir.iterdir() if p.is_dir()], "trainer checkpoints left behind"
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    for module in SEVEN_PROJECTIONS:
        assert any(f"{module}.lora_A" in k for k in keys) and any(f"{module}.lora_B" in k for k in keys)
    assert temp_dirs_beside(adapter_dir) == []


# --- errors: one clean line, exit code 2 -----------------------------------------------------------

ERROR_CASES = {
    "missing data file": ({"data": "{tmp}/nope.jsonl"}, "nope.jsonl: no such file"),
    "missing base model": ({"base_model": "{tmp}/no-model", "data": "{tmp}/nope.jsonl"}, "no-model: no such directory"),
    "not a model dir": ({"base_model": "{tmp}"}, "not a model dir (it has no config.json)"),
    "bad column": ({"column": ["output=answer"]}, "row 1 has no column 'answer'"),
    "bad column syntax": ({"column": ["output"]}, "--column expects FIELD=COLUMN"),
    "unknown template": ({"template": "alpaca-fr"}, "unknown template 'alpaca-fr'"),
    "rank zero": ({"r": 0}, "--r must be between 1 and 1024"),
    "unknown target module": ({"target_modules": "foo_proj"}, "foo_proj"),
    "one unknown target module among real ones": ({"target_modules": "q_proj,foo_proj"}, "['foo_proj'] not found"),
}


@pytest.mark.parametrize("options,expected", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_errors_are_one_clean_line(train_cli, tmp_path, options, expected):
    output = tmp_path / "adapter"
    options = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in options.items()}
    proc = train_cli.run(**({"data": FACTS_EN, "output": output} | FEW_STEPS | options))
    assert_clean_error(proc, expected)
    assert not output.exists() and temp_dirs_beside(output) == []


def test_existing_output_needs_overwrite(train_cli, tmp_path):
    output = tmp_path / "adapter"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    proc = train_cli.run(data=FACTS_EN, output=output, **FEW_STEPS)
    assert_clean_error(proc, "already exists (pass --overwrite")
    assert (output / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_the_dir_whole(train_cli, tmp_path):
    output = tmp_path / "adapter"
    output.mkdir()
    (output / "stale.txt").write_text("old run")
    proc = train_cli.run(data=FACTS_EN, output=output, overwrite=True, **FEW_STEPS)
    assert proc.returncode == 0, train_cli.describe(proc)
    assert not (output / "stale.txt").exists() and read_manifest(output).name == "adapter"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"], "temp or old dirs left beside --output"


# --- CPU fallbacks ---------------------------------------------------------------------------------


def test_4bit_and_8bit_adam_fall_back_on_cpu_with_a_note(train_cli, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the fallback is for machines without CUDA")
    output = tmp_path / "adapter"
    proc = train_cli.run(data=FACTS_EN, output=output, load_in_4bit=True, max_steps=3)  # default --optim adamw_8bit
    assert proc.returncode == 0, train_cli.describe(proc)
    assert "note: --load-in-4bit needs CUDA and bitsandbytes" in proc.stderr
    assert "note: --optim adamw_8bit needs CUDA and bitsandbytes; using adamw_torch" in proc.stderr
    training = read_manifest(output).training
    assert training["load_in_4bit"] is False and training["optim"] == "adamw_torch"
    assert len(training["backend_notes"]) == 2


def test_max_seq_length_is_capped_at_the_base_models_positions(train_cli, tmp_path, tiny_model_dir):
    """Past its positions the base was never trained, and Unsloth would rescale RoPE for the longer length:
    the adapter would then fit another model than the one the server loads. Capped, with a note."""
    from transformers import AutoConfig

    limit = AutoConfig.from_pretrained(tiny_model_dir).max_position_embeddings
    output = tmp_path / "adapter"
    proc = train_cli.run(data=FACTS_EN, output=output, max_seq_length=limit * 4, max_steps=2, optim="adamw_torch")
    assert proc.returncode == 0, train_cli.describe(proc)
    assert (
        f"note: --max-seq-length {limit * 4} is over the base model's {limit} positions; using {limit}" in proc.stderr
    )
    training = read_manifest(output).training
    assert training["max_seq_length"] == limit, training


# --- interrupted runs leave nothing at --output ----------------------------------------------------


def test_ctrl_c_leaves_nothing_behind(train_cli, tmp_path):
    output = tmp_path / "adapter"
    returncode, stderr = signal_during_training(train_cli, output, signal.SIGINT)
    assert returncode == 130, stderr[-3000:]
    assert "interrupted: nothing was written to --output" in stderr
    assert "Traceback" not in stderr
    assert not output.exists()
    assert temp_dirs_beside(output) == []


def test_sigkill_leaves_no_output(train_cli, tmp_path):
    output = tmp_path / "adapter"
    returncode, stderr = signal_during_training(train_cli, output, signal.SIGKILL)
    assert returncode == -signal.SIGKILL, stderr[-3000:]
    assert not output.exists()  # a killed run cannot clean up its temp dir; that is acceptable


# --- training options ------------------------------------------------------------------------------


def test_train_on_responses_only_masks_the_prompt(train_cli, tiny_model_dir, tmp_path):
    output = tmp_path / "adapter"
    proc = train_cli.run(
        data=FACTS_EN, output=output, train_on_responses_only=True, batch_size=16, grad_accum=1, **FEW_STEPS
    )
    assert proc.returncode == 0, train_cli.describe(proc)
    manifest = read_manifest(output)
    assert manifest.training["train_on_responses_only"] is True
    rows, template = load_dataset_rows(str(FACTS_EN)).rows, resolve_template("alpaca")
    responses = base_mean_token_loss(tiny_model_dir, template, rows, responses_only=True)
    whole = base_mean_token_loss(tiny_model_dir, template, rows, responses_only=False)
    assert abs(responses - whole) > 0.05, "the check cannot tell the two apart"
    assert manifest.loss.curve[0][1] == pytest.approx(responses, abs=1e-3)


def test_eval_split_records_eval_loss(train_cli, tmp_path):
    output = tmp_path / "adapter"
    proc = train_cli.run(data=FACTS_EN, output=output, eval_split=0.25, **FEW_STEPS)
    assert proc.returncode == 0, train_cli.describe(proc)
    training = read_manifest(output).training
    assert training["eval_split"] == 0.25
    assert training["eval_loss"], "no eval loss recorded"
    for step, loss in training["eval_loss"]:
        assert 1 <= step <= 3 and math.isfinite(loss) and loss > 0
