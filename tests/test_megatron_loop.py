"""The full loop with the Megatron backend (EP2 over gloo, CPU shim), as a user runs it.

One run learns the built-in task and saves every 20 steps; a second run resumes from the
step-20 checkpoint and must repeat steps 21 and 22 exactly (model, optimizer, step counter,
data position and sampling seeds all restored). Both runs are `driver.py`'s arguments given
to the Python API in this process, on one local Ray cluster (its start-up paid once); the
actors start with the shim's folder on PYTHONPATH, as `tests/megatron/site` describes.
"""

import json
from pathlib import Path

import pytest
import ray

import driver
from actors.preflight import MEGATRON_CPU_SHIM_ENV

ROOT = Path(__file__).resolve().parent.parent
SHIM_SITE = ROOT / "tests" / "megatron" / "site"
MEGATRON_EP2 = ["--train.backend", "megatron", "--expert-model-parallel-size", "2"]


@pytest.fixture
def megatron_on_cpu(monkeypatch):
    """This process lets Megatron run without GPUs, and the Ray cluster that the first run
    starts gives its workers the shim (connect_ray passes PYTHONPATH on to them)."""
    monkeypatch.setenv(MEGATRON_CPU_SHIM_ENV, "1")
    monkeypatch.setenv("PYTHONPATH", str(SHIM_SITE))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield
    ray.shutdown()


def run_driver(*args: str) -> None:
    config, _ = driver.parse_args([*MEGATRON_EP2, "--logging.progress_bar", "false", *args])
    with driver.Driver(config) as run:
        run.run()


def step_metrics(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines) if "train/loss" in m}


@pytest.mark.megatron
@pytest.mark.learning
def test_megatron_loop_learns_saves_and_resumes_exactly(megatron_on_cpu, tmp_path):
    first, resumed, checkpoints = tmp_path / "first", tmp_path / "resumed", tmp_path / "ckpt"
    run_driver(
        "--num_steps", "40",
        "--save", str(checkpoints),
        "--save-interval", "20",
        "--logging.output_dir", str(first),
    )  # fmt: skip
    summary = json.loads((first / "summary.json").read_text())
    assert summary["first_eval_accuracy"] <= 0.3
    assert summary["last_eval_accuracy"] >= 0.9
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "40"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == [
        "iter_0000020",
        "iter_0000040",
    ]

    run_driver(
        "--num_steps", "22",
        "--load", str(checkpoints / "iter_0000020"),
        "--logging.output_dir", str(resumed),
        "--logging.save_final_model", "false",
    )  # fmt: skip
    original, again = step_metrics(first), step_metrics(resumed)
    assert sorted(again) == [21, 22]
    for step in (21, 22):
        for key in ("train/loss", "rollout/reward_mean", "train/grad_norm", "weight_version"):
            assert again[step][key] == original[step][key], (step, key)
