#!/usr/bin/env bash
# A/B on the CPU: the engine in the server's process against the engine in a process of its own
# (LORASERVE_ENGINE_PROCESS off / on), the tiny model, 64 streams of bench/serving.py on one route, in turns.
# Prints, per run: tok/s over a window, and the event loop thread's CPU time per token (/proc).
#   bench/ab_engine_process_cpu.sh [ROUTE] [ROUNDS]     (ROUTE: native | completions | chat; needs .venv)
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
route=${1:-completions}; rounds=${2:-2}; port=${PORT:-8411}
py=$repo/.venv/bin/python
model=$(mktemp -d)/tiny
$py -m loraserve build-tiny-model "$model" > /dev/null 2>&1
run() {  # PLACEMENT
  (cd "$repo" && HF_HUB_OFFLINE=1 LORASERVE_BASE_MODEL=$model LORASERVE_MAX_RUNNING=64 LORASERVE_MAX_CONTEXT=512 \
    LORASERVE_PORT=$port LORASERVE_ENGINE_PROCESS=$1 $py -m loraserve serve --log-level warning > /dev/null 2>&1 &)
  for _ in $(seq 120); do curl -sf localhost:$port/ready > /dev/null && break; sleep 0.5; done
  local server; server=$(lsof -t -i :$port -s TCP:LISTEN 2>/dev/null | head -1)
  $py "$repo/bench/serving.py" --url http://127.0.0.1:$port --route "$route" --concurrency 64 --duration 20 \
    --input-len 32 --output-len 128 --warmup 4 > /dev/null 2>&1 &
  local client=$!
  sleep 6
  tokens() { curl -s localhost:$port/metrics | awk '/^loraserve_generated_tokens_total/ {s += $2} END {print s + 0}'; }
  ticks() { awk '{print $14 + $15}' "/proc/$server/task/$server/stat"; }
  local t0 m0 s0 t1 m1 s1
  t0=$(tokens); m0=$(ticks); s0=$(date +%s.%N); sleep 10; t1=$(tokens); m1=$(ticks); s1=$(date +%s.%N)
  wait $client
  kill "$server"; sleep 2
  python3 -c "
tok, dt, hz = $t1 - $t0, $s1 - $s0, $(getconf CLK_TCK)
print(f'$route engine_process=$1: {tok / dt:.0f} tok/s; event loop {($m1 - $m0) / hz * 1e6 / tok:.1f} us/token')"
}
for _ in $(seq "$rounds"); do run off; run on; done
