"""bf16 training with fp8 rollouts against bf16 rollouts: the same job twice, on one GPU.

    python3 -m bench.bench_fp8_loop [--out DIR] [--steps 30]

The tiny model widened to 128-aligned matrices (`models.tiny.fp8_gemm_config`) is saved in
bf16 and converted by `tools/convert_hf_to_fp8.py`; `driver.py` then trains it twice from the
same seed with one colocated trainer and transformers engine (weights by CUDA IPC, checked bit
for bit after every sync): once serving rollouts from the bf16 checkpoint, once from the FP8
one (TIS on, its default). Per run it reports, over the steps after the first: the trainer
vs engine log-prob mismatch and KL, TIS's clip fraction, the sync's time, bytes and GB/s,
rollout and train time, and the last eval accuracy; then fp8 / bf16 ratios. The model is
random-init and small, so the sync figures show the fixed costs of a sync, not a 30B one
(bench/bench_fp8.py measures those at Qwen3-30B-A3B's sizes).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from models.tiny import fp8_gemm_config, save_tiny_model
from tools import convert_hf_to_fp8

REPO = Path(__file__).resolve().parent.parent
KEYS = (
    "mismatch/logprob_abs_diff_mean",
    "mismatch/logprob_abs_diff_max",
    "mismatch/kl_k3",
    "mismatch/tis_clip_fraction",
    "time/sync",
    "sync/bytes",
    "sync/gb_per_s",
    "time/rollout",
    "time/train",
)


def run_job(label: str, flags: list[str], out: Path, steps: int) -> dict:
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    common = ["--model.dtype", "bfloat16", "--num_steps", str(steps)]
    common += ["--train.num_workers", "1", "--rollout.num_engines", "1"]
    common += ["--placement.colocate", "true", "--weight_sync.verify", "true"]
    common += ["--placement.cpus_per_bundle", "1", "--logging.progress_bar", "false"]
    common += ["--logging.output_dir", str(out / "runs" / label)]
    start = time.perf_counter()
    subprocess.run([sys.executable, "driver.py", *flags, *common], cwd=REPO, env=env, check=True)
    wall = time.perf_counter() - start
    lines = (out / "runs" / label / "metrics.jsonl").read_text().splitlines()
    steps_seen = [m for m in map(json.loads, lines) if "time/sync" in m]
    summary = json.loads((out / "runs" / label / "summary.json").read_text())
    later = steps_seen[1:]  # the first step carries start-up costs
    result = {k: statistics.fmean(m[k] for m in later) for k in KEYS if all(k in m for m in later)}
    result |= {
        "steps": len(steps_seen),
        "wall_s": wall,
        "last_eval_accuracy": summary.get("last_eval_accuracy"),
        "first_step_mismatch": steps_seen[0]["mismatch/logprob_abs_diff_mean"],
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write bench_fp8_loop.json here")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8_loop needs a CUDA GPU")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        bf16, fp8 = root / "bf16", root / "fp8"
        save_tiny_model(bf16, 0, fp8_gemm_config())
        assert convert_hf_to_fp8.run(["--hf-checkpoint", str(bf16), "--save", str(fp8)]) == 0
        runs = {
            "bf16_rollouts": run_job("bf16", ["--hf-checkpoint", str(bf16)], root, args.steps),
            "fp8_rollouts": run_job(
                "fp8",
                ["--hf-checkpoint", str(fp8), "--model.train_checkpoint", str(bf16)],
                root,
                args.steps,
            ),
        }
    summary = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "model": "models.tiny.fp8_gemm_config (Qwen3-MoE, hidden 256, 4 experts), bf16",
        **runs,
        "fp8/bf16": {
            k: runs["fp8_rollouts"][k] / runs["bf16_rollouts"][k]
            for k in ("mismatch/logprob_abs_diff_mean", "time/sync", "sync/bytes", "time/rollout")
            if runs["bf16_rollouts"].get(k)
        },
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_fp8_loop.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
