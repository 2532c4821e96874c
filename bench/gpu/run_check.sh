#!/usr/bin/env bash
# A quick check of the fast path on the GPU: the GPU tests of the engine, the sampler bench, a kernel profile at
# 1 and 64 streams, and 64 streams with 2048-token prefill chunks. Results in $OUT.
source bench/gpu/setup.sh >/dev/null
timeout 330 python3 -m pytest -o addopts="" -m gpu tests/test_gpu_engine.py tests/test_gpu.py -k "engine or mixed or 4bit_base or compiled" -q -p no:cacheprovider -x 2>&1 | tail -15 | tee $OUT/gpu_tests.log
timeout 60 python3 -m bench.sampling_bench 2>&1 | tail -5 | tee $OUT/sampling_bench.log
timeout 170 python3 -m bench.profile_step --streams 1,64 --new 48 --top 14 --greedy-only 2>&1 | grep -E '^(--|==|warm|  )' > $OUT/profile.log
timeout 100 python3 -m bench.profile_step --plain --greedy-only --streams 64 --new 128 --prefill-chunk-tokens 2048 2>&1 | grep -E '^(--|==|warm)' > $OUT/waves_2048.log
cat $OUT/profile.log $OUT/waves_2048.log
