"""The algorithms beside GRPO, in the real loop (Ray, the tiny recipe, this process):

- dynamic sampling drops the prompt groups whose rewards are all equal and refills the step
  with fresh prompts, in bounded rounds;
- REINFORCE++ with a group baseline trains on advantages normalized over the whole step;
- the built-in task learns from chance to >= 0.9 with GSPO, dynamic sampling and rollout routing
  replay (R3) together.

The formulas themselves are tested against direct re-implementations in
tests/test_sequence_and_masked_losses.py and tests/test_grpo.py.
"""

from pathlib import Path

import numpy as np
import pytest
import ray

from config import load_config
from driver import Driver
from rl.grpo import rewards_differ

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4)
    yield
    ray.shutdown()


def tiny(tmp_path: Path, **overrides: str):
    # One training rank: these tests are about what the engines and the driver do with a
    # step's samples (two engines, so across engines), and a rank fewer is a process fewer.
    values = {
        "logging.output_dir": str(tmp_path),
        "logging.progress_bar": "false",
        "train.num_workers": "1",
    }
    return load_config(TINY, {**values, **overrides})


def test_rewards_differ_is_daPOs_filter():
    assert rewards_differ([0.0, 1.0, 0.0]) and rewards_differ([0.5, 0.25])
    assert not rewards_differ([1.0, 1.0, 1.0]) and not rewards_differ([0.0])


def test_dynamic_sampling_trains_only_groups_that_teach_and_refills_the_step(local_ray, tmp_path):
    config = tiny(tmp_path, **{"rollout.dynamic_sampling": "true", "logging.eval_every": "0",
                               "rollout.dynamic_sampling_max_rounds": "3"})  # fmt: skip
    groups = config.rollout.prompts_per_step
    with Driver(config) as driver:
        before = driver.prompts.state_dict()["position"]
        metrics = driver.step()  # step 1 through the whole loop
        start = driver.prompts.state_dict()["position"]
        step1_rounds = driver.rollouts.sampling_rounds  # what the queue recorded for step 1
        results = driver.rollouts.results_for(2)  # step 2's rollouts, looked at
        rounds = driver.rollouts.sampling_rounds
        tables = [ray.get(b.ref) for r in results for b in r.batches]
        consumed = driver.prompts.state_dict()["position"] - start
    n = config.rollout.samples_per_prompt
    kept = sum(r.stats.groups for r in results)
    filtered = sum(r.stats.filtered_groups for r in results)
    assert kept + filtered == consumed  # every prompt drawn was generated once, and counted
    assert 1 <= rounds <= 4 and (kept == groups or rounds == 4)  # refilled up to the cap
    assert filtered > 0  # at chance most groups score all 0: the filter ran
    rewards = np.concatenate([t.column("reward").to_numpy() for t in tables])
    ids = np.concatenate([t.column("group_id").to_numpy() for t in tables])
    assert len(rewards) == kept * n and len(set(ids)) == kept
    for group in set(ids):
        assert rewards_differ(rewards[ids == group].tolist())  # no group without a signal
    assert metrics["rollout/samples"] == metrics["train/samples"] == metrics["rollout/groups"] * n
    # Step 1's counts are exactly what its rounds drew: every prompt kept or filtered, and a
    # refill round exactly when the first round filtered some (max_rounds 3 >= 1).
    assert metrics["rollout/sampling_rounds"] == step1_rounds
    assert metrics["rollout/groups"] + metrics["rollout/filtered_groups"] == start - before
    assert (step1_rounds > 1) == (metrics["rollout/filtered_groups"] > 0)
    assert step1_rounds == 4 or metrics["rollout/groups"] == groups


def test_reinforce_plus_plus_trains_on_step_normalized_advantages(local_ray, tmp_path):
    config = tiny(tmp_path, **{"algorithm.advantage": "reinforce_plus_plus_baseline",
                               "logging.eval_every": "0"})  # fmt: skip
    with Driver(config) as driver:
        metrics = driver.step()  # step 1 through the whole loop
        results = driver.rollouts.results_for(2)  # step 2's rollouts, looked at
        tables = [ray.get(b.ref) for r in results for b in r.batches]
    stored = np.concatenate([t.column("advantage").to_numpy() for t in tables]).astype(float)
    rewards = np.concatenate([t.column("reward").to_numpy() for t in tables]).reshape(-1, 8)
    # Engines store the group-centred reward (no group std), whose spread is far from 1 ...
    assert np.allclose(stored.reshape(-1, 8), rewards - rewards.mean(axis=1, keepdims=True),
                       atol=1e-6)  # fmt: skip
    assert stored.std() < 0.6  # rewards in [0, 1]: a centred one is within +-1
    # ... and the advantages the trainers' loss applied at step 1 (as they report them) are
    # standardized over the step's whole batch.
    assert abs(metrics["train/advantage_mean"]) < 1e-5
    assert abs(metrics["train/advantage_std"] - 1) < 1e-3
    assert np.isfinite(metrics["train/loss"]) and metrics["train/samples"] == 256


@pytest.mark.learning
def test_the_task_is_learned_with_gspo_dynamic_sampling_and_routing_replay(local_ray, tmp_path):
    """GSPO's sequence ratio with its own narrow clip range and sequence-mean aggregation,
    DAPO's dynamic sampling, and R3 (the engines' routing in every batch, which the trainer
    refuses to train without, forced in its forward), on the built-in task: chance to >= 0.9."""
    config = tiny(
        tmp_path,
        **{
            "algorithm.loss": "gspo",  # with GSPO's own clip range and sequence mean
            "rollout.dynamic_sampling": "true",
            "algorithm.routing_replay": "true",
            "logging.save_final_model": "false",
        },
    )
    a = config.algorithm
    assert (a.clip_low, a.clip_high, a.loss_aggregation) == (3e-4, 4e-4, "sequence_mean")
    with Driver(config) as driver:
        summary = driver.run()
    assert summary["first_eval_accuracy"] <= 0.3
    assert summary["last_eval_accuracy"] >= 0.9
