#!/usr/bin/env bash
# The in-process engine benchmark on the GPU (random Llama-3-8B shape): ours, HF generate + PEFT and
# Unsloth by default; METHODS / SCENARIOS / DTYPE / TAG override. Results land in $OUT (the device tool's folder).
set -uo pipefail
source bench/gpu/setup.sh
out=${OUT:-bench/results}
tag=${TAG:-engine}
python3 bench/engine_bench.py --model llama3-8b-random --methods "${METHODS:-ours,hf_peft,unsloth}" \
  ${SCENARIOS:+--scenarios "$SCENARIOS"} ${DTYPE:+--dtype "$DTYPE"} --json "$out/$tag.json" 2>&1 | tee "$out/$tag.log" | grep -v '^Loading'
