"""Mini-batches and epochs (train.global_batch_size, train.epochs) on the torch backend: one
mini-batch is today's step; k mini-batches take k optimizer steps, the first of them today's
step on its rows bit for bit (its ratio exactly 1), the PPO clip acting on the later ones;
two data-parallel ranks step like one rank holding their mini-batches; epochs repeat them."""

import dataclasses
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from config import load_config
from config.errors import UserError
from tests.test_torch_backend import config, response_tokens, rollout_batch
from training import torch_backend
from training.batch import rows_of
from training.mini_batches import contiguous_parts, mini_batch_count, plan_mini_batches
from training.torch_backend import TorchBackend

RECOMPUTE = {"algorithm.old_log_probs": "recompute", "train.lr": "0.05", "rollout.batch_size": "48"}
"""The trainer's own old log-probs (a ratio of exactly 1 in one step), steps large enough for
the ratio to leave the clip range after one, and a rollout batch size that the tests' global
batch sizes divide (what start-up checks; the tests' batches have fewer rows)."""


def adam_steps(backend: TorchBackend) -> set[int]:
    """The step count of every parameter's Adam state: how many optimizer steps ran."""
    return {int(state["step"]) for state in backend.optimizer.state.values()}


def weights(backend: TorchBackend) -> dict[str, torch.Tensor]:
    return {name: w.clone() for name, w in backend.named_weights()}


def first_step_weights(backend: TorchBackend) -> dict[str, torch.Tensor]:
    """Fills, at the backend's first optimizer step, the weights it left (a spy around the
    real `optimizer.step`)."""
    taken: dict[str, torch.Tensor] = {}
    step = backend.optimizer.step

    def spy(*args, **kwargs):
        result = step(*args, **kwargs)
        if not taken:
            taken.update(weights(backend))
        return result

    backend.optimizer.step = spy
    return taken


def test_the_first_of_k_mini_batches_is_todays_step_on_its_rows_bit_for_bit():
    batch = rollout_batch(4, 16)
    split = TorchBackend(
        config(**RECOMPUTE, **{"train.global_batch_size": "8"}), torch.device("cpu")
    )
    after_first = first_step_weights(split)
    stats = split.train([batch], response_tokens([batch]))
    first_half = [batch.slice(0, 8)]  # contiguous parts: rows 0-7, then 8-15
    today = TorchBackend(config(**RECOMPUTE), torch.device("cpu"))
    today.train(first_half, response_tokens(first_half))
    expected = weights(today)
    assert adam_steps(split) == {2} and stats.optimizer_steps == 2
    for name, weight in expected.items():
        assert torch.equal(after_first[name], weight), name
    assert any(not torch.equal(w, expected[n]) for n, w in weights(split).items())


def test_global_batch_size_of_the_whole_batch_is_todays_single_step():
    batches = [rollout_batch(5, 12)]
    results = []
    for extra in ({}, {"train.global_batch_size": "12"}):
        backend = TorchBackend(config(**RECOMPUTE, **extra), torch.device("cpu"))
        results.append((backend.train(batches, response_tokens(batches)), weights(backend)))
    (today, w_today), (whole, w_whole) = results
    timeless = [dataclasses.replace(s, compute_seconds=0.0) for s in (today, whole)]
    assert timeless[0] == timeless[1] and whole.optimizer_steps == 1
    assert all(torch.equal(w_whole[n], w) for n, w in w_today.items())


def test_k_mini_batches_take_k_steps_and_the_clip_acts_after_the_first(monkeypatch):
    clipped_per_call = []
    real_policy_term = torch_backend.policy_term

    def spy(log_probs, mb, settings):
        out = real_policy_term(log_probs, mb, settings)
        clipped_per_call.append(int((out[1].clipped & mb.loss_mask.bool()).sum()))
        return out

    monkeypatch.setattr(torch_backend, "policy_term", spy)
    batches = [rollout_batch(6, 16)]
    cfg = config(**RECOMPUTE, **{"train.global_batch_size": "4"})
    backend = TorchBackend(cfg, torch.device("cpu"))
    stats = backend.train(batches, response_tokens(batches))
    assert adam_steps(backend) == {4} and stats.optimizer_steps == 4
    assert len(clipped_per_call) == 4  # one micro-batch per mini-batch (budget 8192 tokens)
    assert clipped_per_call[0] == 0  # the weights the old log-probs were taken with
    assert sum(clipped_per_call[1:]) > 0
    assert stats.clipped_sum / stats.tokens > 0
    # One step on the same rows: the ratio is exactly 1 and nothing clips.
    single = TorchBackend(config(**RECOMPUTE), torch.device("cpu"))
    assert single.train(batches, response_tokens(batches)).clipped_sum == 0


def test_epochs_run_the_mini_batches_again_and_count_the_rows_once():
    batches = [rollout_batch(7, 12)]
    runs = {}
    for epochs in (1, 2):
        overrides = {"train.global_batch_size": "6", "train.epochs": str(epochs)}
        backend = TorchBackend(config(**RECOMPUTE, **overrides), torch.device("cpu"))
        runs[epochs] = (backend.train(batches, response_tokens(batches)), adam_steps(backend))
    (once, once_steps), (twice, twice_steps) = runs[1], runs[2]
    assert once_steps == {2} and twice_steps == {4}
    assert (once.optimizer_steps, twice.optimizer_steps) == (2, 4)
    assert twice.tokens == once.tokens == response_tokens(batches)
    assert twice.samples == once.samples == 12


TWO_HALVES = {**RECOMPUTE, "train.lr": "1e-3", "train.global_batch_size": "12"}
"""Two mini-batches of 24 rows; a small step, so that reduction-order rounding, which Adam
amplifies by lr / adam_eps, stays below the weights' tolerance."""


def _rank_main(rank: int, world: int, port: int, shares, normalizer, out_path):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.set_num_threads(1)
    backend = TorchBackend(config(**TWO_HALVES), torch.device("cpu"))
    stats = backend.train(shares[rank], normalizer)
    torch.save({"weights": weights(backend), "loss": stats.loss}, f"{out_path}.{rank}")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_ranks_step_like_one_rank_holding_their_mini_batches(tmp_path):
    """Each rank cuts its share into contiguous halves; mini-batch j is every rank's half j,
    normalized by its tokens over both ranks (all-reduced)."""
    a, b = rollout_batch(8, 12), rollout_batch(9, 12)
    normalizer = response_tokens([a, b])
    out = tmp_path / "rank.pt"
    mp.spawn(_rank_main, args=(2, free_port(), [[a], [b]], normalizer, str(out)), nprocs=2)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    single = TorchBackend(config(**TWO_HALVES), torch.device("cpu"))
    ordered = [a.slice(0, 6), b.slice(0, 6), a.slice(6), b.slice(6)]
    stats = single.train(ordered, normalizer)
    assert ranks[0]["loss"] + ranks[1]["loss"] == pytest.approx(stats.loss, abs=1e-6)
    for result in ranks:
        for name, weight in weights(single).items():
            torch.testing.assert_close(result["weights"][name], weight, rtol=0, atol=2e-6)


def test_a_short_step_takes_fewer_steps_none_larger_nothing_dropped():
    assert mini_batch_count(256, 64) == 4
    assert mini_batch_count(200, 64) == 4  # 50 each: dynamic sampling left fewer samples
    assert mini_batch_count(40, 64) == 1
    assert mini_batch_count(256, 0) == 1
    assert contiguous_parts(5, 3) == [[0], [1, 2], [3, 4]]
    assert contiguous_parts(1, 3) == [[], [], [0]]


def test_a_mini_batch_with_no_loss_token_takes_no_step():
    """A mini-batch with nothing to learn from on any rank is skipped, not an Adam step on a
    zero gradient (whose momentum would still move the weights). (One empty on every rank
    needs global_batch_size below the data-parallel size, refused below.)"""
    rows = rows_of([rollout_batch(0, 2)])
    masks = [rows.loss_masks[0] * 0, rows.loss_masks[1]]
    rows = dataclasses.replace(rows, loss_masks=masks)
    train = dataclasses.replace(config().train, global_batch_size=1)
    planned = plan_mini_batches(rows, 1.0, train, "token_mean", torch.device("cpu"))
    assert [m.rows for m in planned] == [[1]]
    assert planned[0].normalizer == float(masks[1].sum())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.global_batch_size": "48"}, "train.global_batch_size=48 does not divide"),
        (
            {"train.global_batch_size": "2", "train.num_workers": "4"},
            "train.global_batch_size=2 is below the 4 data-parallel ranks",
        ),
        ({"train.global_batch_size": "-1"}, "train.global_batch_size=-1 must be >= 0"),
        ({"train.epochs": "0"}, "train.epochs=0 must be >= 1"),
    ],
)
def test_mini_batch_settings_that_cannot_hold_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, {"rollout.batch_size": "256", **overrides})


def test_epochs_run_the_frozen_reference_once_per_micro_batch_with_the_same_result(monkeypatch):
    """With a KL term and 2 epochs each micro-batch trains twice; the reference's log-probs
    cannot change, so it runs once per micro-batch, and the weights are those of running it
    at every step, bit for bit."""
    batches = [rollout_batch(7, 12)]
    overrides = {
        **RECOMPUTE,
        "algorithm.kl_coef": "0.1",
        "train.global_batch_size": "6",
        "train.epochs": "2",
    }
    results, forwards = {}, {}
    for once in (True, False):
        backend = TorchBackend(config(**overrides), torch.device("cpu"))
        if not once:  # the reference at every micro step, as before
            monkeypatch.setattr(backend, "_reference_log_probs", lambda parts, plans: None)
        forwards[once] = 0

        def count(*args, once=once):
            forwards[once] += 1

        backend.reference.get_decoder().register_forward_hook(count)
        stats = backend.train(batches, response_tokens(batches))
        results[once] = weights(backend)
        assert stats.optimizer_steps == 4
    assert forwards[False] == 2 * forwards[True] > 0
    for name, weight in results[True].items():
        assert torch.equal(weight, results[False][name]), name
