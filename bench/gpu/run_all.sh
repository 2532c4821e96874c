#!/usr/bin/env bash
# Everything GPU in one device call: the GPU tests, then the training benchmark (16-bit and 4-bit).
set -uo pipefail
bash bench/gpu/run_tests.sh "$@"
WITH_4BIT=1 timeout 420 bash bench/gpu/run_train_bench.sh
