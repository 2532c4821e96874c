#!/usr/bin/env bash
# A/B on CPU: the same load against an older checkout (e.g. `git worktree add /tmp/before d104ddf`) and this one.
# Usage: bench/ab_serving_cpu.sh BEFORE_WORKTREE   (base model + adapters from `loraserve demo --workdir /tmp/bench-demo`)
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
. "$repo/.venv/bin/activate"
run() { # dir port label
  (cd "$1" && HF_HUB_OFFLINE=1 LORASERVE_BASE_MODEL=/tmp/bench-demo/base LORASERVE_ADAPTER_ROOT=/tmp/bench-demo/adapters \
    LORASERVE_ADAPTERS='{"facts-en":"facts-en","facts-zh":"facts-zh"}' LORASERVE_PORT=$2 \
    python -m loraserve serve --log-level warning > /tmp/ab-$3.log 2>&1 &)
  for i in $(seq 60); do curl -sf localhost:$2/ready >/dev/null && break; sleep 0.5; done
  python "$repo/bench/serving.py" --url http://127.0.0.1:$2 --adapters facts-en,facts-zh --concurrency ${LEVELS:-1,2,4,8} \
    --requests 32 --input-len 64 --output-len 32 --warmup 2 --seed 0 --json /tmp/ab-$3.json 2>&1 | tail -7
  pkill -f "LORASERVE_PORT=$2" ; kill $(lsof -t -i :$2 2>/dev/null) 2>/dev/null; sleep 1
}
echo "== before"; run "$1" 8301 before
echo "== after";  run "$repo" 8302 after
echo "== before (again)"; run "$1" 8303 before2
echo "== after (again)";  run "$repo" 8304 after2
