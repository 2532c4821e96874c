"""Training edge cases a review found (each test failed before its fix): data files as Windows tools and
editors write them, CSV rows that would shift columns, flags that used to end in a traceback, runs that
diverge, epoch runs' step counts, --overwrite of a file, SIGTERM, and adapter names both sides accept.

Pure functions are tested directly; the few CLI runs use the session's tiny model with 1-2 steps (~5 s each).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

import loraserve
from training.config import ConfigError, TrainConfig
from training.data import AlpacaRow, DataError, load_dataset_rows

FACTS_EN = Path(loraserve.__file__).parent / "demo_data" / "facts_en.jsonl"
RECORDS = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris."},
    {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
]
ROWS = [AlpacaRow(**r) for r in RECORDS]
ONE_STEP = {"max_steps": 1, "optim": "adamw_torch"}


def cfg(tmp_path, **overrides) -> TrainConfig:
    return TrainConfig(**({"base_model": "base", "data": "d.jsonl", "output": tmp_path / "adapter"} | overrides))


def assert_clean_error(proc, expected: str) -> None:
    """Exit 2, no traceback, one `error:` line, the last thing printed (as tests/test_train_cli.py demands)."""
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    assert expected in errors[0], errors[0]


# --- data loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["d.json", "d.jsonl"])
def test_utf8_bom_json_files_load_like_bom_csv(tmp_path, filename):
    """Windows tools (Notepad, PowerShell, Excel) write a UTF-8 BOM. A BOM CSV loads; BOM JSON/JSONL does not."""
    path = tmp_path / filename
    body = json.dumps(RECORDS) if filename.endswith(".json") else "".join(json.dumps(r) + "\n" for r in RECORDS)
    path.write_text(body, encoding="utf-8-sig")
    csv = tmp_path / "d.csv"
    pd.DataFrame(RECORDS).to_csv(csv, index=False, encoding="utf-8-sig")
    assert load_dataset_rows(str(csv)).rows == ROWS  # passes today
    assert load_dataset_rows(str(path)).rows == ROWS  # DataError: line 1 is not valid JSON: Unexpected UTF-8 BOM


def test_malformed_json_array_error_names_the_real_line(tmp_path):
    """A pretty-printed array with a trailing comma on line 3: the error blames line 1 ('[')."""
    path = tmp_path / "alpaca.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": "d"},\n]\n', "utf-8")
    with pytest.raises(DataError) as info:
        load_dataset_rows(str(path))
    message = str(info.value)
    assert "line 1 " not in message, message
    assert "line 4" in message, message  # json: "Expecting value: line 4 column 1"


def test_one_record_json_lines_in_a_json_file(tmp_path):
    """`.json` holding JSON Lines is supported (two records load), but a single record is refused."""
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(RECORDS[0]) + "\n", "utf-8")
    assert load_dataset_rows(str(path)).rows == ROWS[:1]


def test_parquet_null_input_is_an_empty_input_like_json(tmp_path):
    """JSON null input → "" (tested in test_data.py); the same rows as Parquet fail with 'got float'."""
    records = [dict(RECORDS[0], input=None), RECORDS[1]]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8")
    parquet = tmp_path / "d.parquet"
    pd.DataFrame(records).to_parquet(parquet, index=False)
    assert load_dataset_rows(str(jsonl)).rows == ROWS
    assert load_dataset_rows(str(parquet)).rows == ROWS  # DataError: row 1, column 'input': expected text, got float


def test_csv_rows_with_an_extra_field_do_not_shift_columns(tmp_path):
    """Every row has one field more than the header: pandas silently makes the first field the index, so
    instruction←input, input←output, output←the extra field. Training then runs on shifted data."""
    path = tmp_path / "d.csv"
    path.write_text(
        'instruction,input,output\nName the capital.,France,Paris.,id-1\nAdd the numbers.,"2, 3",5,id-2\n', "utf-8"
    )
    try:
        rows = load_dataset_rows(str(path)).rows
    except DataError:
        return  # refusing the malformed file is a fix
    assert rows[0].instruction == "Name the capital.", rows  # today: AlpacaRow('France', 'Paris.', 'id-1')


def test_directory_as_data_is_not_reported_as_missing(tmp_path):
    """`--data some_dir` (e.g. a dataset saved with save_to_disk or a cloned hub repo) says 'no such file'."""
    (tmp_path / "my_dataset").mkdir()
    with pytest.raises(DataError) as info:
        load_dataset_rows(str(tmp_path / "my_dataset"))
    assert "no such file" not in str(info.value), str(info.value)


# --- templates -------------------------------------------------------------------------------------

TEMPLATE = "Task: {}\nContext: {}\nAnswer: {}"


def test_template_file_saved_with_a_final_newline_loads(tmp_path):
    """Editors (vim, nano, most IDEs) end a text file with a newline; the file's response slot *is* last."""
    from contract.templates import load_template_file

    path = tmp_path / "qa.txt"
    path.write_text(TEMPLATE + "\n", "utf-8")
    assert load_template_file(path).text == TEMPLATE  # TemplateError: must end with the response slot


def test_template_json_with_uppercase_suffix_is_read_as_json(tmp_path):
    """Data files match the suffix case-insensitively (`.JSONL` works); `.JSON` templates are read as plain
    text and fail with a confusing 'must end with the response slot'."""
    from contract.templates import load_template_file

    path = tmp_path / "QA.JSON"
    path.write_text(json.dumps({"name": "qa", "text": TEMPLATE}), "utf-8")
    assert load_template_file(path).text == TEMPLATE


def test_template_file_with_bom_does_not_put_the_bom_into_every_prompt(tmp_path):
    from contract.templates import load_template_file

    path = tmp_path / "qa.txt"
    path.write_text(TEMPLATE, encoding="utf-8-sig")
    assert not load_template_file(path).text.startswith("\ufeff")


# --- config validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), -1.0, float("inf")])
def test_weight_decay_is_validated(tmp_path, value):
    with pytest.raises(ConfigError, match="weight-decay"):
        cfg(tmp_path, weight_decay=value)


def test_epochs_must_be_finite(tmp_path):
    """`--epochs inf` passes validation, then Trainer dies with OverflowError (a traceback)."""
    with pytest.raises(ConfigError, match="epochs"):
        cfg(tmp_path, epochs=float("inf"))


def test_name_with_trailing_newline_is_rejected(tmp_path):
    """`_NAME.match` with `$` accepts a trailing newline."""
    with pytest.raises(ConfigError, match="--name"):
        cfg(tmp_path, name="bot\n")


def test_a_name_training_accepts_is_one_the_server_can_load(tmp_path):
    """Training allows '.' in names (`--output adapters/support-bot.v2`), the server's admin API does not:
    `--deploy` fails after the whole training run, and the adapter can never be loaded under its own name."""
    from contract.names import ADAPTER_NAME as SERVER_NAME  # what server/adapters.py checks admin loads with

    try:
        config = cfg(tmp_path, output=tmp_path / "support-bot.v2")
    except ConfigError:
        return  # refused up front: consistent
    assert SERVER_NAME.match(config.name), f"training accepted {config.name!r}; the server rejects it"


# --- --deploy --------------------------------------------------------------------------------------


def test_deploy_with_a_malformed_url_is_a_clean_error(monkeypatch):
    """httpx.InvalidURL is not an httpx.HTTPError: a typo in --deploy gives a traceback after training."""
    import typer

    from loraserve.cli import _deploy

    monkeypatch.setenv("LORASERVE_ADMIN_TOKEN", "t")
    with pytest.raises(typer.Exit) as info:
        _deploy("http://[::1", name="bot", path="bot")
    assert info.value.exit_code == 2


def test_deploy_answered_by_a_non_json_200_is_a_clean_error(monkeypatch):
    """A proxy or a wrong server answering 200 with HTML: resp.json() raises JSONDecodeError (a traceback)."""
    import httpx
    import typer

    from loraserve.cli import _deploy

    monkeypatch.setenv("LORASERVE_ADMIN_TOKEN", "t")
    monkeypatch.setattr(httpx, "post", lambda *a, **k: httpx.Response(200, text="<html>login</html>"))
    with pytest.raises(typer.Exit) as info:
        _deploy("http://server:8000", name="bot", path="bot")
    assert info.value.exit_code == 2


# --- the CLI: clean errors, truthful results, nothing left behind --------------------------------------

CLI_ERRORS = {
    "optim typo": ({"optim": "adamw_typo", "max_steps": 1}, "adamw_typo"),
    "scheduler typo": ({"scheduler": "cosinee", "optim": "adamw_torch", "max_steps": 1}, "cosinee"),
    "negative seed": ({"seed": -1, **ONE_STEP}, "seed"),
    "infinite epochs": ({"epochs": "inf", "optim": "adamw_torch"}, "epochs"),
}


@pytest.mark.slow
@pytest.mark.parametrize("options,expected", CLI_ERRORS.values(), ids=CLI_ERRORS.keys())
def test_bad_flags_are_one_clean_error_line(train_cli, tmp_path, options, expected):
    """Today each one loads the data and the model, then dies with a traceback (exit 1)."""
    output = tmp_path / "adapter"
    proc = train_cli.run(data=FACTS_EN, output=output, **options)
    assert_clean_error(proc, expected)
    assert not output.exists() and not list(tmp_path.glob(".adapter.tmp-*"))


@pytest.mark.slow
def test_output_under_a_regular_file_is_a_clean_error(train_cli, tmp_path):
    """`--output notes.txt/adapter`: `mkdir(parents=True)` raises FileExistsError, shown as a traceback."""
    (tmp_path / "notes.txt").write_text("mine")
    proc = train_cli.run(data=FACTS_EN, output=tmp_path / "notes.txt" / "adapter", **ONE_STEP)
    assert_clean_error(proc, "notes.txt")


@pytest.mark.slow
def test_overwrite_of_a_file_leaves_nothing_beside_output(train_cli, tmp_path):
    """--overwrite when --output is a file: the old file is renamed to `.adapter.old-PID` and rmtree (which
    cannot remove a file, errors ignored) leaves it behind."""
    output = tmp_path / "adapter"
    output.write_text("not a dir")
    proc = train_cli.run(data=FACTS_EN, output=output, overwrite=True, **ONE_STEP)
    assert proc.returncode == 0, train_cli.describe(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.slow
def test_a_run_that_turns_nan_is_not_reported_as_a_success_with_loss_zero(train_cli, tmp_path):
    """--weight-decay nan (unvalidated) makes every adapter weight NaN after step 1; Trainer's default
    logging_nan_inf_filter logs the NaN step's loss as 0.0, so the CLI prints `done`, final loss 0.0000, and
    the manifest records a perfect loss (and weight_decay: null) for a useless adapter."""
    import torch
    from safetensors.torch import load_file

    output = tmp_path / "adapter"
    proc = train_cli.run(data=FACTS_EN, output=output, weight_decay="nan", max_steps=2, optim="adamw_torch")
    if proc.returncode != 0:
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        return  # refused (validation) or detected (NaN check): either is a fix
    weights = load_file(output / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values()), f"NaN adapter reported as: {proc.stdout}"


@pytest.mark.slow
def test_epoch_run_records_how_many_steps_it_trained(train_cli, tmp_path):
    """With --epochs the manifest's training.max_steps is None, so the public listing (summary) says
    steps: null although the run trained 6 steps."""
    from contract.manifest import read_manifest

    output = tmp_path / "adapter"
    proc = train_cli.run(data=FACTS_EN, output=output, epochs=1, batch_size=2, grad_accum=1, optim="adamw_torch")
    assert proc.returncode == 0, train_cli.describe(proc)
    manifest = read_manifest(output)
    trained = manifest.loss.curve[-1][0]  # 16 rows / batch 2 = 8
    assert manifest.summary()["steps"] == trained, manifest.summary()


@pytest.mark.slow
def test_sigterm_leaves_no_temp_dir_beside_output(train_cli, tmp_path):
    """`kill`, `timeout`, `docker stop`, Kubernetes and Slurm stop a run with SIGTERM. fit.py promises that an
    interrupted run removes its temp dir; on SIGTERM Python dies without running `finally`, leaving
    `.adapter.tmp-*/_trainer` beside --output (in the adapter root, next to the served adapters)."""
    output = tmp_path / "adapter"
    proc = train_cli.start(data=FACTS_EN, output=output, max_steps=100_000, optim="adamw_torch")
    buffer = b""
    try:
        import os

        os.set_blocking(proc.stderr.fileno(), False)
        deadline = time.monotonic() + 180
        while b"training:" not in buffer and time.monotonic() < deadline and proc.poll() is None:
            buffer += proc.stderr.read() or b""
            time.sleep(0.1)
        assert b"training:" in buffer, buffer[-3000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not output.exists()
    assert list(tmp_path.glob(".adapter.tmp-*")) == []
