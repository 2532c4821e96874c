#!/usr/bin/env bash
# Where the engine's time goes on the GPU (random Llama-3-8B shape, 8 adapters): torch.profiler kernel
# tables at 1 and 64 streams, each size's first wave with cuDNN SDPA on and off (new-shape stalls), and
# a py-spy summary of the engine thread at 8/32/64 streams. Results land in $OUT.
set -uo pipefail
source bench/gpu/setup.sh
out=${OUT:-bench/results}
pip install -q --no-deps --target /tmp/pyspy .whl/py_spy-*.whl 2>&1 | tail -1
python3 - <<'PY' 2>&1 | tee "$out/attention_api.txt"
import inspect, torch
from torch.nn.attention import varlen
print("varlen_attn", inspect.signature(varlen.varlen_attn))
print("cudnn sdp enabled by default:", torch.backends.cuda.cudnn_sdp_enabled())
PY
timeout 200 python3 -m bench.profile_step --streams 1,64 --new 48 --top 30 2>&1 | grep -v Warning > "$out/profile.log"
tail -80 "$out/profile.log"
timeout 150 python3 -m bench.profile_step --plain --greedy-only --no-cudnn-sdp --streams 8,32,64 --new 128 2>&1 \
  | grep -E '^(--|==|warm)' | tee "$out/waves_cudnn_off.log"
timeout 200 /tmp/pyspy/bin/py-spy record --threads -r 200 --format raw -o /tmp/spy.txt -- \
  python3 -m bench.profile_step --plain --streams 8,32,64 --new 128 2>&1 | grep -E '^(--|==|warm)' | tee "$out/waves_cudnn_on.log"
python3 -m bench.pyspy_summary /tmp/spy.txt --top 40 > "$out/pyspy_engine.txt"
python3 -m bench.pyspy_summary /tmp/spy.txt --thread "_run_once (base_events.py" --top 25 > "$out/pyspy_loop.txt"
head -60 "$out/pyspy_engine.txt"; head -20 "$out/pyspy_loop.txt"
