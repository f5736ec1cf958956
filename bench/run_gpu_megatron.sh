#!/usr/bin/env bash
# The Megatron GPU session behind bench/RESULTS.md ("Megatron backend"), without uv or ray.
# On 4 GPUs the 2 training ranks and 2 engines take distinct GPUs (weights go over NCCL); on
# 2 GPUs set LOOP_FLAGS="--placement.colocate true" (engines share the trainers' GPUs; weights
# then go over gloo, and bench/bench_megatron.py measures the NCCL export path instead).
#   usage, from the repository root, carrying .whl and .whl-extra (see bench/run_gpu.sh):
#     OUT=/some/dir [LOOP_FLAGS=...] bench/run_gpu_megatron.sh [tp2 ep2_cpuadam nccl bench]
# Writes into $OUT: env.txt, <step>.log, <step>_summary.json, <step>_metrics.jsonl,
# megatron_bench.json.
set -uo pipefail
OUT=${OUT:?set OUT to an output folder}
source bench/gpu_env.sh && gpu_env .whl/megatron_core-*.whl .whl-extra/*.whl
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc
} 2>&1 | tee "$OUT/env.txt"

loop() {  # loop NAME FLAGS...: the built-in task, Megatron backend, bf16, 2 trainers + 2 engines
  local name=$1
  shift
  step "$name" 160 python3 driver.py --train.backend megatron --train.num_workers 2 \
    --rollout.num_engines 2 --model.dtype bfloat16 --placement.cpus_per_bundle 1 \
    --num_steps 40 --logging.output_dir "/tmp/$name" --logging.progress_bar false \
    ${LOOP_FLAGS:-} "$@"
  cp "/tmp/$name/summary.json" "$OUT/${name}_summary.json"
  cp "/tmp/$name/metrics.jsonl" "$OUT/${name}_metrics.jsonl"
}
run_tp2() { loop tp2 --tensor-model-parallel-size 2 --sequence-parallel; }
run_ep2_cpuadam() {
  loop ep2_cpuadam --expert-model-parallel-size 2 --optimizer-cpu-offload \
    --overlap-cpu-optimizer-d2h-h2d --use-precision-aware-optimizer --save /tmp/ep2_ckpt --save-interval 20
}
run_nccl() {  # 1 trainer + 1 engine on distinct GPUs: the Megatron export over NCCL, checked
  loop nccl --train.num_workers 1 --rollout.num_engines 1 --weight_sync.verify true
}
run_bench() {
  step bench 270 python3 -m torch.distributed.run --nproc-per-node 2 bench/bench_megatron.py \
    --out "$OUT"
}

for name in "${@:-tp2 ep2_cpuadam nccl bench}"; do
  for one in $name; do "run_$one"; done
done
