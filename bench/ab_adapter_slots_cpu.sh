#!/usr/bin/env bash
# A/B on CPU, more adapters than device slots: 8 adapters, ADAPTER_SLOTS=2, Zipf choice, against an older checkout
# (e.g. `git worktree add /tmp/before <commit>`) and this one, twice each in turns. The tiny model and 12 random
# adapters come from bench.hardening's world (`python -c "from bench.hardening.world import build_world;
# from pathlib import Path; build_world(Path('/tmp/abw'))"`).
# Usage: bench/ab_adapter_slots_cpu.sh BEFORE_WORKTREE [WORLD_DIR]   (LEVELS, default 8,16)
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
world=${2:-/tmp/abw}
. "$repo/.venv/bin/activate"
names=$(python -c "print(','.join(f'a{i}' for i in range(8)))")
adapters=$(python -c "import json; d=sorted(__import__('os').listdir('$world/adapters'))[:8]; print(json.dumps({f'a{i}': p for i, p in enumerate(d)}))")
run() { # dir port label
  (cd "$1" && HF_HUB_OFFLINE=1 LORASERVE_BASE_MODEL=$world/model LORASERVE_ADAPTER_ROOT=$world/adapters \
    LORASERVE_ADAPTERS="$adapters" LORASERVE_ADAPTER_SLOTS=2 LORASERVE_MAX_ADAPTERS=16 LORASERVE_MAX_RUNNING=16 \
    LORASERVE_PORT=$2 python -m loraserve serve --log-level warning > /tmp/ab-slots-$3.log 2>&1 &)
  for _ in $(seq 120); do curl -sf "localhost:$2/ready" >/dev/null && break; sleep 0.5; done
  python "$repo/bench/serving.py" --url "http://127.0.0.1:$2" --adapters "$names" --adapter-dist zipf --zipf-s 1.1 \
    --concurrency "${LEVELS:-8,16}" --requests 96 --input-len 32 --output-len 48 --warmup 4 --seed 0 \
    --json "/tmp/ab-slots-$3.json" 2>&1 | tail -4
  kill $(lsof -t -i ":$2" 2>/dev/null) 2>/dev/null; sleep 2
}
echo "== before"; run "$1" 8311 before
echo "== after";  run "$repo" 8312 after
echo "== before (again)"; run "$1" 8313 before2
echo "== after (again)";  run "$repo" 8314 after2
