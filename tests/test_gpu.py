"""The loop on GPUs: NCCL training group, NCCL weight broadcast, and a clean shutdown."""

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
    pytest.mark.skipif(
        torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (one trainer, one engine)"
    ),
]


def test_disaggregated_job_learns_over_nccl_and_exits(tmp_path):
    """1 trainer and 1 engine on separate GPUs: weights go over NCCL; the run ends cleanly."""
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "run"
    flags = ["--train.num_workers", "1", "--rollout.num_engines", "1", "--num_steps", "60"]
    flags += ["--placement.cpus_per_bundle", "1", "--logging.progress_bar", "false"]
    subprocess.run(
        [sys.executable, "driver.py", *flags, "--logging.output_dir", str(out)],
        cwd=REPO,
        env=env,
        check=True,
        timeout=300,  # a hang in shutdown fails here
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_eval_accuracy"] >= 0.9
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "time/sync" in m]
    assert steps[0]["mismatch/logprob_abs_diff_mean"] < 1e-4
    assert steps[-1]["sync/bytes"] > 0
