"""The fault hook (server/engine/faults.py): off by default, only what the operator named, once each."""

from __future__ import annotations

import pytest
import torch

from server.engine.faults import FaultPlan
from server.settings import ServerSettings


def test_no_fault_unless_the_operator_sets_one(monkeypatch):
    monkeypatch.delenv("LORASERVE_FAULT_INJECTION", raising=False)
    plan = FaultPlan.from_setting(ServerSettings(base_model="m").fault_injection)
    for _ in range(3):
        plan.before_attach()
        plan.before_forward(decode_rows=64, prompt_chunks=0)


def test_each_fault_fires_once_where_it_was_aimed(monkeypatch):
    monkeypatch.setenv("LORASERVE_FAULT_INJECTION", '{"decode_oom_rows": 2, "adapter_load_oom": 2}')
    plan = FaultPlan.from_setting(ServerSettings(base_model="m").fault_injection)
    plan.before_forward(decode_rows=1, prompt_chunks=0)  # too few rows
    plan.before_forward(decode_rows=3, prompt_chunks=1)  # a prompt chunk rides along: not a decode step
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        plan.before_forward(decode_rows=2, prompt_chunks=0)
    plan.before_forward(decode_rows=2, prompt_chunks=0)  # once only
    plan.before_attach()
    with pytest.raises(torch.OutOfMemoryError, match="adapter load 2"):
        plan.before_attach()
    plan.before_attach()


def test_an_unknown_fault_is_refused():
    with pytest.raises(ValueError, match="unknown fault"):
        FaultPlan.from_setting({"everything_oom": 1})


def test_an_unknown_fault_is_a_setting_error_of_serve_before_anything_starts(tmp_path):
    """`loraserve serve` builds the engine process's options before the server's imports (engine_process/launch.py):
    an unknown fault must stop it there as a setting, in one line (exit 2), not as a traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LORASERVE_FAULT_INJECTION": '{"bogus": 1}', "LORASERVE_ENGINE_PROCESS": "on"}
    done = subprocess.run(
        [sys.executable, "-m", "loraserve", "serve", "--base-model", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "fault_injection" in done.stderr and "unknown fault 'bogus'" in done.stderr
    assert "Traceback" not in done.stderr
