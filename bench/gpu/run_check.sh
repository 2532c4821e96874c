#!/usr/bin/env bash
# The fast path's check on the GPU, one device call (under 10 minutes): the Triton kernels' tests compiled (sampling,
# LoRA expand, q/k/v), the sampler bench (torch path against the kernel), one 512-token prompt's prefill profiled with
# and without an adapter, then ours alone in the engine bench, greedy and sampled (the sampled / greedy ratios need no
# vLLM). PROFILE=1 adds the kernels per step at 1 and 64 rows; OPS=1 which operators launch a 1-row step's kernels.
# Each takes over a minute: with both, the bench may not finish in the call. Results in $OUT. The GPU tests are
# run_tests.sh; vLLM's run is run_engine_bench.sh.
source bench/gpu/setup.sh >/dev/null
timeout 200 python3 -m pytest -o addopts="" tests/test_sampling_kernel.py tests/test_lora_kernel.py tests/test_qkv_kernel.py tests/test_decode_attention.py -q -p no:cacheprovider 2>&1 | tail -6 | tee $OUT/kernel_tests.log
timeout 60 python3 -m bench.sampling_bench 2>&1 | tail -9 | tee $OUT/sampling_bench.log
timeout 90 python3 -m bench.profile_step --prefill 512 --top 14 2>&1 | grep -E '^(==|warm|  )' | tee $OUT/prefill.log
[ "${PROFILE:-0}" = 1 ] && timeout 120 python3 -m bench.profile_step --streams 1,64 --new 48 --top 14 --greedy-only 2>&1 | grep -E '^(--|==|warm|  )' | tee $OUT/profile.log
[ "${OPS:-0}" = 1 ] && timeout 90 python3 -m bench.profile_step --ops --streams 1 --new 24 --top 20 --greedy-only 2>&1 | grep -E '^(--|==|warm|  )' > $OUT/ops.log
METHODS=ours SCENARIOS=bs1,streams8,streams32,streams64,streams8_base,ttft512,ttft512_base TAG=ours \
  timeout 200 bash bench/gpu/run_engine_bench.sh | tail -25
