"""Processes killed with SIGKILL in the middle of a run, on real Ray: the run survives.

- In a one-step-off run (`algorithm.max_staleness 1`), a rollout actor (with the
  transformers engine, also its engine) dies while it scores a step's samples: Ray restarts it
  in its bundle, its prompt groups go to the live engine, it rejoins the weight group with the
  current weights before it generates again, every step trains exactly its batch, every
  trained sample is exactly one version old (the first step's: none), and the job still
  learns from chance to >= 0.9.
- A training actor dies between steps: the driver replaces the training group and resumes
  from the last checkpoint by itself; the repeated step equals the one the dead group ran, bit
  for bit (the torch backend resumes exactly), and the engines stay up.

The driver runs in this process (the Python API), so the test can watch its steps and find
the actors' pids with Ray's state API.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from ray.util.state import list_actors

from config import load_config
from driver import Driver

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def trigger(tmp_path_factory):
    """A local Ray cluster whose workers see the kill trigger's path (tests/dying_reward.py)."""
    path = tmp_path_factory.mktemp("kill") / "trigger"
    os.environ["SLUICE_TEST_KILL_TRIGGER"] = str(path)
    ray.init(address="local", num_cpus=4)
    yield path
    ray.shutdown()
    del os.environ["SLUICE_TEST_KILL_TRIGGER"]


def actor_pids(prefix: str) -> dict[str, int]:
    """{name: pid} of this cluster's live actors whose name starts with `prefix`."""
    address = ray.get_runtime_context().gcs_address
    alive = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.name: a.pid for a in alive if a.name and a.name.startswith(prefix)}


def when(condition, action) -> threading.Thread:
    """Run `action` in a thread as soon as `condition()` holds."""

    def watch():
        while not condition():
            time.sleep(0.02)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def read_steps(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "train/loss" in m]


@pytest.mark.learning
def test_one_step_off_learns_through_a_rollout_actor_killed_mid_rollout(trigger, tmp_path):
    out = tmp_path / "run"
    config = load_config(
        TINY,
        {
            "algorithm.max_staleness": "1",
            "rollout.reward": "tests.dying_reward:reward",
            "logging.output_dir": str(out),
            "logging.progress_bar": "false",
        },
    )
    with Driver(config) as driver:
        before = actor_pids("sluice-rollout-")
        armed = when(lambda: driver.steps_done >= 10, trigger.touch)
        summary = driver.run()
        armed.join(timeout=1)
        after = actor_pids("sluice-rollout-")
        versions = driver.engines.weight_versions()
        final_version = driver.version
    (killed,) = trigger.parent.glob("trigger.*")
    killed_pid = int(killed.suffix[1:])
    (name,) = [n for n, pid in before.items() if pid == killed_pid]
    assert after[name] != killed_pid  # restarted: a new process in the same actor
    assert versions == [final_version] * 2  # the restarted engine rejoined and was updated
    assert summary["engine_restarts"] == 1
    assert summary["steps"] == 80
    assert summary["first_eval_accuracy"] <= 0.3
    assert summary["last_eval_accuracy"] >= 0.9
    steps = read_steps(out)
    assert [m["step"] for m in steps] == list(range(1, 81))
    # Every step trained its whole batch once: 32 prompt groups x 8 samples.
    assert all(m["rollout/samples"] == m["train/samples"] == 256 for m in steps)
    # The dead engine's share (16 groups) went to the live one; nothing was generated with
    # weights other than the ones before the trainer's last update (a restarted engine's
    # first weights are stale): step 1 trains on the initial weights' samples, every later
    # step on those of the version before.
    assert steps[-1]["fault/reissued_groups"] == 16
    assert [m["async/version_lag"] for m in steps] == [0] + [1] * 79
    assert all(m["weight_version"] - m["rollout/weight_version"] == 1 + (m["step"] > 1)
               for m in steps)  # fmt: skip
    assert sum(m["async/dropped_samples"] for m in steps) == 0


def test_a_training_actor_killed_between_steps_is_replaced_from_the_last_checkpoint(
    trigger, tmp_path
):
    out, checkpoints = tmp_path / "run", tmp_path / "ckpt"
    config = load_config(
        TINY,
        {
            "num_steps": "8",
            "rollout.num_engines": "1",  # the training group is what dies here
            "checkpoint.save": str(checkpoints),
            "checkpoint.save_interval": "2",
            "logging.eval_every": "0",
            "logging.output_dir": str(out),
            "logging.progress_bar": "false",
        },
    )
    seen_before_kill = {}

    def kill_trainer():
        seen_before_kill.update({m["step"]: m for m in read_steps(out)})
        os.kill(actor_pids("sluice-train-1")["sluice-train-1"], signal.SIGKILL)

    with Driver(config) as driver:
        engines = actor_pids("sluice-rollout-")
        armed = when(lambda: driver.steps_done >= 5, kill_trainer)
        summary = driver.run()
        armed.join(timeout=1)
        assert actor_pids("sluice-rollout-") == engines  # the engines stayed up
        assert sorted(actor_pids("sluice-train-")) == [
            "sluice-train-0-restart1",
            "sluice-train-1-restart1",
        ]
    assert summary["trainer_restarts"] == 1
    assert summary["steps"] == 8
    steps = read_steps(out)
    assert [m["step"] for m in steps] == list(range(1, 9))  # each step logged once
    # Back at the step-4 checkpoint, step 5 repeats exactly what the lost group computed.
    repeated = next(m for m in steps if m["step"] == 5)
    for key in ("train/loss", "train/grad_norm", "rollout/reward_mean", "weight_version"):
        assert repeated[key] == seen_before_kill[5][key], key
    assert repeated["fault/trainer_restarts"] == 1
    assert int((checkpoints / "latest_checkpointed_iteration.txt").read_text()) == 8
