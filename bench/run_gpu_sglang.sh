#!/usr/bin/env bash
# Sluice on a real SGLang server, on the GPU machine (no uv, ray or SGLang there).
#   usage, from the repository root:
#     bench/pack_sglang_run.sh                  # -> .gpu/site.tar.xz (ray + sglang 0.5.17 + ...)
#     then on the GPU machine, carrying .gpu:
#     OUT=/some/dir bench/run_gpu_sglang.sh [tests contract packing bench long]
#     (default: tests contract packing bench)
# tests: tests/test_sglang_gpu.py (the server, bit-exact colocated updates, the loop learning
# with and without routing replay, abort). contract: the SGLang contract tests (`-m sglang`,
# written against sglang 0.5.23) run against the server's own sglang 0.5.17.
# bench: bench/bench_sglang.py (tokens/s against the transformers engine, colocated sync time,
# log-prob mismatch with and without routing replay) on the topology model.
# packing: tests/test_packing_gpu.py (issue 30's varlen attention on the card).
# long: bench/bench_megatron.py on the topology model at 2 layers (issue 30, about 4 minutes):
# 256 long-tailed rows (mean 2048, at most 8192 tokens) padded against packed and packed with
# full / selective recompute, log-prob memory chunked against unchunked at one 8192-token row
# and Qwen3's vocabulary; then Adam on the GPU against CPU Adam, without and with its host step
# overlapped with the next forward, at 64 and 512 rows of 1024.
# Writes into $OUT: env.txt, tests.log, contract.log, bench.log, bench_sglang.json, long.log,
# long/, cpuadam_64/ and cpuadam_512/ (megatron_bench.json each).
set -uo pipefail
OUT=${OUT:?set OUT to an output folder}
source bench/gpu_env.sh && gpu_env_sglang
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, ray, sglang, transformers
print("torch", torch.__version__, "ray", ray.__version__, "sglang", sglang.__version__,
      "transformers", transformers.__version__)'
} 2>&1 | tee "$OUT/env.txt"

run_tests() {
  step tests "${TESTS_LIMIT:-420}" python3 -m pytest -p no:cacheprovider -n 0 -q -rs -s \
    tests/test_sglang_gpu.py ${TESTS_K:+-k "$TESTS_K"}
  # the servers' own logs, for what the test output does not show
  find /tmp/pytest-of-* -path '*sglang*' -name '*.log' 2>/dev/null |
    tar -czf "$OUT/sglang_logs.tgz" -T - 2>/dev/null
}
run_contract() {
  step contract "${CONTRACT_LIMIT:-240}" python3 -m pytest -p no:cacheprovider -n 0 -q -rs -m sglang \
    --continue-on-collection-errors \
    tests/test_sglang_requests.py tests/test_sglang_launch.py tests/test_sglang_engine.py
}
run_packing() {  # issue 30's varlen attention against the padded path, on the card (no Ray)
  step packing "${PACKING_LIMIT:-90}" python3 -m pytest -p no:cacheprovider -n 0 -q -rs \
    tests/test_packing_gpu.py
}
run_bench() {
  step bench "${BENCH_LIMIT:-400}" python3 -m bench.bench_sglang --out "$OUT/bench_sglang.json"
}

run_long() {
  local bench=(python3 -m torch.distributed.run --standalone --nproc-per-node 1
    bench/bench_megatron.py --model topology --layers 2 --warmup 2 --steps 3)
  step long "${LONG_LIMIT:-240}" "${bench[@]}" --lengths longtail --rows 256 --logprob-memory \
    --layouts tp1-ep1,tp1-ep1-pack,tp1-ep1-pack-rcfull,tp1-ep1-pack-rcsel --out "$OUT/long"
  for rows in 64 512; do
    step long "${CPUADAM_LIMIT:-120}" "${bench[@]}" --rows "$rows" --micro-tokens 32768 \
      --layouts tp1-ep1,tp1-ep1-cpuadam,tp1-ep1-cpuadam-overlap --out "$OUT/cpuadam_$rows"
  done
}

for name in "${@:-tests contract packing bench}"; do
  for one in $name; do "run_$one"; done
done
