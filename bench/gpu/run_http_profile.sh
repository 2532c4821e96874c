#!/usr/bin/env bash
# Where our server's host time goes under HTTP load on the 8B shape: its start-up split, then bench/serving.py
# at $LEVEL streams on each route in $ROUTES (round-robin over 8 adapters) with, for the first route, py-spy
# (--gil: only samples that hold the GIL) over the server's threads and its engine process's, and for every route
# the CPU time of the event loop's thread and of the engine's thread per generated token (/proc, no profiler
# attached). LORASERVE_ENGINE_PROCESS=off profiles the engine in the server's process.
#
#   bash bench/gpu/run_http_profile.sh OUT_DIR        (needs the py-spy wheel in .whl/)
#
# Prints, per route: tok/s, event loop µs/token and % busy, engine thread µs/token and % busy; then the two
# threads' py-spy summaries (bench/pyspy_summary.py). ~4 min with the 8B files built (~45 s more without).
set -uo pipefail
out=${1:?usage: bash bench/gpu/run_http_profile.sh OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
level=${LEVEL:-64}
routes=${ROUTES:-completions,chat}
files=${FILES:-/tmp/serve8b_full-vocab}
port=8011
work=$(mktemp -d)  # the clients' own files: the device tool brings back few files, so $out keeps the summaries
[ "${SKIP_SETUP:-0}" = 1 ] || source bench/gpu/setup.sh
spy=${PYSPY:-/tmp/pyspy/bin/py-spy}
[ -x "$spy" ] || pip install -q --no-deps --target /tmp/pyspy .whl/py_spy-*.whl 2>&1 | tail -1

if [ ! -f "$files/.complete" ]; then
  rm -rf "$files"
  python3 bench/gpu/build_8b_server_files.py --out "$files" --adapters 8 --tokenizer full-vocab 2>&1 \
    | grep -v '^Loading\|Writing'
  [ "${PIPESTATUS[0]}" = 0 ] && touch "$files/.complete" || { echo "building the files failed"; exit 1; }
fi

started=$(date +%s.%N)
LORASERVE_BASE_MODEL=$files/model LORASERVE_BASE_MODEL_NAME=base LORASERVE_ADAPTER_ROOT=$files/adapters \
  LORASERVE_ADAPTERS="$(python3 -c "import json; print(json.dumps({f'a{i}': f'a{i}' for i in range(8)}))")" \
  LORASERVE_MAX_RUNNING=64 LORASERVE_MAX_CONTEXT=1024 LORASERVE_BACKEND=${BACKEND:-transformers} \
  python3 -m loraserve serve --port $port --log-level info > "$out/server.log" 2>&1 &
server=$!
for _ in $(seq 1 300); do curl -sf -o /dev/null localhost:$port/ready && break; sleep 0.5; done
echo "ready after $(python3 -c "import time; print(round(time.time() - $started, 1))") s"
grep -hoE '(model loaded|engine state|warm-up:|ready:|ready after).*' "$out/server.log"

tokens() { curl -s localhost:$port/metrics | awk '/^loraserve_generated_tokens_total/ {s += $2} END {print s + 0}'; }
ticks() { awk '{print $14 + $15}' "$1/stat"; }  # a thread's CPU time (utime + stime), in clock ticks
busiest_other() {  # the engine's worker: the busiest thread, bar the event loop's, of the server or its children
  local pids="$server $(cat /proc/$server/task/*/children 2>/dev/null)"
  for pid in $pids; do
    for t in /proc/$pid/task/*; do [ "${t##*/}" = "$server" ] || echo "$(ticks "$t") $t"; done
  done | sort -rn | head -1 | cut -d' ' -f2
}
first=1
for route in ${routes//,/ }; do
  for mode in ${SAMPLING:-greedy}; do
    flag=""; [ "$mode" = sampled ] && flag=--sampled
    python3 bench/serving.py --url http://127.0.0.1:$port --route "$route" $flag --adapters a0,a1,a2,a3,a4,a5,a6,a7 \
      --adapter-dist round-robin --concurrency "$level" --duration 24 --warmup 8 --input-len 128 --output-len 128 \
      --json "$work/${route}_$mode.json" > "$work/${route}_$mode.log" 2>&1 &
    client=$!
    sleep 8
    engine=$(busiest_other)
    t0=$(tokens); m0=$(ticks "/proc/$server/task/$server"); e0=$(ticks "$engine"); s0=$(date +%s.%N)
    if [ $first = 1 ]; then
      "$spy" record --pid "$server" --subprocesses --threads --gil -r 200 -d 12 --format raw -o "$work/spy_raw.txt" > /dev/null 2>&1
    else
      sleep 12
    fi
    t1=$(tokens); m1=$(ticks "/proc/$server/task/$server"); e1=$(ticks "$engine"); s1=$(date +%s.%N)
    wait $client
    python3 -c "
tok, dt, hz = $t1 - $t0, $s1 - $s0, $(getconf CLK_TCK)
loop, eng = ($m1 - $m0) / hz, ($e1 - $e0) / hz
print(f'$route $mode c=$level: {tok / dt:.0f} tok/s; event loop {loop * 1e6 / tok:.1f} us/token ({100 * loop / dt:.0f}% busy); '
      f'engine thread {eng * 1e6 / tok:.1f} us/token ({100 * eng / dt:.0f}% busy)' + ('  [py-spy attached]' if $first else ''))
" | tee -a "$out/threads.txt"
    grep -E '^concurrency' "$work/${route}_$mode.log" | tee -a "$out/threads.txt"
    first=0
  done
done
kill $server; wait $server 2>/dev/null
if [ -f "$work/spy_raw.txt" ]; then
  awk '{n = $NF; split($0, a, ";"); k = (a[1] ~ /^process/) ? a[1] " " a[2] : a[1]; t[k] += n}
       END {for (k in t) print t[k], "samples holding the GIL:", k}' \
    "$work/spy_raw.txt" | sort -rn | tee "$out/pyspy_threads.txt"
  python3 -m bench.pyspy_summary "$work/spy_raw.txt" --top 45 > "$out/pyspy_engine.txt"
  python3 -m bench.pyspy_summary "$work/spy_raw.txt" --thread "Server.run (server.py" --top 60 > "$out/pyspy_loop.txt"
  head -50 "$out/pyspy_engine.txt"; head -70 "$out/pyspy_loop.txt"
fi
