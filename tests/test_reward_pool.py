"""Rewards scored in worker processes (`rl/reward_pool.py`), as the engine produces samples.

The pool itself, directly: a call past `rollout.reward_timeout_s` or a worker that dies costs
that one sample (0.0, counted as a timeout or a crash) and the worker is replaced; an exception
raised by the function still ends the run with the same error as when scored inline; a
cancelled batch stops waiting at once. The transformers engine reports each static batch's
completions before it decodes the next (the SGLang client's per-request reports are tested in
tests/test_sglang_client.py). Then a real RolloutActor on real Ray (transformers
engine, the tiny model): a hung reward costs its sample and the step ends after the timeout; a
reward that SIGKILLs its own process costs one sample and the actor lives on; and rewards are
scored while the engine still generates (the engine's second batch is held until a reward call
has started: with scoring after the generation it would wait in vain).

The reward is `tests/misbehaving_reward.py`, told by each sample's label what to do.
"""

import time
from pathlib import Path

import pyarrow as pa
import pytest
import ray

from config import load_config
from config.errors import UserError
from data.prompts import PromptRecord
from inference.engine import SamplingParams
from inference.transformers_engine import TransformersEngine
from models.tiny import build_tiny_model
from rl.reward_pool import RewardPool, RewardScorer, Sample, Score
from rl.rewards import compute_reward, load_reward_fn
from tests.gated_rollout_actor import GatedRolloutActor

REPO = Path(__file__).resolve().parent.parent
REWARD = "tests.misbehaving_reward:reward"
TIMEOUT_S = 2.0
HANG_S = 600
"""How long the hung reward sleeps (tests/misbehaving_reward.py)."""


def sample(label: str) -> Sample:
    return Sample("1 2 3 4 =", "1", label)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("rollout.reward_workers", "-1", r"rollout.reward_workers=-1 must be >= 0"),
        ("rollout.reward_timeout_s", "0", r"rollout.reward_timeout_s=0 must be > 0"),
    ],
)
def test_settings_out_of_range_are_refused_naming_the_key(key, value, message):
    with pytest.raises(UserError, match=message):
        load_config(REPO / "recipes" / "tiny.yaml", {key: value}).validate()


# --- the pool, directly ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool():
    """One worker, so that every later sample shows the worker was replaced."""
    pool = RewardPool(REWARD, workers=1, timeout_s=TIMEOUT_S)
    yield pool
    pool.close()


def test_each_sample_gets_its_own_score_when_many_are_queued(pool):
    futures = [pool.submit(sample(f"{i / 100}")) for i in range(100)]
    assert [future.result(timeout=60) for future in futures] == [Score(i / 100) for i in range(100)]


def test_a_call_past_the_timeout_costs_that_sample_and_its_worker_is_replaced(pool, tmp_path):
    (tmp_path / "hang").touch()
    start = time.monotonic()
    futures = [pool.submit(sample(label)) for label in ("ok", f"hang:{tmp_path / 'hang'}", "ok")]
    scores = [future.result(timeout=60) for future in futures]
    assert scores == [Score(1.0), Score(0.0, "timeout"), Score(1.0)]
    assert time.monotonic() - start < HANG_S / 10  # the timeout, and a new worker's start


def test_a_worker_killed_while_scoring_costs_one_sample(pool, tmp_path):
    (tmp_path / "die").touch()
    futures = [pool.submit(sample(label)) for label in (f"die:{tmp_path / 'die'}", "ok")]
    assert [future.result(timeout=60) for future in futures] == [Score(0.0, "crash"), Score(1.0)]
    (killed,) = tmp_path.glob("die.*")  # the worker's pid: not this process
    assert int(killed.suffix[1:]) != __import__("os").getpid()


def test_an_exception_in_the_function_is_the_same_error_as_inline(pool):
    with pytest.raises(UserError) as inline:
        compute_reward(load_reward_fn(REWARD), REWARD, *vars(sample("raise")).values())
    with pytest.raises(UserError) as pooled:
        pool.submit(sample("raise")).result(timeout=60)
    assert str(pooled.value) == str(inline.value)
    assert str(pooled.value).startswith(f"reward function {REWARD} raised ValueError")
    cause = str(pooled.value.__cause__)  # the worker's traceback, for error.log
    assert "misbehaving_reward.py" in cause and "ValueError: no answer found" in cause
    assert pool.submit(sample("ok")).result(timeout=60) == Score(1.0)  # the worker goes on


def test_a_cancelled_batch_stops_waiting_and_drops_its_queued_samples(tmp_path):
    scorer = RewardScorer(REWARD, workers=1, timeout_s=HANG_S)
    hang = tmp_path / "hang"
    hang.touch()
    labels = [f"hang:{hang}"] + ["ok"] * 7
    scores = scorer.batch(lambda i, _: sample(labels[i]))
    for i in range(8):
        scores.add(i, None)
    start = time.monotonic()
    # Cancelled once the first call hangs (it took the file): the last ones are still queued
    # (the worker may hold a few more, handed over with the first).
    assert scores.collect([None] * 8, cancelled=lambda: not hang.exists()) is None
    assert time.monotonic() - start < HANG_S / 10
    futures = list(scores._futures.values())
    assert not futures[0].cancelled() and futures[-1].cancelled()
    scorer.close()  # (the hung worker is left to the timeout; it exits with this process)


# --- the transformers engine reports each batch as it is decoded --------------------------------


def test_the_transformers_engine_reports_a_static_batch_before_it_decodes_the_next():
    model = build_tiny_model(seed=0)
    engine = TransformersEngine(model, eos_token_id=-1, pad_token_id=0, max_batch_size=2)
    forwards = 0

    def count(*_):
        nonlocal forwards
        forwards += 1

    model.register_forward_pre_hook(count)
    reported: dict[int, tuple] = {}
    params = SamplingParams(max_new_tokens=3)
    completions = engine.generate(
        [[3, 4, 5]] * 4, params, lambda i, c: reported.update({i: (c, forwards)})
    )
    assert {i: c for i, (c, _) in reported.items()} == dict(enumerate(completions))
    assert reported[0][1] == reported[1][1] < reported[2][1] == forwards  # before batch 2 ran


# --- a rollout actor on real Ray -------------------------------------------------------------


@pytest.fixture(scope="module")
def actor():
    """Groups of 2 samples; batches of 2 prompts, so a 2-group generation is 2 engine batches."""
    config = load_config(
        REPO / "recipes" / "tiny.yaml",
        {
            "rollout.reward": REWARD,
            "rollout.reward_workers": "2",
            "rollout.reward_timeout_s": str(TIMEOUT_S),
            "rollout.samples_per_prompt": "2",
            "rollout.batch_size": "4",
            "rollout.max_batch_size": "2",
            "train.num_workers": "1",
            "rollout.num_engines": "1",
        },
    ).validate()
    ray.init(address="local", num_cpus=2)
    yield ray.remote(GatedRolloutActor).options(num_cpus=0).remote(config, 0)
    ray.shutdown()


def generate(actor, labels: list[str]):
    """One generation of a group per label; (its stats, its rewards in sample order)."""
    groups = [PromptRecord("1 2 3 4 =", label, "test") for label in labels]
    result = ray.get(actor.generate.remote(groups, 0, 1), timeout=HANG_S / 4)
    table = pa.Table.from_batches([ray.get(batch.ref) for batch in result.batches])
    return result.stats, table.column("reward").to_pylist()


def test_a_hung_reward_costs_its_sample_and_the_step_ends_after_the_timeout(actor, tmp_path):
    (tmp_path / "hang").touch()
    start = time.monotonic()
    stats, rewards = generate(actor, [f"hang:{tmp_path / 'hang'}", "ok"])
    assert time.monotonic() - start < HANG_S / 10
    assert sorted(rewards) == [0.0, 1.0, 1.0, 1.0]
    assert (stats.reward_timeouts, stats.reward_crashes) == (1, 0)


def test_a_reward_that_kills_its_process_costs_one_sample_and_the_actor_lives(actor, tmp_path):
    (tmp_path / "die").touch()
    stats, rewards = generate(actor, [f"die:{tmp_path / 'die'}", "ok"])
    assert sorted(rewards) == [0.0, 1.0, 1.0, 1.0]
    assert (stats.reward_timeouts, stats.reward_crashes) == (0, 1)
    stats, rewards = generate(actor, ["ok", "ok"])  # the same actor, a new worker
    assert rewards == [1.0] * 4 and stats.reward_crashes == 0


def test_rewards_are_scored_while_the_engine_still_generates(actor, tmp_path):
    marker = tmp_path / "a reward call started"
    ray.get(actor.hold_second_batch_until.remote(str(marker), 20))
    _, rewards = generate(actor, [f"mark:{marker}", "ok"])
    assert rewards == [1.0] * 4
    assert ray.get(actor.gate_opened.remote()) is True
