set -uo pipefail
TAG=ours_graphs METHODS=ours_eager,ours SCENARIOS=bs1,streams8,streams64,ttft512 timeout 150 bash bench/gpu/run_engine_bench.sh | tail -14
timeout 170 bash bench/gpu/run_serving_8b.sh 2>&1 | tail -16
tail -5 $OUT/serve8b.log
timeout 200 bash bench/gpu/run_tests.sh -k "not 4bit" 2>&1 | tail -6
