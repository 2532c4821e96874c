set -uo pipefail
TAG=ours_only METHODS=ours SCENARIOS=bs1,streams64 timeout 200 bash bench/gpu/run_engine_bench.sh | tail -12
python3 -c "import json,os,sys; e=json.load(open(os.environ['OUT']+'/ours_only.json'))['methods']['ours']['error']; print('ours error:', e); sys.exit(1 if e else 0)" || exit 3
timeout 400 bash bench/gpu/run_engine_bench.sh | tail -22
