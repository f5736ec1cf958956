"""Processes killed (SIGKILL) or wedged in the middle of a run, on real Ray: the run survives.

Every fault lands at a named point of a step (`actors/fault_points.py`: a file the test writes
between two steps, taken by the first actor to reach that point), never from a polling thread,
so each test knows which step and which verb it hits, however loaded the machine is.

- A rollout actor killed as it starts a step's generation in a one-step-off run: Ray restarts
  it, its prompt groups go to the live engine, it rejoins the weight group before it generates
  again, every step trains exactly its batch one version old, and the job learns (>= 0.9).
- A rollout actor killed in the weight update: the update goes on without it, it comes back.
- A rollout actor wedged in its generation: killed at the phase's bound, restarted by Ray, its
  groups re-issued; the run goes on.
- A rollout actor killed while idle, whose restart never finishes: the run does not wait for it.
- A training actor killed between steps: the driver replaces the training group and resumes from
  the last checkpoint; the repeated step equals the lost one, bit for bit.
- A training rank killed in the weight update with `rollout.partial: abort` (the generations
  running ahead are cancelled): the training group is replaced and the run goes on.

The driver runs in this process (the Python API), so the test steps it and finds the actors'
pids with Ray's state API.
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import ray
from ray.util.state import list_actors

from actors.fault_points import FAULT_DIR_ENV, arm, fired
from config import load_config
from driver import Driver

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """A local Ray cluster whose workers see the fault points' folder."""
    folder = tmp_path_factory.mktemp("faults")
    os.environ[FAULT_DIR_ENV] = str(folder)
    ray.init(address="local", num_cpus=4)
    yield folder
    ray.shutdown()
    del os.environ[FAULT_DIR_ENV]


def actor_pids(prefix: str) -> dict[str, int]:
    """{name: pid} of this cluster's live actors whose name starts with `prefix`."""
    address = ray.get_runtime_context().gcs_address
    alive = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.name: a.pid for a in alive if a.name and a.name.startswith(prefix)}


def read_steps(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "train/loss" in m]


def tiny(out: Path, **overrides: str):
    values = {"logging.output_dir": str(out), "logging.progress_bar": "false"}
    return load_config(TINY, {**values, **overrides})


@pytest.mark.learning
def test_one_step_off_learns_through_a_rollout_actor_killed_in_its_generation(faults, tmp_path):
    out = tmp_path / "run"
    config = tiny(out, **{"algorithm.max_staleness": "1"})
    with Driver(config) as driver:
        first = driver.evaluate()
        before = actor_pids("sluice-rollout-")
        for _ in range(10):
            driver.step()
        # Step 12's generation, started as step 11 begins, is the next to reach the point.
        arm(faults, "rollout.generate")
        summary = driver.run()
        after = actor_pids("sluice-rollout-")
        versions = driver.engines.weight_versions()
        final_version = driver.version
    (killed_pid,) = fired(faults, "rollout.generate")
    (name,) = [n for n, pid in before.items() if pid == killed_pid]
    assert after[name] != killed_pid  # restarted: a new process in the same actor
    assert versions == [final_version] * 2  # the restarted engine rejoined and was updated
    assert summary["engine_restarts"] == 1
    assert summary["steps"] == 80
    assert first["eval/accuracy"] <= 0.3
    assert summary["last_eval_accuracy"] >= 0.9
    steps = read_steps(out)
    assert [m["step"] for m in steps] == list(range(1, 81))
    # Every step trained its whole batch once: 32 prompt groups x 8 samples.
    assert all(m["rollout/samples"] == m["train/samples"] == 256 for m in steps)
    # The dead engine's share of step 12 (16 groups) went to the live one, when step 11
    # waited for it before its weight update (the counts are the run's totals); nothing was
    # generated with weights other than the ones before the trainer's last update (a restarted
    # engine's first weights are stale): step 1 trains on the initial weights' samples, every
    # later step on those of the version before.
    assert [m["fault/reissued_groups"] for m in steps if m["step"] in (10, 11, 80)] == [0, 16, 16]
    assert [m["async/version_lag"] for m in steps] == [0] + [1] * 79
    assert all(m["weight_version"] - m["rollout/weight_version"] == 1 + (m["step"] > 1)
               for m in steps)  # fmt: skip
    assert sum(m["async/dropped_samples"] for m in steps) == 0


def test_a_rollout_actor_killed_in_the_weight_update_is_left_out_until_it_is_back(faults, tmp_path):
    out = tmp_path / "run"
    config = tiny(out, **{"num_steps": "400", "train.num_workers": "1", "logging.eval_every": "0"})
    with Driver(config) as driver:
        driver.step()
        arm(faults, "rollout1.update_weights")  # engine 1, in step 2's weight update
        # The run goes on with engine 0 while Ray restarts engine 1 (seconds of start-up),
        # until the check before a weight update finds it back and the group takes it in.
        while driver.steps_done < config.num_steps and not driver.engines.restarts:
            driver.step()
        driver.step()  # one step with both engines again
        versions = driver.engines.weight_versions()
        final_version = driver.version
        live = driver.engines.live()
    assert fired(faults, "rollout1.update_weights")
    steps = read_steps(out)
    assert [m["step"] for m in steps] == list(range(1, len(steps) + 1))
    assert steps[1]["weight_version"] == 2  # the update of step 2 went on without engine 1
    assert steps[-1]["fault/engine_restarts"] == 1 and steps[-1]["fault/trainer_restarts"] == 0
    assert live == [0, 1] and versions == [final_version] * 2
    assert all(m["rollout/samples"] == m["train/samples"] == 256 for m in steps)


def test_a_wedged_rollout_actor_is_killed_at_the_bound_and_its_groups_reissued(faults, tmp_path):
    out = tmp_path / "run"
    config = tiny(
        out,
        **{
            "num_steps": "400",
            "train.num_workers": "1",
            "logging.eval_every": "0",
            "timeouts.rollout_s": "15",  # a step's rollout here takes well under a second
        },
    )
    with Driver(config) as driver:
        driver.step()
        arm(faults, "rollout0.generate", "hang")  # engine 0, in step 2's generation
        # Engine 1 takes every step until Ray has restarted engine 0 and it is back.
        while driver.steps_done < config.num_steps and not driver.engines.restarts:
            driver.step()
        driver.step()  # one step with both engines again
        versions = driver.engines.weight_versions()
        final_version = driver.version
    (wedged_pid,) = fired(faults, "rollout0.generate")
    steps = read_steps(out)
    assert [m["step"] for m in steps] == list(range(1, len(steps) + 1))
    assert all(m["rollout/samples"] == m["train/samples"] == 256 for m in steps)
    assert steps[1]["fault/reissued_groups"] == 16  # engine 0's share of step 2
    assert steps[-1]["fault/engine_restarts"] == 1
    assert versions == [final_version] * 2
    stack = (out / "stuck" / "step2-rollout" / "sluice-rollout-0.txt").read_text()
    assert str(wedged_pid) in stack and "fault_points.py" in stack


def test_a_rollout_actor_killed_while_idle_is_not_waited_for(faults, tmp_path):
    """Its restart never finishes (its constructor hangs at a fault point): every later step
    runs on the other engine, none waits for the restart."""
    out = tmp_path / "run"
    config = tiny(out, **{"num_steps": "4", "train.num_workers": "1", "logging.eval_every": "0"})
    with Driver(config) as driver:
        driver.step()
        arm(faults, "rollout1.start", "hang")
        os.kill(actor_pids("sluice-rollout-1")["sluice-rollout-1"], signal.SIGKILL)
        summary = driver.run()
        live = driver.engines.live()
        # Ray does restart it (the new process may start only after the run's 4 steps).
        deadline = time.monotonic() + 120
        while not fired(faults, "rollout1.start") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert fired(faults, "rollout1.start")
    steps = read_steps(out)
    assert summary["steps"] == 4 and live == [0]
    assert summary["engine_restarts"] == 0
    assert all(m["rollout/samples"] == m["train/samples"] == 256 for m in steps)


def test_a_training_actor_killed_between_steps_is_replaced_from_the_last_checkpoint(
    faults, tmp_path
):
    out, checkpoints = tmp_path / "run", tmp_path / "ckpt"
    config = tiny(
        out,
        **{
            "num_steps": "8",
            "rollout.num_engines": "1",  # the training group is what dies here
            "checkpoint.save": str(checkpoints),
            "checkpoint.save_interval": "2",
            "logging.eval_every": "0",
        },
    )
    with Driver(config) as driver:
        engines = actor_pids("sluice-rollout-")
        for _ in range(5):
            driver.step()
            if driver.steps_done % 2 == 0:
                driver.save()
        seen_before_kill = {m["step"]: m for m in read_steps(out)}
        os.kill(actor_pids("sluice-train-1")["sluice-train-1"], signal.SIGKILL)
        summary = driver.run()
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


def test_a_training_rank_killed_in_the_weight_update_under_abort_is_replaced(faults, tmp_path):
    """The generations running ahead were cancelled for the update when the rank died; the
    restart discards them (they end cancelled) and the run goes on from its start."""
    out = tmp_path / "run"
    config = tiny(
        out,
        **{
            "num_steps": "4",
            "algorithm.max_staleness": "1",
            "rollout.partial": "abort",
            # A step's generation outlasts a training step: still running at the update.
            "rollout.reward": "tests.slow_reward:reward",
            "logging.eval_every": "0",
        },
    )
    with Driver(config) as driver:
        driver.step()
        arm(faults, "train0.broadcast_weights")  # the leader, in step 2's weight update
        summary = driver.run()
        engines_after = driver.engines.weight_versions()
        final_version = driver.version
    assert fired(faults, "train0.broadcast_weights")
    steps = read_steps(out)
    assert summary["trainer_restarts"] == 1 and summary["steps"] == 4
    assert [m["step"] for m in steps] == [1, 2, 3, 4]  # the lost steps were trained again
    assert engines_after == [final_version] * 2
