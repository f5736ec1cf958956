#!/usr/bin/env bash
# FP8 rollouts on one GPU (H100 / H200), behind bench/RESULTS.md "FP8 rollouts": the `gpu`
# tests of the transformers FP8 engine and of the fp8 loop, then bench/bench_fp8.py
# (quantization vs copy bandwidth, fp8 vs bf16 sync cost, fp8 vs bf16 rollout log-probs) and
# bench/bench_fp8_loop.py (the driver's job with bf16, then fp8 rollouts). Without uv; needs
# ray from .whl and math-verify from .whl-extra (see bench/run_gpu.sh).
#   usage, from the repository root, carrying .whl and .whl-extra:
#     OUT=/some/dir [BENCH_FLAGS=--no-compile] bench/run_gpu_fp8.sh [tests bench loop]  (~8 min)
# Writes into $OUT: env.txt, tests.log, bench.log, bench_fp8.json, loop.log, bench_fp8_loop.json.
set -uo pipefail
OUT=${OUT:?set OUT to an output folder}
source bench/gpu_env.sh && gpu_env .whl-extra/*.whl
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
  python3 -c 'import torch, transformers, importlib.util as u
print("torch", torch.__version__, "transformers", transformers.__version__,
      "kernels", u.find_spec("kernels") is not None, "accelerate", u.find_spec("accelerate") is not None)'
} 2>&1 | tee "$OUT/env.txt"

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $* (limit ${limit}s)" | tee -a "$OUT/$name.log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  echo "=== exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}
run_tests() {
  step tests 300 python3 -m pytest -p no:cacheprovider -q -rs -s tests/test_fp8_gpu.py \
    tests/test_fp8.py tests/test_fp8_loop_gpu.py
}
run_bench() { step bench 330 python3 -m bench.bench_fp8 --out "$OUT" ${BENCH_FLAGS:-}; }
run_loop() { step loop 300 python3 -m bench.bench_fp8_loop --out "$OUT"; }

for name in "${@:-tests bench loop}"; do
  for one in $name; do "run_$one"; done
done
