"""A new user's first mistakes with `serve`: one line saying what is wrong, before any model loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loraserve.preflight import adapter_root_problem, base_model_problem
from tests.live import REPO_ROOT, LiveServer


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loraserve", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=120,
    )


def assert_one_line(proc: subprocess.CompletedProcess, expected: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert expected in lines[0]


def test_serve_with_a_missing_base_model_says_so(tmp_path):
    proc = run_cli("serve", "--base-model", str(tmp_path / "nonexistent"))
    assert_one_line(proc, "nonexistent: no such directory")
    assert "models pull smollm2" in proc.stderr  # where a first-time user gets a model


def test_serve_with_the_base_model_from_the_environment(tmp_path):
    proc = run_cli("serve", env={"LORASERVE_BASE_MODEL": str(tmp_path)})
    assert_one_line(proc, "LORASERVE_BASE_MODEL) " + str(tmp_path) + ": not a model dir")


def test_serve_with_a_missing_adapter_root_or_adapter_dir(tiny_model_dir, tmp_path):
    proc = run_cli("serve", "--base-model", str(tiny_model_dir), "--adapter-root", str(tmp_path / "nope"))
    assert_one_line(proc, "nope does not exist")
    proc = run_cli(
        "serve", "--base-model", str(tiny_model_dir), "--adapter-root", str(tmp_path), "--adapter", "foo=missing"
    )
    assert_one_line(proc, "--adapter foo=missing: no adapter dir")


@pytest.mark.slow
def test_a_preloaded_adapter_that_cannot_load_is_one_log_line(tiny_model_dir, tmp_path):
    (tmp_path / "empty").mkdir()  # exists, so the CLI lets it through; the server's checks refuse it
    server = LiveServer(tiny_model_dir, tmp_path, adapters={"foo": "empty"}, log_path=tmp_path / "server.log")
    try:
        code = server.proc.wait(timeout=120)
        log = server.log()
    finally:
        server.stop()
    assert code == 3, log[-3000:]
    assert "loading failed: preloading adapter 'foo' from 'empty':" in log
    assert "Traceback" not in log


@pytest.mark.parametrize(
    "value,expected",
    [
        ("", "is empty"),
        ("/definitely/not/here", "no such directory"),
        ("./relative-missing", "no such directory"),
        ("org/model-name", None),  # a hub id: left to transformers
        ("gpt2", None),
    ],
)
def test_base_model_shapes(value, expected):
    problem = base_model_problem(value)
    assert problem is None if expected is None else expected in problem


def test_a_model_dir_needs_config_and_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert "no weights" in base_model_problem(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert base_model_problem(str(tmp_path)) is None
    assert "a file, not a model dir" in base_model_problem(str(tmp_path / "config.json"))


def test_adapters_need_a_root(tmp_path):
    assert "needs --adapter-root" in adapter_root_problem(None, {"a": "a"})
    assert adapter_root_problem(None, {}) is None
    assert adapter_root_problem(tmp_path, {}) is None


def test_cluster_checks_what_serve_checks_and_its_own_bounds_before_ray_starts(tiny_model_dir, tmp_path):
    proc = run_cli("cluster", "--base-model", str(tmp_path / "nonexistent"))
    assert_one_line(proc, "nonexistent: no such directory")
    proc = run_cli("cluster", "--base-model", str(tiny_model_dir), "--models-per-replica", "16")
    assert_one_line(proc, "models_per_replica (16) must be below max_adapters (16)")
    proc = run_cli("cluster", "--base-model", str(tiny_model_dir), "--replicas", "0")
    assert_one_line(proc, "replicas")
