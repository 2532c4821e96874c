#!/usr/bin/env bash
# HTTP+SSE against a live server on the random Llama-3-8B shape with 8 adapters (bench/serving.py),
# the same workload as the engine benchmark: 128-token prompts, 128 new tokens, adapters uniform.
set -uo pipefail
source bench/gpu/setup.sh
out=${OUT:-bench/results}
files=/tmp/serve8b
python3 bench/gpu/build_8b_server_files.py --out $files --adapters 8 2>&1 | grep -v '^Loading\|Writing'
adapters=$(python3 -c "import json; print(json.dumps({f'a{i}': f'a{i}' for i in range(8)}))")
LORASERVE_BASE_MODEL=$files/model LORASERVE_ADAPTER_ROOT=$files/adapters LORASERVE_ADAPTERS="$adapters" \
  LORASERVE_MAX_RUNNING=64 LORASERVE_MAX_CONTEXT=1024 LORASERVE_BACKEND=${BACKEND:-transformers} \
  python3 -m loraserve serve --port 8011 --log-level warning > "$out/serve8b.log" 2>&1 &
server=$!
started=$(date +%s)
for _ in $(seq 1 240); do curl -sf localhost:8011/ready > /dev/null && break; sleep 1; done
echo "server ready after $(( $(date +%s) - started ))s"
curl -s localhost:8011/info; echo
python3 bench/serving.py --url http://127.0.0.1:8011 --adapters a0,a1,a2,a3,a4,a5,a6,a7 \
  --concurrency ${LEVELS:-1,8,32,64} --duration ${DURATION:-12} --warmup 8 --input-len 128 --output-len 128 \
  --json "$out/serving_8b.json" 2>&1 | tail -20
kill $server; wait $server
