#!/usr/bin/env bash
# The Megatron speed session behind bench/RESULTS.md ("Megatron at the card's speed"): in one
# run on one machine, the plain-PyTorch ceiling of Qwen3-30B-A3B's layer shape
# (../shared/device/moe_ceiling.py, carried in .whl-extra/), then bench/bench_megatron.py on the
# topology model with megatron-core's local spec against our torch spec, Adam on the GPU and
# CPU Adam. Without uv or ray on the machine, as bench/run_gpu.sh.
#   usage, from the repository root, carrying .whl and .whl-extra (see bench/run_gpu.sh;
#   cp ../shared/device/moe_ceiling.py .whl-extra/):
#     OUT=/some/dir [GPUS=1] [LAYERS=2] [LAYOUTS=...] [PROFILE=LAYOUT,...] [MICRO_TOKENS=16384]
#       [ROWS=64] [BUCKET_MB=64] [CEILING=0] bench/run_gpu_speed.sh
# TESTS="tests/..." runs those pytest files first. Writes into $OUT: env.txt, tests.log,
# ceiling.log, bench.log, megatron_bench.json, profile_LAYOUT.txt.
set -uo pipefail
OUT=${OUT:?set OUT to an output folder}
GPUS=${GPUS:-1} LAYERS=${LAYERS:-2}
LAYOUTS=${LAYOUTS:-tp1-ep1-local,tp1-ep1,tp1-ep1-cpuadam-local,tp1-ep1-cpuadam}
source bench/gpu_env.sh && gpu_env .whl/megatron_core-*.whl .whl-extra/*.whl
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch; print("torch", torch.__version__)'
  echo "GPUS=$GPUS LAYERS=$LAYERS LAYOUTS=$LAYOUTS ROWS=${ROWS:-64}"
} 2>&1 | tee "$OUT/env.txt"

if [ "${CEILING:-1}" = 1 ]; then
  for tokens in 16384 32768; do
    step ceiling 120 python3 .whl-extra/moe_ceiling.py --layers "$LAYERS" --tokens "$tokens"
  done
fi
[ -n "${TESTS:-}" ] && step tests 300 python3 -m pytest -p no:cacheprovider -p no:warnings -q -rs $TESTS
step bench "${BENCH_LIMIT:-420}" python3 -m torch.distributed.run --nproc-per-node "$GPUS" \
  bench/bench_megatron.py --model topology --layers "$LAYERS" --layouts "$LAYOUTS" \
  --steps "${STEPS:-4}" --warmup 2 --profile "${PROFILE:-}" --rows "${ROWS:-64}" \
  --micro-tokens "${MICRO_TOKENS:-16384}" --bucket-mb "${BUCKET_MB:-64}" --out "$OUT"
