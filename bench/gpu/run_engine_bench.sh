#!/usr/bin/env bash
# The in-process engine benchmark on the GPU (random Llama-3-8B shape): ours and vLLM (the anchor, in its own
# process and environment: /tmp/vllm_env.sh, ../shared/gpu/vllm/README.md) by default, greedy and sampled, the
# median of 3 waves. METHODS / SCENARIOS / SAMPLING / WAVES / DTYPE / PREFILL / TAG override; VLLM_TIMEOUT (420 s) bounds
# the vLLM process. Results land in $OUT (the device tool's folder); the JSON is rewritten after each method.
set -uo pipefail
source bench/gpu/setup.sh
out=${OUT:-bench/results}
tag=${TAG:-engine}
python3 -m bench.engine_bench --model llama3-8b-random --methods "${METHODS:-ours,vllm}" \
  ${SCENARIOS:+--scenarios "$SCENARIOS"} ${SAMPLING:+--sampling "$SAMPLING"} ${WAVES:+--waves "$WAVES"} \
  ${DTYPE:+--dtype "$DTYPE"} ${PREFILL:+--prefill-chunk-tokens "$PREFILL"} --vllm-timeout "${VLLM_TIMEOUT:-420}" --save-dir /tmp/engine_bench_files \
  --json "$out/$tag.json" 2>&1 | tee "$out/$tag.log" | grep -v '^Loading'
