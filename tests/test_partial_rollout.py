"""`rollout.partial`: what a weight update does to the generations running ahead of training.

With one-step-off (`algorithm.max_staleness 1`) the next step's generation runs while a step
trains. `finish` waits for it at the weight update (tests/test_loop.py: its samples are one
version old); `abort` cancels it and generates its prompt groups again with the new weights.
A slow reward keeps each generation running past the training step, so the abort path runs.
"""

from collections import Counter
from pathlib import Path

import pytest
import ray
import torch

from config import load_config
from config.errors import UserError
from driver import Driver
from inference.engine import SamplingParams
from inference.transformers_engine import TransformersEngine
from models.tiny import build_tiny_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4)
    yield
    ray.shutdown()


def test_abort_regenerates_the_running_groups_with_the_new_weights(local_ray, tmp_path):
    config = load_config(
        REPO / "recipes" / "tiny.yaml",
        {
            "algorithm.max_staleness": "1",
            "rollout.partial": "abort",
            "rollout.reward": "tests.slow_reward:reward",
            "num_steps": "5",
            "train.num_workers": "1",  # the engines abort and regenerate; one rank trains
            "logging.eval_every": "0",
            "logging.output_dir": str(tmp_path),
            "logging.progress_bar": "false",
        },
    )
    with Driver(config) as driver:
        versions = record_weight_versions(driver)
        steps = [driver.step() for _ in range(5)]
    groups, n = config.rollout.prompts_per_step, config.rollout.samples_per_prompt
    assert steps[0]["async/aborted_groups"] == 0  # generated before any update
    assert sum(m["async/aborted_groups"] for m in steps) >= groups  # at least one whole step
    for m, trained in zip(steps, versions, strict=True):
        assert m["rollout/samples"] == m["train/samples"] == config.rollout.batch_size
        assert m["async/dropped_samples"] == 0
        # Each sample's weight_version: an aborted group's was generated again after the last
        # update, with the weights this step trains from; the rest are one version older
        # (step 1's came from the initial weights, as step 2's did).
        newest, aborted = m["weight_version"] - 1, m["async/aborted_groups"]
        expected = Counter({newest: aborted * n})
        expected[max(newest - 1, 0)] += (groups - aborted) * n
        assert trained == expected, f"step {m['weight_version']}: aborted {aborted} groups"


def record_weight_versions(driver: Driver) -> list[Counter]:
    """Each step's rollouts, as the driver takes them from its queue: how many samples each
    weight version generated (the Arrow batches' weight_version column)."""
    versions, results_for = [], driver.rollouts.results_for

    def counted(step: int) -> list:
        results = results_for(step)
        columns = ray.get([b.ref for r in results for b in r.batches])
        versions.append(Counter(v for c in columns for v in c.column("weight_version").to_pylist()))
        return results

    driver.rollouts.results_for = counted
    return versions


def test_a_cancelled_generation_stops_at_the_next_decoding_step():
    model = build_tiny_model(seed=0)
    engine = TransformersEngine(model, eos_token_id=-1, pad_token_id=0)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0)
    torch.manual_seed(0)
    assert all(len(c.token_ids) == 6 for c in engine.generate([[3, 4, 5]] * 4, params))
    engine.should_stop = lambda: True
    assert all(len(c.token_ids) == 1 for c in engine.generate([[3, 4, 5]] * 4, params))


def test_abort_needs_generations_running_ahead(tmp_path):
    with pytest.raises(UserError, match=r"rollout.partial=abort .* algorithm.max_staleness=0"):
        load_config(REPO / "recipes" / "tiny.yaml", {"rollout.partial": "abort"}).validate()
