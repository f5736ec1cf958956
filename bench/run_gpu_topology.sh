#!/usr/bin/env bash
# The seed's 8-GPU topology at small scale (bench/topology.py's model: Qwen3-30B-A3B's widths,
# LAYERS layers): Megatron TP + sequence parallel, EP, ETP1, distributed optimizer with CPU
# Adam, colocated with one transformers engine per GPU, a weight sync after every step, STEPS
# GRPO steps of the built-in task; then bench/bench_megatron.py on the same model and layout
# (MFU against the card's measured matrix rate, peak memory, export against a raw NCCL
# broadcast of the same bytes). Without uv or ray on the machine, as bench/run_gpu.sh.
#   usage, from the repository root, carrying .whl and .whl-extra (see bench/run_gpu.sh):
#     OUT=/some/dir bench/run_gpu_topology.sh                      # 8 GPUs: TP4, EP8
#     OUT=/some/dir GPUS=4 TP=2 EP=4 bench/run_gpu_topology.sh     # 4 GPUs
#     OUT=/some/dir GPUS=1 TP=1 EP=1 LAYERS=2 STEPS=6 bench/run_gpu_topology.sh   # smoke
#     ... bench/run_gpu_topology.sh [model loop bench]              (default: all three)
# Writes into $OUT: env.txt, model.log, loop.log, loop_metrics.jsonl, loop_summary.json,
# loop_steps.md, bench.log, megatron_bench.json.
set -uo pipefail
OUT=${OUT:?set OUT to an output folder}
GPUS=${GPUS:-8} TP=${TP:-4} EP=${EP:-8} LAYERS=${LAYERS:-8} STEPS=${STEPS:-20}
source bench/gpu_env.sh && gpu_env .whl/megatron_core-*.whl .whl-extra/*.whl
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc
  free -g | head -2
  echo "GPUS=$GPUS TP=$TP EP=$EP LAYERS=$LAYERS STEPS=$STEPS"
} 2>&1 | tee "$OUT/env.txt"

sp=() && [ "$TP" -gt 1 ] && sp=(--sequence-parallel)
layout=tp$TP${sp:+-sp}-ep$EP

run_model() { step model 300 python3 bench/topology.py /tmp/topology_model --layers "$LAYERS"; }
run_loop() {
  step loop "${LOOP_LIMIT:-900}" python3 driver.py --model.hf_checkpoint /tmp/topology_model \
    --model.dtype bfloat16 --train.backend megatron --train.num_workers "$GPUS" \
    --tensor-model-parallel-size "$TP" "${sp[@]}" --expert-model-parallel-size "$EP" \
    --expert-tensor-parallel-size 1 --use-distributed-optimizer --optimizer-cpu-offload \
    --overlap-cpu-optimizer-d2h-h2d --use-precision-aware-optimizer \
    --rollout.num_engines "$GPUS" --placement.colocate true --placement.cpus_per_bundle 1 \
    --weight_sync.bucket_size_mb 512 \
    --num_steps "$STEPS" --logging.eval_every 0 --logging.save_final_model false \
    --logging.output_dir /tmp/topology_run --logging.progress_bar false
  cp /tmp/topology_run/metrics.jsonl "$OUT/loop_metrics.jsonl"
  cp /tmp/topology_run/summary.json "$OUT/loop_summary.json"
  python3 bench/summarize_run.py /tmp/topology_run/metrics.jsonl | tee "$OUT/loop_steps.md"
}
run_bench() {
  step bench "${BENCH_LIMIT:-600}" python3 -m torch.distributed.run --nproc-per-node "$GPUS" \
    bench/bench_megatron.py --model topology --layers "$LAYERS" \
    --layouts "$layout-cpuadam,$layout" --steps 3 --warmup 1 --out "$OUT"
}

for name in "${@:-model loop bench}"; do
  for one in $name; do "run_$one"; done
done
