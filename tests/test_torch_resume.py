"""Exact resume on the torch backend, as a user runs it, with rollouts generated ahead.

One run of the built-in job (one-step-off: `algorithm.max_staleness 1`) saves at steps 2 and
4; a second run resumes from the step-2 checkpoint and must repeat steps 3 and 4 bit for bit
(model, optimizer, RNG, step counter, weight version, data position, sampling seeds, the
learning-rate schedule's place, and the rollouts of step 3, generated during step 2 by older
weights and saved with the checkpoint).
"""

import json
from pathlib import Path

import pytest
import ray
import torch

import driver
from config import UserError, load_config
from training.torch_backend import TorchBackend

VARYING = (
    "time/", "perf/", "memory/", "rollout/tokens_per_s", "rollout/generate_seconds",
    "train/compute_seconds", "sync/gb_per_s",
)  # fmt: skip
"""Metrics of the machine's speed, not of the run: they differ between any two runs."""


def run_driver(*args: str) -> None:
    """`driver.py ARGS` in this process (one Ray instance for both runs of the test)."""
    config, _ = driver.parse_args(["--logging.progress_bar", "false", *args])
    with driver.Driver(config) as run:
        run.run()


def step_metrics(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines) if "train/loss" in m}


@pytest.fixture
def ray_local():
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def test_a_resumed_run_repeats_the_uninterrupted_one_bit_for_bit(ray_local, tmp_path):
    first, resumed, checkpoints = tmp_path / "first", tmp_path / "resumed", tmp_path / "ckpt"
    common = ["--num_steps", "4", "--logging.eval_every", "0", "--algorithm.max_staleness", "1"]
    common += ["--lr-decay-style", "cosine", "--lr-warmup-iters", "2", "--min-lr", "1e-4"]
    run_driver(
        *common, "--save", str(checkpoints), "--save-interval", "2",
        "--logging.output_dir", str(first),
    )  # fmt: skip
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    step2 = checkpoints / "iter_0000002"
    files = sorted(p.name for p in step2.iterdir())
    assert files == [
        "rng_rank0.pt", "rng_rank1.pt", "rollouts_ahead", "sluice_state.json", "torch_state.pt"
    ]  # fmt: skip
    assert sorted(p.name for p in (step2 / "rollouts_ahead").iterdir()) == [
        "index.json", "step3-part0.arrow", "step3-part1.arrow"  # one per engine (and round)
    ]  # fmt: skip

    run_driver(
        *common, "--load", str(step2), "--logging.output_dir", str(resumed),
        "--logging.save_final_model", "false",
    )  # fmt: skip
    original, again = step_metrics(first), step_metrics(resumed)
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        compared = {k: v for k, v in original[step].items() if not k.startswith(VARYING)}
        assert "train/loss" in compared and "rollout/reward_mean" in compared
        assert {k: again[step][k] for k in compared} == compared, step
        assert compared["async/version_lag"] == 1  # trained on the previous version's samples
    assert original[3]["train/lr"] > original[4]["train/lr"] == 1e-4  # decayed to min_lr


def test_a_torch_dist_checkpoint_is_refused_by_name(tmp_path):
    config = load_config(None, {"train.backend": "torch"})
    backend = TorchBackend(config, torch.device("cpu"))
    (tmp_path / "metadata.json").write_text("{}")  # what a torch_dist checkpoint holds
    with pytest.raises(UserError, match=r"not a torch-backend .* train.backend=megatron"):
        backend.load_checkpoint(str(tmp_path), with_optimizer=True)
