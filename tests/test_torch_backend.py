"""PyTorch backend: a data-parallel step equals one big step; KL to the reference; empty shares."""

import dataclasses
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from config import load_config
from data.schema import build_rollout_batch
from training.torch_backend import TorchBackend


def config(**overrides):
    # Adam's first step moves a weight by lr * g / (|g| + eps): with the default eps 1e-8, a
    # gradient element that sums to ~0 turns reduction-order rounding into up to 2 lr of
    # weight. eps 1e-5 bounds that amplification, so weights can be compared tightly.
    return load_config(None, {"train.grad_clip": "0", "train.adam_eps": "1e-5", **overrides})


def rollout_batch(seed: int, rows: int):
    """Rows of random prompts/responses with varied lengths, as an engine would write them."""
    g = torch.Generator().manual_seed(seed)
    columns = {
        name: []
        for name in (
            "prompt_ids",
            "response_ids",
            "rollout_log_probs",
            "loss_mask",
            "reward",
            "advantage",
            "group_id",
            "sample_index",
            "weight_version",
            "finish_reason",
        )
    }
    for i in range(rows):
        p, r = 2 + i % 4, 1 + (3 * i) % 5
        columns["prompt_ids"].append(torch.randint(3, 14, (p,), generator=g).tolist())
        columns["response_ids"].append(torch.randint(1, 14, (r,), generator=g).tolist())
        columns["rollout_log_probs"].append((-torch.rand(r, generator=g) * 3).tolist())
        columns["loss_mask"].append([1] * r)
        columns["reward"].append(float(i % 2))
        columns["advantage"].append(float(torch.randn(1, generator=g)))
        columns["group_id"].append(i // 4)
        columns["sample_index"].append(i % 4)
        columns["weight_version"].append(0)
        columns["finish_reason"].append("length")
    return build_rollout_batch(columns)


def response_tokens(batches) -> int:
    return sum(len(x) for b in batches for x in b.column("response_ids").to_pylist())


def _rank_main(rank: int, world: int, port: int, shares, normalizer, budget, out_path):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.set_num_threads(1)
    backend = TorchBackend(
        config(**{"train.max_tokens_per_micro_batch": str(budget)}), torch.device("cpu")
    )
    stats = backend.train(shares[rank], normalizer)
    weights = dict(backend.named_weights())
    torch.save(
        {"weights": weights, "loss": stats.loss, "grad_norm": stats.grad_norm}, f"{out_path}.{rank}"
    )
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_with_uneven_shares_equal_one_rank_on_everything(tmp_path):
    """The global token normalizer and DDP's sum make the split irrelevant: same update."""
    batches = [rollout_batch(seed, rows) for seed, rows in ((1, 12), (2, 4), (3, 8))]
    normalizer = response_tokens(batches)
    single = TorchBackend(config(), torch.device("cpu"))
    stats = single.train(batches, normalizer)
    expected = dict(single.named_weights())

    out = tmp_path / "rank.pt"
    shares = [[batches[0]], [batches[1], batches[2]]]  # 12 rows vs 12 rows, different tokens
    # A 40-token budget gives each rank several micro-batches (gradient accumulation, no_sync).
    mp.spawn(_rank_main, args=(2, free_port(), shares, normalizer, 40, str(out)), nprocs=2)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    # The loss and the all-reduced gradient are those of one rank holding everything (Adam
    # hides a wrong gradient scale in the weights; the gradient norm does not).
    assert ranks[0]["loss"] + ranks[1]["loss"] == pytest.approx(stats.loss, abs=1e-6)
    for result in ranks:
        assert result["grad_norm"] == pytest.approx(stats.grad_norm, rel=1e-5)
        for name, weight in expected.items():
            torch.testing.assert_close(result["weights"][name], weight, rtol=0, atol=2e-6, msg=name)


def test_micro_batch_budget_does_not_change_the_update():
    batches = [rollout_batch(4, 16)]
    normalizer = response_tokens(batches)
    results = []
    for budget in (10_000, 24):
        backend = TorchBackend(
            config(**{"train.max_tokens_per_micro_batch": str(budget)}), torch.device("cpu")
        )
        stats = backend.train(batches, normalizer)
        results.append((stats, dict(backend.named_weights())))
    (big, w_big), (small, w_small) = results
    assert small.micro_batches > big.micro_batches == 1
    assert big.loss == pytest.approx(small.loss, abs=1e-6)
    for name in w_big:
        torch.testing.assert_close(w_small[name], w_big[name], rtol=0, atol=2e-6)


def test_kl_to_reference_is_zero_at_start_and_grows_after_updates():
    backend = TorchBackend(
        config(**{"algorithm.kl_coef": "0.1", "train.lr": "0.05"}), torch.device("cpu")
    )
    batches = [rollout_batch(5, 8)]
    first = backend.train(batches, response_tokens(batches))
    assert first.kl_loss == pytest.approx(0.0, abs=1e-7)
    second = backend.train(batches, response_tokens(batches))
    assert second.kl_loss > 1e-5
    assert second.loss == pytest.approx(second.policy_loss + 0.1 * second.kl_loss, abs=1e-6)


def test_empty_share_still_steps_with_zero_gradient():
    backend = TorchBackend(config(), torch.device("cpu"))
    before = {n: w.clone() for n, w in backend.named_weights()}
    stats = backend.train([], normalizer=10.0)
    assert stats.samples == 0 and stats.grad_norm == 0.0
    for name, weight in backend.named_weights():
        assert torch.equal(weight, before[name])


def test_sequence_mean_weights_every_sample_equally():
    """With sequence_mean, a sample's loss does not grow with its length."""
    cfg = config(**{"algorithm.loss_aggregation": "sequence_mean"})
    batches = [rollout_batch(6, 8)]
    stats = TorchBackend(cfg, torch.device("cpu")).train(batches, normalizer=8)
    token_mean = TorchBackend(config(), torch.device("cpu")).train(
        batches, response_tokens(batches)
    )
    assert stats.loss != pytest.approx(token_mean.loss, abs=1e-7)
    assert dataclasses.asdict(stats).keys() == dataclasses.asdict(token_mean).keys()
