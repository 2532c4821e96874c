#!/usr/bin/env bash
# The first GPU call after the engine moved into its own process (one device call, under 10 minutes):
#   1. the split-KV decode attention kernel against SDPA (bench.decode_attention_bench, 4 and 8 warps), and the
#      sampler's search pass at its new launch shape against the one before (bench.sampling_bench)
#   2. ours alone in the engine bench, greedy and sampled (the in-process reference, bs1 with the kernel)
#   3. run_http_profile.sh at 64 streams on /v1/completions, greedy and sampled, engine process on
#   4. the same, greedy, with LORASERVE_ENGINE_PROCESS=off: the A/B of the split, same machine, same call
# Everything lands in one archive, $OUT/split_check.tgz (the device tool brings back 8 files), and a summary is
# printed. Carry .gpu and .whl (py-spy's wheel): bash bench/gpu/run_split_check.sh
set -u
work=/tmp/split_check; rm -rf "$work"; mkdir -p "$work"
t0=$(date +%s); at() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
source bench/gpu/setup.sh > "$work/setup.log" 2>&1; tail -2 "$work/setup.log"
[ -d .gpu ] && mv .gpu /tmp/gpu_bundle  # the scripts below reuse /tmp/site instead of unpacking it again
at decode attention bench
timeout 90 python3 -m bench.decode_attention_bench > "$work/decode_bench.log" 2>&1; tail -24 "$work/decode_bench.log"
at sampler bench  # the search pass's new launch shape against the one before, on the device's clock
timeout 120 python3 -m bench.sampling_bench > "$work/sampling_bench.log" 2>&1; tail -14 "$work/sampling_bench.log"
at engine bench, ours
OUT=$work METHODS=ours SCENARIOS=bs1,streams8,streams32,streams64,streams8_base,ttft512 TAG=ours \
  timeout 210 bash bench/gpu/run_engine_bench.sh 2>&1 | tail -16
at HTTP profile, engine process on
ROUTES=completions SAMPLING="greedy sampled" SKIP_SETUP=1 timeout 240 bash bench/gpu/run_http_profile.sh "$work/on" \
  > "$work/on.log" 2>&1
grep -vE '^ {4,}' "$work/on.log" | head -40
pkill -f "loraserve serve"; pkill -f py-spy; sleep 2  # whatever a timeout left behind holds the port
at HTTP profile, engine process off
LORASERVE_ENGINE_PROCESS=off ROUTES=completions SKIP_SETUP=1 timeout $(( 575 - $(date +%s) + t0 )) \
  bash bench/gpu/run_http_profile.sh "$work/off" > "$work/off.log" 2>&1
grep -vE '^ {4,}' "$work/off.log" | head -20
pkill -f "loraserve serve"; at done
tar -C /tmp -czf "${OUT:-.}/split_check.tgz" split_check
