#!/usr/bin/env bash
# The GPU benchmark session behind bench/RESULTS.md, on a 2-GPU machine without uv or ray.
#   usage, from the repository root:
#     ../shared/device/pack-wheels.sh            # ray (+ megatron-core) -> .whl/
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl-extra \
#       math-verify==0.9.0 latex2sympy2-extended==1.11.0 antlr4-python3-runtime==4.13.2
#     then on the GPU machine, carrying .whl and .whl-extra:
#     OUT=/some/dir bench/run_gpu.sh [ws driver so ws_bf16 os]     (default: all, in this order)
# Writes at most 8 files into $OUT: env.txt, ws.log, driver.log, summary.json, metrics.jsonl,
# so.log, os.log. Each step has its own time limit, so one hang does not eat the others' time.
# rl/rewards.py imports math_verify at module level, so the driver needs .whl-extra there.
set -uo pipefail
OUT=${OUT:?set OUT to an output folder}
source bench/gpu_env.sh && gpu_env .whl/megatron_core-*.whl .whl-extra/*.whl

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvidia-smi topo -m
  nproc
  python3 -c 'import torch, ray, transformers, pyarrow, numpy
print("torch", torch.__version__, "nccl", torch.cuda.nccl.version(), "ray", ray.__version__,
      "transformers", transformers.__version__, "pyarrow", pyarrow.__version__,
      "numpy", numpy.__version__)'
} 2>&1 | tee "$OUT/env.txt"

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log (appending)
  local name=$1 limit=$2
  shift 2
  echo "=== $* (limit ${limit}s)" | tee -a "$OUT/$name.log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  echo "=== exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
  # a timed-out step must not leave its cluster behind (the device machine is ours alone)
  python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
}

run_ws() { step ws 120 python3 -m bench.bench_weight_sync --device cuda; }
run_driver() {
  step driver 200 python3 driver.py --train.num_workers 1 --rollout.num_engines 1 \
    --placement.cpus_per_bundle 1 --num_steps 60 --rollout.max_new_tokens 2 \
    --logging.output_dir /tmp/gpu_run --logging.progress_bar false
  cp /tmp/gpu_run/summary.json /tmp/gpu_run/metrics.jsonl "$OUT/"
}
run_so() {
  step so 120 python3 -m bench.bench_step_overhead --set train.num_workers=1 \
    --set rollout.num_engines=1 --set placement.cpus_per_bundle=1 --set rollout.max_new_tokens=2
}
run_ws_bf16() {
  step ws 90 python3 -m bench.bench_weight_sync --device cuda --dtype bfloat16 \
    --models 100m $(grep -q '"1b"' bench/bench_weight_sync.py && echo 1b)
}
run_os() { step os 45 python3 -m bench.bench_object_store; }

# Most wanted first; the default limits add up to under the device tool's 10 minutes a command.
for name in "${@:-ws driver so ws_bf16 os}"; do
  for one in $name; do "run_$one"; done
done
