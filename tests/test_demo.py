"""The README's main command, end to end: `loraserve demo --exit` on a fresh work dir."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.live import REPO_ROOT, free_port


@pytest.mark.slow
def test_demo_trains_serves_hot_loads_and_answers(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "loraserve", "demo", "--exit", "--port", str(free_port()), "--workdir", str(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{out[-4000:]}\n{proc.stderr[-4000:]}"
    assert "every adapter answered its own facts" in out
    assert out.count("✓ matches its training data") == 6
    assert out.count("(the base model alone does not know it)") == 6
    assert "loaded facts-en version" in out and "loaded facts-zh version" in out
    for name in ("facts-en", "facts-zh"):
        assert (tmp_path / "adapters" / name / "loraserve.json").is_file()
