#!/usr/bin/env bash
# The cluster (two replicas of the 8B shape sharing one GPU) against one replica, over HTTP, one device call:
#
#   bash bench/gpu/run_cluster.sh OUT_DIR
#
# 1. files: the random Llama-3-8B shape and 16 rank-16 adapters (build_8b_server_files.py, --tokenizer full-vocab),
#    kept in $FILES for a later call while the machine stays warm
# 2. one replica: `loraserve serve` with all 16 adapters and ADAPTER_SLOTS 8 (the rest wait in host memory);
#    bench/serving.py on the native streaming route, Zipf adapter choice over the 16, at $LEVELS
# 3. the cluster: `loraserve cluster --replicas 2 --num-gpus 0.5`, each replica with the same settings but half the
#    KV memory, 8 adapters per replica (LRU beyond), the same client run; then its /metrics (routing hit rate)
# 4. bench/cluster_compare.py: tok/s and TTFT p50/p99 per level, the cluster's ratio, the hit rate; in table.txt
#
# 128-token prompts, exactly 128 new tokens (ignore_eos), greedy, 2 x concurrency requests per level (at least 16).
# Needs Ray Serve on the machine: the two archives of bench/gpu/make_ray_bundle.sh (bench/gpu/README.md says how).
# Overrides: LEVELS (8,32,64), PHASES (single,cluster), ZIPF_S (1.1), FILES, BACKEND (transformers),
# MAX_RUNNING (64), KV_FRACTION (0.4 per replica of the memory free when it starts), SKIP_SETUP=1 with
# BASE_MODEL=dir ADAPTER_DIR=dir (a CPU dry run: the tiny model and 16 adapters a0..a15 in that dir, LEVELS=2).
set -uo pipefail
set -m  # each background server leads a process group of its own (pgid = $!): stopped with whatever it started
out=${1:?usage: bash bench/gpu/run_cluster.sh OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
t0=$(date +%s)
levels=${LEVELS:-8,32,64}
phases=${PHASES:-single,cluster}
zipf_s=${ZIPF_S:-1.1}
files=${FILES:-/tmp/serve8b_full-vocab_16}
max_running=${MAX_RUNNING:-64}
kv_fraction=${KV_FRACTION:-0.4}
in_len=${INPUT_LEN:-128}; out_len=${OUTPUT_LEN:-128}
adapters=$(seq -s, -f 'a%g' 0 15)
has() { [[ ",$1," == *",$2,"* ]]; }
now() { date +%s.%N; }

if [ "${SKIP_SETUP:-0}" = 1 ]; then
  model=${BASE_MODEL:?SKIP_SETUP=1 needs BASE_MODEL}; adapter_root=${ADAPTER_DIR:?SKIP_SETUP=1 needs ADAPTER_DIR}
else
  source bench/gpu/setup.sh
  python3 -c "import ray.serve" 2>/dev/null || { echo "ray[serve] is missing: carry the archives of bench/gpu/make_ray_bundle.sh (bench/gpu/README.md)"; exit 1; }
  # -- 1. files -----------------------------------------------------------------------------------------------------
  if [ ! -f "$files/.complete" ]; then
    rm -rf "$files"
    python3 bench/gpu/build_8b_server_files.py --out "$files" --adapters 16 --tokenizer full-vocab 2>&1 \
      | grep -v '^Loading\|Writing'
    [ "${PIPESTATUS[0]}" = 0 ] && touch "$files/.complete" || { echo "building the files failed"; exit 1; }
  fi
  model=$files/model; adapter_root=$files/adapters
fi
export LORASERVE_BASE_MODEL=$model LORASERVE_BASE_MODEL_NAME=base LORASERVE_ADAPTER_ROOT=$adapter_root
export LORASERVE_ADAPTERS="$(python3 -c "import json; print(json.dumps({f'a{i}': f'a{i}' for i in range(16)}))")"
export LORASERVE_MAX_RUNNING=$max_running LORASERVE_MAX_CONTEXT=1024 LORASERVE_ADAPTER_SLOTS=8
export LORASERVE_MAX_ADAPTERS=17 LORASERVE_BACKEND=${BACKEND:-transformers} LORASERVE_DRAIN_SECONDS=2

wait_ready() {  # URL PID LIMIT_S STARTED: prints seconds from STARTED to the first 200, or fails
  local deadline=$(( $(date +%s) + $3 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    curl -sf -o /dev/null "$1" && { awk -v a="$4" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; return 0; }
    kill -0 "$2" 2>/dev/null || return 1
    sleep 1
  done
  return 1
}
stop_group() {  # PGID: SIGTERM to the command alone (the cluster command then stops Serve and the Ray it started;
  # signalling Ray's own processes too would leave Serve's controller unreachable), SIGKILL to the group after 60 s
  kill -TERM "$1" 2>/dev/null
  for _ in $(seq 1 120); do kill -0 -- "-$1" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL -- "-$1" 2>/dev/null; sleep 2
}
load() {  # NAME URL: the Zipf client run
  timeout 240 python3 bench/serving.py --url "$2" --adapters "$adapters" --adapter-dist zipf --zipf-s "$zipf_s" \
    --concurrency "$levels" --requests 16 --requests-per-stream 2 --warmup 8 --input-len "$in_len" \
    --output-len "$out_len" --json "$out/$1.json" > "$out/$1.log" 2>&1
  echo "$1: exit $?"; grep '^  concurrency=' "$out/$1.log"
}

# -- 2. one replica -------------------------------------------------------------------------------------------------
if has "$phases" single; then
  started=$(now)
  python3 -m loraserve serve --port 8021 --log-level warning > "$out/single_server.log" 2>&1 &
  pid=$!
  if ready=$(wait_ready http://127.0.0.1:8021/ready "$pid" 300 "$started"); then
    echo "one replica ready after ${ready}s"; echo "$ready" > "$out/startup_single.json"
    load single http://127.0.0.1:8021
  else
    echo "one replica not ready (see single_server.log)"; tail -5 "$out/single_server.log"
  fi
  stop_group "$pid"
fi

# -- 3. the cluster -------------------------------------------------------------------------------------------------
if has "$phases" cluster; then
  num_gpus=0.5; [ "${SKIP_SETUP:-0}" = 1 ] && num_gpus=0
  started=$(now)
  LORASERVE_KV_MEMORY_FRACTION=$kv_fraction python3 -m loraserve cluster --replicas 2 --num-gpus "$num_gpus" \
    --models-per-replica 8 --port 8022 --log-level warning > "$out/cluster_server.log" 2>&1 &
  pid=$!
  if ready=$(wait_ready http://127.0.0.1:8022/ready "$pid" 420 "$started"); then
    echo "cluster ready after ${ready}s"; echo "$ready" > "$out/startup_cluster.json"
    curl -s localhost:8022/info > "$out/cluster_info.json"
    load cluster http://127.0.0.1:8022
    sleep 5  # replicas send their metrics every 2 s
    curl -s localhost:8022/metrics > "$out/cluster_metrics.txt"
  else
    echo "cluster not ready (see cluster_server.log)"; tail -20 "$out/cluster_server.log"
  fi
  stop_group "$pid"
fi

# -- 4. the table ---------------------------------------------------------------------------------------------------
if [ -f "$out/single.json" ] && [ -f "$out/cluster.json" ] && [ -f "$out/cluster_metrics.txt" ]; then
  python3 bench/cluster_compare.py --single "$out/single.json" --cluster "$out/cluster.json" \
    --metrics "$out/cluster_metrics.txt" --json "$out/comparison.json" | tee "$out/table.txt"
fi
echo "total $(( $(date +%s) - t0 ))s"
