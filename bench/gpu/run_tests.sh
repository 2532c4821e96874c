#!/usr/bin/env bash
# GPU-only tests (tests/test_gpu.py, tests/test_gpu_engine.py): Unsloth training through the CLI (16-bit and 4-bit), the
# live server on the Unsloth backend (16-bit and 4-bit base) passing the mixed-adapter batch comparison, graphs vs eager.
# First the Triton kernels' own tests (tests/test_*_kernel.py), compiled here (on CPU they run interpreted).
set -uo pipefail
source bench/gpu/setup.sh
python3 -m pytest -o addopts="" tests/test_sampling_kernel.py tests/test_lora_kernel.py tests/test_qkv_kernel.py tests/test_decode_attention.py -q -p no:cacheprovider 2>&1 | tee "${OUT:-.}/kernel_tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
python3 -m pytest -o addopts="" -m gpu tests/test_gpu.py tests/test_gpu_engine.py -v -s -p no:cacheprovider -x "$@" 2>&1 | tee "${OUT:-.}/gpu_tests.log"
status=${PIPESTATUS[0]}
[ "$status" = 0 ] || for f in /tmp/loraserve-test-*.log; do [ -f "$f" ] && tail -c 200000 "$f" > "${OUT:-.}/$(basename "$f")"; done
exit $status
