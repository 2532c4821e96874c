"""The README's main command, end to end: `loraserve demo --exit` on a fresh work dir, on the real model
(SmolLM2-135M-Instruct, converted once into the user cache by the session fixture)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.live import REPO_ROOT, free_port


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_demo_asks_trains_serves_hot_loads_and_answers(tmp_path, smollm2_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "loraserve", "demo", "--exit", "--port", str(free_port()), "--workdir", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1400,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{out[-4000:]}\n{proc.stderr[-4000:]}"
    assert f"reusing {smollm2_dir}" in out
    # The base model, before any adapter: a sensible answer through each of its templates.
    assert "base ▸ The review is negative." in out
    assert "base ▸ The capital of France is Paris." in out
    # Side by side: 3 English and 3 Chinese facts streamed from their adapter, the base not knowing them;
    # one through the OpenAI chat route; the retrained version after its hot reload.
    assert out.count("answers exactly as trained; the base does not know it") == 6
    assert out.count("✓ facts-en answers exactly as trained") == 3 + 1 + 1
    assert out.count("✓ facts-zh answers exactly as trained") == 3
    assert "every adapter answered exactly as trained" in out
    assert "facts-en ▸ The Port Wren ferry leaves at 7:40 every morning." in out
    moved = re.search(r"facts-en version (\w+) → (\w+) in \d+ ms", out)
    assert moved and moved[1] != moved[2]
    assert f"now ▸ The Port Wren ferry leaves at 8:15 every morning.   (version {moved[2]})" in out
    assert "/playground" in out
    for name in ("facts-en", "facts-zh", "facts-en-v2"):
        assert (tmp_path / "adapters" / name / "loraserve.json").is_file()
