#!/usr/bin/env bash
# Training throughput on a random Llama-3-8B-shaped model: Unsloth vs plain TRL+PEFT, one process each.
set -uo pipefail
source bench/gpu/setup.sh
out=${OUT:-bench/results}
python3 bench/gpu_train_bench.py build --out /tmp/llama8b 2>&1 | tail -2
for backend in unsloth transformers; do
  timeout 240 python3 bench/gpu_train_bench.py run --backend "$backend" --model /tmp/llama8b --steps ${STEPS:-6} \
    --words ${WORDS:-300} --json "$out/train_$backend.json" > "/tmp/train_$backend.log" 2>&1
  echo "$backend exit $?"; tail -c 600 "/tmp/train_$backend.log" | tr '\r' '\n' | tail -3
done
if [ "${WITH_4BIT:-0}" = 1 ]; then
  timeout 240 python3 bench/gpu_train_bench.py run --backend unsloth --load-in-4bit --model /tmp/llama8b \
    --steps ${STEPS:-6} --words ${WORDS:-300} --json "$out/train_unsloth_4bit.json" > /tmp/train_unsloth_4bit.log 2>&1
  echo "unsloth 4bit exit $?"; tail -c 600 /tmp/train_unsloth_4bit.log | tr '\r' '\n' | tail -3
fi
python3 bench/gpu_train_bench.py table "$out"/train_*.json | tee "$out/train_table.txt"
