"""The command-line paths around the server: `loraserve generate` and `loraserve train --deploy`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from tests.live import ADMIN_TOKEN, REPO_ROOT, LiveServer

pytestmark = pytest.mark.slow


def _rows(path):
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def _loraserve(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loraserve", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def test_generate_streams_the_adapters_trained_answer(tiny_model_dir, trained_adapters):
    data, _ = trained_adapters.sources["facts-zh"]
    row = _rows(data)[4]
    proc = _loraserve(
        "generate",
        "--base-model",
        str(tiny_model_dir),
        "--adapter",
        str(trained_adapters.zh),
        "--instruction",
        row["instruction"],
        "--input",
        row["input"],
        "--max-new-tokens",
        "40",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == row["output"]


def test_generate_rejects_a_bad_request_with_one_line(tiny_model_dir):
    proc = _loraserve("generate", "--base-model", str(tiny_model_dir), "--instruction", "   ")
    assert proc.returncode == 2
    assert "instruction" in proc.stderr and "Traceback" not in proc.stderr


def test_train_deploy_hot_loads_into_a_running_server(tiny_model_dir, trained_adapters, tmp_path, train_cli):
    root = tmp_path / "adapters"
    root.mkdir()
    data, template = trained_adapters.sources["facts-en"]
    with LiveServer(tiny_model_dir, root) as server:
        proc = train_cli.run(
            data=data, template=template, output=root / "fresh", optim="adamw_torch", max_steps=3, deploy=server.url
        )
        assert proc.returncode == 2 and "LORASERVE_ADMIN_TOKEN" in proc.stderr  # no token: refused up front
        assert not (root / "fresh").exists()

        env = {**train_cli.env, "LORASERVE_ADMIN_TOKEN": ADMIN_TOKEN}
        cmd = train_cli.command(
            data=data, template=template, output=root / "fresh2", optim="adamw_torch", max_steps=3, deploy=server.url
        )
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, train_cli.describe(proc)
        manifest = json.loads((root / "fresh2" / "loraserve.json").read_text())
        assert f"deployed: fresh2 version {manifest['version']} is live" in proc.stdout
        listed = httpx.get(f"{server.url}/adapters/fresh2").json()
        assert listed["version"] == manifest["version"] and listed["template"] == template
