"""Smoke test of the in-process engine benchmark (bench/engine_bench.py) on CPU with the tiny model.

Checks that the harness runs end to end and its bookkeeping is consistent; never asserts on speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.live import REPO_ROOT

pytestmark = pytest.mark.slow

OUTPUT_LEN = 8
SCENARIOS = {"bs1": 1, "streams8": 8}  # name -> streams


def test_engine_bench_hf_peft_and_ours(tmp_path):
    out = tmp_path / "engine.json"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))  # the tiny model builds here, not in ~/.cache
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "engine_bench.py"), "--model", "tiny",
                           "--quick", "--methods", "hf_peft,ours", "--scenarios", ",".join(SCENARIOS),
                           "--input-len", "16", "--output-len", str(OUTPUT_LEN), "--json", str(out)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ours/hf_peft" in proc.stdout

    result = json.loads(out.read_text())
    assert result["config"]["scenarios"] == list(SCENARIOS) and result["config"]["output_len"] == OUTPUT_LEN
    assert set(result["methods"]) == {"hf_peft", "ours"}
    assert result["bandwidth"]["GB_per_s"] > 0
    assert result["machine"]["versions"]["torch"] and result["machine"]["date"]
    for name, streams in SCENARIOS.items():
        assert result["roofline"]["scenarios"][name]["distinct_adapters"] == min(streams, 4)  # --quick: 4 adapters

    hf = result["methods"]["hf_peft"]
    assert hf["error"] is None and not hf["skipped"]
    check_scenarios(hf)

    ours = result["methods"]["ours"]
    assert ours["error"] is None, ours["error"]
    check_scenarios(ours)
    assert all(r["short_rows"] == 0 for r in ours["scenarios"].values())
    assert len(ours["token_ids"]["streams8"]) == 8 and len(hf["token_ids"]["streams8"]) == 8
    match = result["match"]["streams8"]
    assert len(match["per_row"]) == 8 and 0 <= match["mean"] <= 1
    # fp32 on CPU, same prompts, same adapter per row: greedy tokens agree with HF + PEFT (1.0 when written).
    # A wrong adapter diverges at the first token (the random adapters move every row off the base model's
    # choice), so this margin tolerates one near-tie flip and still catches mix-ups.
    assert match["mean"] >= 0.75, match
    assert result["config"]["dtype"] == "torch.float32"  # the CPU default of --dtype

    # The divergence analysis runs whenever ours and hf_peft both ran: one entry per decode scenario, over all
    # rows. In fp32 on the CPU ours is HF's computation token for token, so no row may part from it.
    assert "first divergence of ours from hf_peft" in proc.stdout
    divergence = result["divergence"]
    assert set(divergence) == set(SCENARIOS)
    for name, streams in SCENARIOS.items():
        record = divergence[name]
        assert record["rows"] == streams, record
        assert record["rows_diverged"] == 0 and record["per_row"] == [] and record["gap_at_divergence"] is None, record
        assert 0 <= record["top2_gap"]["p10"] <= record["top2_gap"]["p50"], record


def check_scenarios(method: dict) -> None:
    for name, streams in SCENARIOS.items():
        record = method["scenarios"][name]
        assert "error" not in record, record
        assert record["streams"] == streams and record["tokens"] == OUTPUT_LEN * streams
        assert record["tok_s"] > 0 and record["wall_s"] > 0 and record["pct_roofline"] > 0
        assert 0 < record["ttft_ms"]["p50"] <= record["wall_s"] * 1000
        assert record["tpot_ms"]["p50"] > 0
