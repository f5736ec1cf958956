"""The whole loop on real Ray: log-prob parity, weight sync, versions, and learning."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from config import load_config
from driver import Driver
from weights.errors import WeightSyncError
from weights.manifest import Bucket, TensorSpec

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    ray.init(address="local", num_cpus=4)
    config = load_config(
        REPO / "recipes" / "tiny.yaml",
        {
            "logging.output_dir": str(tmp_path_factory.mktemp("run")),
            "logging.progress_bar": "false",
            "rollout.batch_size": "64",
            # One training rank (what engines and trainer compare needs no second one); two
            # engines, so every check runs across engines.
            "train.num_workers": "1",
        },
    )
    with Driver(config) as d:
        yield d
    ray.shutdown()


def engine_weights(driver: Driver) -> list[dict[str, torch.Tensor]]:
    return ray.get([e.named_weights.remote() for e in driver.engines.actors])


def trainer_weights(driver: Driver) -> dict[str, torch.Tensor]:
    return driver.trainers.named_weights()


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_first_step_log_probs_match_and_ratio_is_one(driver):
    """Engine and trainer score the same sampled tokens with the same weights alike."""
    assert driver.steps_done == 0
    metrics = driver.step()
    assert metrics["train/tokens"] > 0
    assert metrics["mismatch/logprob_abs_diff_mean"] < 1e-5
    assert abs(metrics["mismatch/importance_ratio_mean"] - 1.0) < 1e-5
    assert metrics["train/clip_fraction"] == 0.0
    # The policy's entropy per response token, taken with the log-probs (chunk by chunk), and
    # the default constant schedule's learning rate.
    assert 0.0 < metrics["train/entropy"] < float("inf")
    assert metrics["train/lr"] == driver.config.train.lr


def test_trainer_log_probs_of_engine_samples(driver):
    """compute_log_probs on a trainer reproduces the rollout_log_probs column row by row."""
    results = driver.engines.generate(driver.prompts.next_groups(4), step=1)
    refs = [b for r in results for b in r.batches]
    trainer = ray.get(driver.trainers.leader.compute_log_probs.remote(refs))
    rows = [
        row
        for b in ray.get([r.ref for r in refs])
        for row in b.column("rollout_log_probs").to_pylist()
    ]
    assert len(trainer) == len(rows) == 4 * driver.config.rollout.samples_per_prompt
    diffs = torch.cat([(t - torch.tensor(r)).abs() for t, r in zip(trainer, rows, strict=True)])
    assert diffs.mean().item() < 1e-5


def test_after_a_step_engines_hold_the_trainers_weights_bit_for_bit(driver):
    before = engine_weights(driver)[0]
    driver.step()
    trained = trainer_weights(driver)
    assert any(not torch.equal(before[n], trained[n]) for n in trained), "training changed nothing"
    for weights in engine_weights(driver):
        assert_bit_equal(weights, trained)
    assert driver.engines.weight_versions() == [driver.version] * len(driver.engines.actors)
    batches = driver.engines.generate(driver.prompts.next_groups(2), step=1)[0].batches
    table_versions = ray.get(batches[0].ref).column("weight_version").to_pylist()
    assert set(table_versions) == {driver.version}


def test_verify_mode_checksums_agree(driver):
    driver.weights.verify()


def tampered(plan: list[Bucket], edit) -> list[Bucket]:
    first = plan[0]
    specs = (edit(first.specs[0]), *first.specs[1:])
    return [Bucket(specs, sum(s.nbytes for s in specs)), *plan[1:]]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: dataclasses.replace(s, shape=(s.shape[0] + 1, *s.shape[1:])), "mismatched"),
        (lambda s: TensorSpec("model.no_such_weight", s.dtype, s.shape), "missing"),
    ],
)
def test_mismatched_sync_fails_clearly_and_keeps_old_weights(driver, edit, message):
    before = engine_weights(driver)
    version = driver.version
    good_plan = driver.weights.plan
    driver.weights.plan = tampered(good_plan, edit)
    try:
        with pytest.raises(WeightSyncError, match=message):
            driver.weights.sync(version + 1)
    finally:
        driver.weights.plan = good_plan
    for old, new in zip(before, engine_weights(driver), strict=True):
        assert_bit_equal(old, new)
    assert driver.engines.weight_versions() == [version] * len(driver.engines.actors)
    driver.weights.sync(version)  # the group is still usable after the refused sync


@pytest.mark.learning
def test_default_job_learns_the_task_from_chance(tmp_path):
    """`driver.py` on its built-in default: held-out accuracy from chance to >= 0.9."""
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "run"
    done = subprocess.run(  # stdout a pipe, as in a log file or `ray job logs`
        [sys.executable, "driver.py", "--logging.output_dir", str(out)],
        cwd=REPO,
        env=env,
        check=True,
        timeout=600,
        capture_output=True,  # bytes: text mode would turn a carriage return into a newline
    )
    summary = json.loads((out / "summary.json").read_text())
    assert b"\r" not in done.stdout  # no progress bar without a terminal
    lines = done.stdout.decode().splitlines()
    assert lines[0].startswith("sluice: 80 steps of GRPO on builtin:tiny-qwen3-moe")  # at once
    assert f"writing to {out}" in lines[0]
    step_lines = [line for line in lines if line.startswith("step ")]
    assert len(step_lines) == summary["steps"]
    assert summary["first_eval_accuracy"] <= 0.3
    assert summary["last_eval_accuracy"] >= 0.9
    assert summary["wall_seconds"] < 600
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "train/loss" in m]
    assert len(steps) == summary["steps"]
    for key in (
        "rollout/reward_mean",
        "time/rollout",
        "time/train",
        "time/sync",
        "train/grad_norm",
        "mismatch/logprob_abs_diff_mean",
        "perf/tokens_per_s",
        "rollout/response_length_mean",
    ):
        assert key in steps[-1], key
    # Each trainer reports its resident memory (a torch process holds well over 0.1 GB); on
    # a CPU there is no GPU peak to report.
    assert steps[-1]["memory/train_host_rss_gb"] > 0.1
    assert steps[-1]["memory/train_gpu_peak_gb"] == 0.0
    assert (out / "final_model" / "config.json").is_file()
    assert any((out / "tensorboard").iterdir())


def test_named_eval_sets_report_avg_and_pass_at_k_separately(driver):
    """The default evaluation (one set, one greedy answer per prompt) and two named sets
    sampled k times with their own length, through the engines and the reward."""
    default = driver.evaluate()
    assert set(driver.eval_sets) == {"held_out"}
    assert default["eval/accuracy"] == default["eval/held_out/avg@1"]
    assert default["eval/held_out/avg@1"] == default["eval/held_out/pass@1"]  # one answer
    assert driver.evaluate()["eval/held_out/avg@1"] == default["eval/held_out/avg@1"]  # greedy
    saved_sets, saved_eval = driver.eval_sets, driver.config.eval
    held_out = saved_sets["held_out"]
    driver.eval_sets = {"first": held_out[:6], "second": held_out[6:10]}
    driver.config.eval = dataclasses.replace(
        saved_eval, samples_per_prompt=4, temperature=1.0, max_new_tokens=2
    )
    try:
        metrics = driver.evaluate()
    finally:
        driver.eval_sets, driver.config.eval = saved_sets, saved_eval
    for name in ("first", "second"):
        avg, passed = metrics[f"eval/{name}/avg@4"], metrics[f"eval/{name}/pass@4"]
        reward = metrics[f"eval/{name}/reward_mean"]
        assert 0.0 <= avg <= passed <= 1.0
        assert avg <= reward <= avg + 0.5 * (1 - avg)  # the task's rewards: 1, 0.5 or 0
        assert 0 < metrics[f"eval/{name}/response_length"] <= 2  # eval's own length
    assert metrics["eval/accuracy"] == metrics["eval/first/avg@4"]
    written = json.loads((driver.output_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert written["eval/second/pass@4"] == metrics["eval/second/pass@4"]


def test_an_overlapped_evaluation_scores_the_weights_it_started_on(driver):
    """eval.overlap_training: the evaluation started after a step runs while the next step
    trains and is collected before that step's weight update, so it scores (greedily, hence
    exactly) what a waited-for evaluation of the same weights gives, and its line comes before
    the next step's in metrics.jsonl."""
    before = driver.steps_done
    waited = driver.evaluate()
    driver.start_evaluation()
    assert driver.evaluation is not None and driver.evaluation[0] == before
    driver.step()
    assert driver.evaluation is None
    assert driver.last_eval == waited
    lines = [json.loads(line) for line in (driver.output_dir / "metrics.jsonl").open()]
    evaluated = [i for i, line in enumerate(lines) if "eval/accuracy" in line]
    stepped = [i for i, line in enumerate(lines) if line.get("step") == before + 1]
    assert lines[evaluated[-1]]["step"] == before
    assert evaluated[-1] < stepped[0]


def test_a_run_with_overlapped_evaluations_logs_each_after_its_step(driver, monkeypatch):
    """`Driver.run` with eval.overlap_training and an evaluation after every step: each one is
    logged at its step, before the next step's line, and the last (after the final step) is
    the summary's. Last in this module: it runs the driver to its end."""
    first = driver.steps_done
    driver.config.num_steps = first + 2
    driver.config.logging.eval_every = 1
    driver.config.logging.save_final_model = False
    driver.config.eval.overlap_training = True
    pending_at_step, step = [], driver.step

    def watched_step():
        pending_at_step.append(driver.evaluation is not None)
        return step()

    monkeypatch.setattr(driver, "step", watched_step)
    summary = driver.run()
    assert pending_at_step == [False, True]  # the second step began with the evaluation out
    assert summary["steps"] == first + 2
    lines = [json.loads(line) for line in (driver.output_dir / "metrics.jsonl").open()]
    order = [(line["step"], "eval/accuracy" in line) for line in lines if line["step"] > first]
    assert [step for step, is_eval in order if is_eval] == [first + 1, first + 2]
    # the overlapped one (after the first step) before the second step's training line
    assert order.index((first + 1, True)) < order.index((first + 2, False))
    last = next(line for line in lines[::-1] if "eval/accuracy" in line)
    assert last["step"] == first + 2
    assert summary["last_eval_accuracy"] == last["eval/accuracy"]
