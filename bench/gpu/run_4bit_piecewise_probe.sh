#!/usr/bin/env bash
# Why the 4-bit base failed with piecewise prefill graphs (2026-12-02): its serving test, with the piecewise path
# forced on for a base whose projections are not fused (ModelRunner builds PiecewiseGraphs only when
# `all_fused(projections)`; here that condition is dropped for the run and put back after). No timeout around
# pytest: the 2026-12-02 run was cut before its assertion printed. Output in $OUT/forced_4bit.log.
#   bash bench/gpu/run_4bit_piecewise_probe.sh         (carry .gpu unless the machine is warm from another call)
set -u
source bench/gpu/setup.sh > /dev/null 2>&1
runner=server/engine/runner.py
cp "$runner" /tmp/runner.py.orig
trap 'cp /tmp/runner.py.orig "$runner"' EXIT
sed -i 's/if graphs and all_fused(projections) else None/if graphs else None/' "$runner"
grep -q "PiecewiseGraphs(self.decoder) if graphs else None" "$runner" || { echo "the condition moved: edit this script"; exit 1; }
python3 -m pytest -o addopts="" -m gpu tests/test_gpu.py -k 4bit_base -v -s -p no:cacheprovider > "${OUT:-.}/forced_4bit.log" 2>&1
echo "exit $?"
grep -E 'near|tie|differ|assert|PASS|FAIL|passed|failed' "${OUT:-.}/forced_4bit.log" | tail -30
