"""The built-in tool task (tasks/lookup.py, recipes/tiny-tools.yaml) on real Ray, through the
driver's Python API: the tiny model learns from chance to >= 0.9 held-out accuracy, which it
can only reach through the tool loop (the answers are only in the tool's table), while a
rollout actor is killed in the middle of its episodes (at the named point before a second
turn, `rollout.episode_turn`): its episodes are generated again from their start by the other
engine and each step trains its whole batch once."""

import json
import os
from pathlib import Path

import pytest
import ray

from actors.fault_points import FAULT_DIR_ENV, arm, fired
from config import load_config
from driver import Driver

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def faults(tmp_path):
    folder = tmp_path / "faults"
    folder.mkdir()
    os.environ[FAULT_DIR_ENV] = str(folder)
    ray.init(address="local", num_cpus=4)
    yield folder
    ray.shutdown()
    del os.environ[FAULT_DIR_ENV]


@pytest.mark.learning
def test_the_tool_task_is_learned_through_a_rollout_actor_killed_mid_episode(faults, tmp_path):
    out = tmp_path / "run"
    config = load_config(
        REPO / "recipes" / "tiny-tools.yaml",
        {"logging.output_dir": str(out), "logging.progress_bar": "false"},
    )
    with Driver(config) as driver:
        first = driver.evaluate()
        for _ in range(4):
            driver.step()
        arm(faults, "rollout.episode_turn")
        driver.step()  # step 5: an engine dies between two turns of its episodes
        summary = driver.run()  # (which evaluates first, then goes on to the last step)
    (killed_pid,) = fired(faults, "rollout.episode_turn")
    assert killed_pid > 0
    assert summary["engine_restarts"] == 1
    assert first["eval/accuracy"] <= 0.3
    assert summary["last_eval_accuracy"] >= 0.9
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "train/loss" in m]
    assert [m["step"] for m in steps] == list(range(1, config.num_steps + 1))
    # Every step trained each of its 256 episodes once: the killed engine's half-done episodes
    # were dropped with it, and its groups re-issued whole (the counts are the run's totals).
    assert all(m["rollout/samples"] == m["train/samples"] == 256 for m in steps)
    assert all(m["rollout/episodes"] == 256 for m in steps)
    assert [m["fault/reissued_groups"] for m in steps if m["step"] in (4, 5)] == [0, 16]
    # The trainer scores the model's tokens of both turns as the engine sampled them: the
    # observations between the turns sit where the engine read them (same weights each step).
    assert all(m["mismatch/logprob_abs_diff_mean"] < 1e-5 for m in steps)
    last = steps[-1]
    assert last["rollout/tool_calls_per_episode"] >= 0.9  # it learned to call the tool
    assert last["rollout/turns_per_episode"] >= 1.9  # and to answer after it
    assert last["rollout/tool_errors"] == 0
    # The tool's answer ("7 =") is read, not trained: two observation tokens an episode.
    assert last["rollout/observation_tokens_per_episode"] == pytest.approx(
        2 * last["rollout/tool_calls_per_episode"]
    )
    assert last["rollout/model_tokens_per_episode"] == pytest.approx(
        last["rollout/turns_per_episode"]  # one token a turn
    )
    assert last["rollout/tool_seconds_mean"] > 0
