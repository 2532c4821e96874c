#!/usr/bin/env bash
# The server process's CPU time under one closed-loop level on CPU, with the engine in its own process: what the
# HTTP side costs per request and per streamed token, for an A/B against an older checkout
# (`git worktree add /tmp/before <commit>`). The tiny model and its adapters come from bench.hardening's world
# (`python -c "from bench.hardening.world import build_world; from pathlib import Path; build_world(Path('/tmp/abw'))"`).
#
#   bash bench/ab_server_cpu.sh CHECKOUT [WORLD_DIR]    (ROUTE completions, LEVEL 64, REQS 512, OUTLEN 128)
#
# Prints bench/serving.py's row and the server process's CPU seconds (utime + stime from /proc) over the level.
# On a 2-core machine the client, the server and the engine process share the cores: read the client's TTFT tail
# with care (bench/results/cpu-2026-12-08-b/NOTES.md).
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
checkout=${1:?usage: bench/ab_server_cpu.sh CHECKOUT [WORLD_DIR]}
world=${2:-/tmp/abw}
port=${PORT:-8411}
. "$repo/.venv/bin/activate"
adapters=$(python -c "import json, os; d = sorted(os.listdir('$world/adapters'))[:8]; print(json.dumps({f'a{i}': p for i, p in enumerate(d)}))")
(cd "$checkout" && HF_HUB_OFFLINE=1 LORASERVE_BASE_MODEL=$world/model LORASERVE_ADAPTER_ROOT=$world/adapters \
  LORASERVE_ADAPTERS="$adapters" LORASERVE_MAX_RUNNING=64 LORASERVE_MAX_QUEUE=256 LORASERVE_MAX_CONTEXT=512 \
  LORASERVE_ENGINE_PROCESS=on LORASERVE_PORT=$port python -m loraserve serve --log-level warning > /tmp/ab-server-cpu.log 2>&1 &)
for _ in $(seq 120); do curl -sf "localhost:$port/ready" >/dev/null && break; sleep 0.5; done
server=$(lsof -t -i ":$port" -sTCP:LISTEN | head -1)
cpu() { awk '{print $14 + $15}' "/proc/$server/stat"; }
before=$(cpu)
python "$repo/bench/serving.py" --url "http://127.0.0.1:$port" --adapters a0,a1,a2,a3,a4,a5,a6,a7 \
  --route "${ROUTE:-completions}" --concurrency "${LEVEL:-64}" --requests "${REQS:-512}" --input-len 32 \
  --output-len "${OUTLEN:-128}" --warmup 0 --seed 0 --json /tmp/ab-server-cpu.json 2>&1 | grep -E "^concurrency|errors"
echo "server process CPU: $(python -c "import os; print(round(($(cpu) - $before) / os.sysconf('SC_CLK_TCK'), 2))") s"
kill "$server" 2>/dev/null; sleep 2
