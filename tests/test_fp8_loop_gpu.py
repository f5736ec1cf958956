"""bf16 training with fp8 rollouts on one GPU, down the user's path.

`tools/convert_hf_to_fp8.py` makes the FP8 rollout checkpoint of a bf16 Qwen3-MoE (the tiny
model widened to 128-aligned matrices, `models.tiny.fp8_gemm_config`), and `driver.py` trains
the bf16 twin (with the torch backend, and with Megatron as the seed does) while the colocated
transformers engine samples from fp8 weights, quantized at every sync and taken by CUDA IPC,
multiplying with cuBLAS's block fp8 GEMM; TIS is on by default. `weight_sync.verify` compares
bit-exact checksums of the fp8 weights on both sides after every sync. The figures against a
bf16 rollout run are bench/bench_fp8_loop.py's.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.tiny import build_tiny_model, fp8_gemm_config, save_tiny_model
from tools import convert_hf_to_fp8

REPO = Path(__file__).resolve().parent.parent
STEPS = 16

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
        reason="needs a CUDA GPU of compute capability >= 9.0 (cuBLAS's block fp8 GEMM)",
    ),
]


@pytest.mark.parametrize("backend", ["torch", "megatron"])
def test_bf16_training_with_fp8_rollouts_through_the_transformers_engine(tmp_path, backend):
    if backend == "megatron" and importlib.util.find_spec("megatron.core") is None:
        pytest.skip("the Megatron backend needs megatron-core (uv sync installs it)")
    bf16, fp8, out = tmp_path / "bf16", tmp_path / "fp8", tmp_path / "run"
    save_tiny_model(bf16, 0, fp8_gemm_config())
    assert convert_hf_to_fp8.run(["--hf-checkpoint", str(bf16), "--save", str(fp8)]) == 0
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    flags = ["--hf-checkpoint", str(fp8), "--model.train_checkpoint", str(bf16)]
    flags += ["--train.backend", backend, "--model.dtype", "bfloat16", "--num_steps", str(STEPS)]
    flags += ["--train.num_workers", "1", "--rollout.num_engines", "1"]
    flags += ["--placement.colocate", "true", "--weight_sync.verify", "true"]
    flags += ["--placement.cpus_per_bundle", "1", "--logging.progress_bar", "false"]
    flags += ["--logging.output_dir", str(out)]
    run = subprocess.run(
        [sys.executable, "driver.py", *flags],
        cwd=REPO,
        env=env,
        timeout=400,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "fp8 rollouts: weights quantized to e4m3 in 128x128 blocks" in run.stdout + run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weight_version"] == STEPS
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "time/sync" in m]
    assert [m["weight_version"] for m in steps] == list(range(1, STEPS + 1))
    # fp8 arrived: fewer bytes than the bf16 weights, and rollouts visibly off-policy (a bf16
    # engine is within 1e-4 of the trainer: tests/test_ipc_gpu.py), corrected by TIS.
    bf16_bytes = 2 * sum(
        p.numel() for p in build_tiny_model(0, config=fp8_gemm_config()).parameters()
    )
    assert all(m["sync/bytes"] < 0.8 * bf16_bytes for m in steps)
    mismatch = [m["mismatch/logprob_abs_diff_mean"] for m in steps]
    print(f"fp8 rollouts: mean |dlogp| per step {[round(v, 4) for v in mismatch]}")
    assert all(1e-3 < v < 0.5 for v in mismatch)
    assert all(0 <= m["mismatch/tis_clip_fraction"] < 0.5 for m in steps)
    assert all(m["mismatch/tis_weight_mean"] > 0.5 for m in steps)
