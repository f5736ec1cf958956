"""Replacing a lost training group, on real Ray.

- `TrainGroup.kill` returns only once the old ranks' processes have exited (a GPU's memory is
  freed only then), a rank stuck in a call and one already dead alike; a rank that cannot
  exit is named in an error at the bound. Light actors in bundles with fake GPUs stand in for
  the ranks: `kill` sees only their actor handles.
- The driver goes back to the newest checkpoint this run saved, never to a newer one another
  run wrote into the same save folder, and `checkpoint.keep_last` deletes this run's older
  checkpoints as it saves (the built-in job, torch backend, from the Python API).
"""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from ray.util.state import list_actors

from actors.groups import TrainGroup
from config import load_config
from driver import Driver
from training.megatron.checkpoint import TRACKER_FILE, checkpoint_dir, latest

TINY = Path(__file__).resolve().parent.parent / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def cluster():
    # Ray's raylet kills a process still running `kill_worker_timeout_milliseconds` after
    # ray.kill (5 s by default): a minute here, so that a stopped process outlasts the
    # timeout test's bound however slowly its watch starts on a loaded machine.
    ray.init(
        address="local",
        num_cpus=4,
        num_gpus=2,
        _system_config={"kill_worker_timeout_milliseconds": 60_000},
    )
    yield
    ray.shutdown()


@ray.remote
class Rank:
    def pid(self) -> int:
        return os.getpid()

    def block(self) -> None:
        time.sleep(3600)  # as a rank waiting in a collective for a dead peer


@pytest.fixture
def actors(cluster):
    """Two ranks, each in a bundle with a (fake) GPU, as the driver places training ranks."""
    bundles = placement_group([{"CPU": 0.5, "GPU": 1}] * 2)
    ray.get(bundles.ready(), timeout=60)
    yield [
        Rank.options(
            num_cpus=0.5,
            num_gpus=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(bundles, i),
        ).remote()
        for i in range(2)
    ]
    remove_placement_group(bundles)


def group_of(actors: list) -> TrainGroup:
    """A TrainGroup over `actors`; `kill` uses nothing else of it."""
    group = TrainGroup.__new__(TrainGroup)
    group.actors = actors
    return group


def exited(pid: int) -> bool:
    """A zombie has exited too: its memory is freed, its parent has not collected it yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_kill_returns_once_every_rank_process_has_exited(actors):
    pids = ray.get([a.pid.remote() for a in actors])
    actors[0].block.remote()  # busy: its process runs until Ray's kill reaches it
    os.kill(pids[1], signal.SIGKILL)  # the rank that died
    group_of(actors).kill()
    assert [exited(pid) for pid in pids] == [True, True]


def test_a_rank_that_does_not_exit_is_named_at_the_bound(actors):
    pids = ray.get([a.pid.remote() for a in actors])
    os.kill(pids[1], signal.SIGSTOP)  # cannot act on Ray's kill, as a process stuck in a driver
    try:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=rf"rank\(s\) \[1\] \(pid \[{pids[1]}\]\) still"):
            group_of(actors).kill(timeout_s=1.0)
        assert time.monotonic() - start < 30
        assert exited(pids[0]) and not exited(pids[1])
    finally:
        os.kill(pids[1], signal.SIGKILL)


def train_pids() -> dict[str, int]:
    address = ray.get_runtime_context().gcs_address
    alive = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.name: a.pid for a in alive if a.name and a.name.startswith("sluice-train-")}


def write_another_runs_checkpoint(root, step: int, like: int) -> None:
    """A newer checkpoint of another run in the same save folder: a copy of this run's
    checkpoint of step `like`, whose loop state says `step`, named by the tracker."""
    copy = checkpoint_dir(root, step)
    shutil.copytree(checkpoint_dir(root, like), copy)
    state = json.loads((copy / "sluice_state.json").read_text())
    state.update(steps_done=step, weight_version=step)
    (copy / "sluice_state.json").write_text(json.dumps(state))
    (root / TRACKER_FILE).write_text(f"{step}\n")


def test_a_lost_training_group_goes_back_to_this_runs_checkpoint(cluster, tmp_path):
    checkpoints = tmp_path / "ckpt"
    config = load_config(
        TINY,
        {
            "num_steps": "12",  # room for a wrong restart (from step 9) to show in the steps
            "rollout.num_engines": "1",
            "placement.use_gpus": "no",  # the cluster's GPUs are the kill tests' fake ones
            "checkpoint.save": str(checkpoints),
            "checkpoint.keep_last": "2",
            "logging.output_dir": str(tmp_path / "run"),
            "logging.eval_every": "0",
            "logging.progress_bar": "false",
        },
    )
    with Driver(config) as driver:
        driver.step()
        driver.step()
        driver.save()
        write_another_runs_checkpoint(checkpoints, step=9, like=2)
        old = train_pids()
        os.kill(old["sluice-train-1"], signal.SIGKILL)
        driver.step()  # the group is replaced and goes back to step 2; then step 3 runs
        assert driver.trainer_restarts == 1
        assert driver.steps_done == 3
        assert sorted(train_pids()) == ["sluice-train-0-restart1", "sluice-train-1-restart1"]
        assert all(exited(pid) for pid in old.values())
        driver.step()
        driver.save()  # keeps steps 2 and 4
        driver.step()
        driver.step()
        driver.save()  # keeps 4 and 6, deletes 2; step 9 is not this run's to delete
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "iter_0000004", "iter_0000006", "iter_0000009", TRACKER_FILE
    ]  # fmt: skip
    assert latest(checkpoints) == checkpoint_dir(checkpoints, 6)
