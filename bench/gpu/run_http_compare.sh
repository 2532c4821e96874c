#!/usr/bin/env bash
# Our server against vLLM's OpenAI server over HTTP, same files, one device call:
#
#   bash bench/gpu/run_http_compare.sh OUT_DIR
#
# 1. files: the random Llama-3-8B shape and 8 rank-16 adapters (build_8b_server_files.py, --tokenizer full-vocab:
#    every generated token is text, so every token is a chunk on the OpenAI routes); kept in $FILES for a later
#    call while the machine stays warm
# 2. ours: start-up (process start to /ready 200); bench/serving.py on the native route, greedy and sampled, at
#    $LEVELS; then vLLM's own client (`bench serve`, http_compare.py) against our /v1/completions and
#    /v1/chat/completions, greedy (temperature 0) and sampled (temperature 1, top_p 0.95)
# 3. vLLM's OpenAI server on the same files (../shared/gpu/vllm/README.md's command): start-up to /v1/models 200,
#    the same client runs
# 4. a table (http_compare.py table), also in OUT_DIR/table.txt; every result as JSON in OUT_DIR. The files of
#    two calls (PHASES=ours, then PHASES=vllm) do not collide: copied into one folder, `python3
#    bench/gpu/http_compare.py table DIR` prints the whole comparison.
#
# 128-token prompts, exactly 128 new tokens (ignore_eos), adapters round-robin, 2 x concurrency prompts (at least
# 8) per level. Time-bounded: the whole script within BUDGET_S (540); our phases stop early enough to leave
# VLLM_RESERVE_S (240) for vLLM's; a run that would start past its phase's end is recorded as skipped.
# Overrides: PHASES (ours,vllm), LEVELS (1,8,32,64), ROUTES (completions,chat), SAMPLING (greedy,sampled),
# TOKENIZER (full-vocab | tiny), FILES, BACKEND (transformers), MIN_PROMPTS (8), PER_STREAM (2).
set -uo pipefail
set -m  # each background server leads a process group of its own (pgid = $!): stopped with whatever it started
out=${1:?usage: bash bench/gpu/run_http_compare.sh OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
t0=$(date +%s)
budget=${BUDGET_S:-540}
phases=${PHASES:-ours,vllm}
levels=${LEVELS:-1,8,32,64}
routes=${ROUTES:-completions,chat}
sampling=${SAMPLING:-greedy,sampled}
tokenizer=${TOKENIZER:-full-vocab}
files=${FILES:-/tmp/serve8b_$tokenizer}
min_prompts=${MIN_PROMPTS:-8}
per_stream=${PER_STREAM:-2}
adapters=a0,a1,a2,a3,a4,a5,a6,a7
vllm_env=${VLLM_ENV:-/tmp/vllm_env.sh}
has() { [[ ",$1," == *",$2,"* ]]; }
reserve=0; has "$phases" vllm && has "$phases" ours && reserve=${VLLM_RESERVE_S:-240}
now() { date +%s.%N; }
left() { echo $(( t0 + budget - $(date +%s) )); }
ours_left() { echo $(( $(left) - reserve )); }
cap() { local a=$1 b=$2; echo $(( a < b ? a : b )); }
# NAME SECONDS|'"REASON"': a file per server, so that the OUT_DIRs of two calls (PHASES=ours, PHASES=vllm) merge
startup() { echo "$2" > "$out/startup_$1.json"; }

[ "${SKIP_SETUP:-0}" = 1 ] || source bench/gpu/setup.sh  # SKIP_SETUP=1: a CPU dry run of the script itself

# -- 1. files -------------------------------------------------------------------------------------------------------
if [ ! -f "$files/.complete" ]; then
  rm -rf "$files"
  python3 bench/gpu/build_8b_server_files.py --out "$files" --adapters 8 --tokenizer "$tokenizer" 2>&1 \
    | grep -v '^Loading\|Writing'
  [ "${PIPESTATUS[0]}" = 0 ] && touch "$files/.complete" || { echo "building the files failed"; exit 1; }
fi
# vLLM's chat route needs a template and the tokenizer has none (ours renders its Alpaca default instead)
printf '%s\n' "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}" "{% endfor %}assistant:" \
  > "$files/chat_template.jinja"

wait_ready() {  # URL PID LIMIT_S STARTED: prints seconds from STARTED to the first 200, or fails
  local deadline=$(( $(date +%s) + $3 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    curl -sf -o /dev/null "$1" && { awk -v a="$4" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; return 0; }
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.5
  done
  return 1
}
stop_group() {  # PGID: SIGTERM to the server's process group, SIGKILL after 20 s
  kill -TERM -- "-$1" 2>/dev/null
  for _ in $(seq 1 40); do kill -0 -- "-$1" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL -- "-$1" 2>/dev/null; sleep 2
}
# vLLM's environment, as its README runs it: PYTHONPATH cleared first (the env file prepends to it), then sourced
in_vllm_env=(env -u PYTHONPATH bash -c 'source "$0" && export VLLM_USE_FLASHINFER_SAMPLER=0 && exec "$@"' "$vllm_env")
bench_serve() {  # LABEL URL DEADLINE: vLLM's client, every route x sampling x level, no run starting past DEADLINE
  local limit=$(( $3 - $(date +%s) + 30 ))
  [ "$limit" -gt 40 ] || { echo "bench serve $1: no time left"; return; }
  timeout "$limit" "${in_vllm_env[@]}" python3 bench/gpu/http_compare.py bench-serve --label "$1" --base-url "$2" \
    --tokenizer "$files/model" --lora-modules "$adapters" --endpoints "$routes" --sampling "$sampling" \
    --levels "$levels" --prompts-per-stream "$per_stream" --min-prompts "$min_prompts" --run-timeout 120 \
    --deadline "$3" --out "$out" > "$out/bench_serve_$1.log" 2>&1
  grep '^bench serve' "$out/bench_serve_$1.log"
}

# -- 2. ours --------------------------------------------------------------------------------------------------------
if has "$phases" ours; then
  started=$(now)
  LORASERVE_BASE_MODEL=$files/model LORASERVE_BASE_MODEL_NAME=base LORASERVE_ADAPTER_ROOT=$files/adapters \
    LORASERVE_ADAPTERS="$(python3 -c "import json; print(json.dumps({f'a{i}': f'a{i}' for i in range(8)}))")" \
    LORASERVE_MAX_RUNNING=64 LORASERVE_MAX_CONTEXT=1024 LORASERVE_BACKEND=${BACKEND:-transformers} \
    LORASERVE_DRAIN_SECONDS=2 python3 -m loraserve serve --port 8011 --log-level info > "$out/ours_server.log" 2>&1 &
  ours=$!
  if ready=$(wait_ready http://127.0.0.1:8011/ready "$ours" "$(cap 300 "$(ours_left)")" "$started"); then
    echo "ours ready after ${ready}s"; startup ours "$ready"
    python3 -m bench.startup_split "$out/ours_server.log" --total "$ready" | tee "$out/startup_split.txt"  # where it went
    curl -s localhost:8011/info > "$out/ours_info.json"
    for mode in ${sampling//,/ }; do
      limit=$(cap 240 "$(ours_left)")
      [ "$limit" -ge 30 ] || { echo "native $mode: skipped (time)"; continue; }
      flag=""; [ "$mode" = sampled ] && flag=--sampled
      timeout "$limit" python3 bench/serving.py --url http://127.0.0.1:8011 --adapters $adapters $flag \
        --adapter-dist round-robin --concurrency "$levels" --requests "$min_prompts" \
        --requests-per-stream "$per_stream" --warmup 8 --input-len 128 --output-len 128 \
        --json "$out/native_$mode.json" > "$out/native_$mode.log" 2>&1
      echo "native $mode: exit $?"; grep '^  concurrency=' "$out/native_$mode.log"
    done
    bench_serve ours http://127.0.0.1:8011 $(( t0 + budget - reserve ))
  else
    echo "ours not ready (see ours_server.log)"; startup ours '"not ready"'; tail -5 "$out/ours_server.log"
  fi
  stop_group "$ours"
fi

# -- 3. vLLM --------------------------------------------------------------------------------------------------------
if has "$phases" vllm; then
  if [ ! -f "$vllm_env" ]; then
    echo "no $vllm_env: install vLLM first (../shared/gpu/vllm/README.md)"; startup vllm '"not installed"'
  else
    nvidia-smi --query-gpu=memory.used --format=csv,noheader
    loras=(); for i in 0 1 2 3 4 5 6 7; do loras+=("a$i=$files/adapters/a$i"); done
    started=$(now)
    "${in_vllm_env[@]}" python3 -m vllm.entrypoints.openai.api_server --model "$files/model" \
      --served-model-name base --enable-lora --lora-modules "${loras[@]}" --max-loras 8 --max-lora-rank 16 \
      --max-cpu-loras 8 --max-model-len 1024 --max-num-seqs 64 --no-enable-prefix-caching --port 8001 \
      --chat-template "$files/chat_template.jinja" --chat-template-content-format string \
      > "$out/vllm_server.log" 2>&1 &
    vllm=$!
    if ready=$(wait_ready http://127.0.0.1:8001/v1/models "$vllm" "$(cap 300 $(( $(left) - 60 )))" "$started"); then
      echo "vllm ready after ${ready}s"; startup vllm "$ready"
      bench_serve vllm http://127.0.0.1:8001 $(( t0 + budget - 20 ))
    else
      echo "vllm not ready (see vllm_server.log)"; startup vllm '"not ready"'; tail -5 "$out/vllm_server.log"
    fi
    stop_group "$vllm"
  fi
fi

# -- 4. the table ---------------------------------------------------------------------------------------------------
python3 bench/gpu/http_compare.py table "$out" | tee "$out/table.txt"
echo "total $(( $(date +%s) - t0 ))s"
