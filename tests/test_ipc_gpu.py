"""Colocated on one GPU: the transformers engine takes the trainer's weights by CUDA IPC handle.

The user's path (driver.py, 1 trainer and 1 engine on the same GPU, `weight_sync.backend` auto
resolving to ipc): with `weight_sync.verify` every sync compares bit-exact checksums of both
sides, and the task must be learned, which it would not be if the engine kept stale weights.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_colocated_engine_takes_weights_by_cuda_ipc_and_learns(tmp_path):
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "run"
    flags = ["--train.num_workers", "1", "--rollout.num_engines", "1", "--num_steps", "60"]
    flags += ["--placement.colocate", "true", "--weight_sync.backend", "ipc"]
    flags += ["--weight_sync.verify", "true", "--placement.cpus_per_bundle", "1"]
    flags += ["--logging.progress_bar", "false", "--logging.output_dir", str(out)]
    subprocess.run(
        [sys.executable, "driver.py", *flags], cwd=REPO, env=env, check=True, timeout=300
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_eval_accuracy"] >= 0.9
    assert summary["weight_version"] == 60
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "time/sync" in m]
    assert steps[0]["mismatch/logprob_abs_diff_mean"] < 1e-4
    assert all(m["weight_version"] == i + 1 for i, m in enumerate(steps))
