"""Chunked log-probs and entropy from hidden states (training/token_stats.py) against the
full-logits computation: values and gradients, in one piece, in chunks, and split over the
vocabulary of two gloo ranks as Megatron's tensor parallelism splits it."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.token_stats import VocabShard, token_stats

TEMPERATURE = 0.7


def inputs(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, 16, generator=g, dtype=dtype)
    weight = torch.randn(50, 16, generator=g, dtype=dtype) * 0.5
    targets = torch.randint(0, 50, (3, 7), generator=g)
    # Weights of the two outputs in the scalar whose gradient is compared.
    a, b = torch.randn(3, 7, generator=g, dtype=dtype), torch.randn(3, 7, generator=g, dtype=dtype)
    return hidden, weight, targets, a, b


def full(hidden, weight, targets):
    """The direct computation over the whole [tokens, vocab] logits."""
    logits = hidden @ weight.t() / TEMPERATURE
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_p.gather(-1, targets[..., None])[..., 0], entropy


def assert_close(got, want, name=""):
    """Within 1e-6 relative, norm-wise: a sum over a different order (chunks, ranks) of fp32
    numbers moves single elements near 0 by more than 1e-6 of themselves, not the whole."""
    assert ((got - want).norm() / want.norm()).item() < 1e-6, name


def values_and_grads(fn, hidden, weight, targets, a, b):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    log_probs, entropy = fn(hidden, weight, targets)
    ((log_probs * a).sum() + (entropy * b).sum()).backward()
    return log_probs.detach(), entropy.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk", [0, 1, 5, 21, 1024])
def test_chunked_log_probs_and_entropy_equal_the_full_ones_with_gradients(chunk):
    args = inputs()
    expected = values_and_grads(full, *args)
    ours = values_and_grads(
        lambda h, w, t: token_stats(h, w, t, TEMPERATURE, chunk, entropy_grad=True), *args
    )
    names = ("log_probs", "entropy", "d hidden", "d weight")
    for name, got, want in zip(names, ours, expected, strict=True):
        assert_close(got, want, name)


def test_entropy_is_that_of_the_tempered_softmax():
    hidden, weight, targets, _, _ = inputs(1, torch.float64)
    _, entropy = token_stats(hidden, weight, targets, TEMPERATURE, 4)
    p = torch.softmax(hidden @ weight.t() / TEMPERATURE, dim=-1)
    direct = -(p * p.log()).sum(-1)
    torch.testing.assert_close(entropy, direct, rtol=1e-12, atol=1e-12)
    uniform = token_stats(torch.zeros(1, 2, 16), weight.float(), targets[:1, :2], 1.0, 4)[1]
    torch.testing.assert_close(uniform, torch.full((1, 2), torch.log(torch.tensor(50.0)).item()))


def test_without_entropy_grad_the_entropy_is_detached_and_costs_no_gradient():
    hidden, weight, targets, a, _ = inputs(2)
    hidden.requires_grad_(True)
    log_probs, entropy = token_stats(hidden, weight, targets, TEMPERATURE, 5)
    assert log_probs.requires_grad and not entropy.requires_grad
    (log_probs * a).sum().backward()
    expected = values_and_grads(full, hidden.detach(), weight, targets, a, torch.zeros_like(a))
    assert_close(hidden.grad, expected[2])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vocab_parallel_rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    hidden, weight, targets, a, b = inputs(3)
    rows = weight.shape[0] // 2
    shard = VocabShard(start=rank * rows, group=dist.group.WORLD)
    hidden.requires_grad_(True)
    part = weight[rank * rows : (rank + 1) * rows].clone().requires_grad_(True)
    log_probs, entropy = token_stats(hidden, part, targets, TEMPERATURE, 4, True, shard)
    ((log_probs * a).sum() + (entropy * b).sum()).backward()
    # What megatron-core's copy to the tensor-parallel region does in the backward.
    dist.all_reduce(hidden.grad)
    torch.save([log_probs.detach(), entropy.detach(), hidden.grad, part.grad], f"{out}.{rank}")
    dist.destroy_process_group()


def test_the_vocabulary_split_over_two_ranks_gives_the_full_results(tmp_path):
    out = str(tmp_path / "rank")
    mp.spawn(_vocab_parallel_rank, args=(_free_port(), out), nprocs=2)
    log_probs, entropy, d_hidden, d_weight = values_and_grads(full, *inputs(3))
    ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for got in ranks:
        assert_close(got[0], log_probs, "log_probs")
        assert_close(got[1], entropy, "entropy")
        assert_close(got[2], d_hidden, "d hidden")
    assert_close(torch.cat([r[3] for r in ranks]), d_weight, "d weight")


# The torch backend: train/entropy and the entropy bonus.


def backend_step(entropy_coef: str):
    from tests.test_torch_backend import config, response_tokens, rollout_batch
    from training.torch_backend import TorchBackend

    overrides = {"algorithm.entropy_coef": entropy_coef, "train.log_prob_chunk_tokens": "7"}
    backend = TorchBackend(config(**overrides), torch.device("cpu"))
    batches = [rollout_batch(8, 8)]
    stats = backend.train(batches, response_tokens(batches))
    return batches, stats, dict(backend.named_weights())


def direct_entropy(batches) -> float:
    """The mean over loss tokens of the tempered softmax's entropy, from the full logits of the
    model the backend starts from."""
    from config import load_config
    from models.loading import load_model
    from training.batch import pad_micro_batch, rows_of

    config = load_config(None)
    rows = rows_of(batches)
    mb = pad_micro_batch(rows, list(range(len(rows))))
    with torch.no_grad():
        model = load_model(config.model, config.seed)
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
    p = torch.softmax(logits[:, :-1].double() / config.rollout.temperature, dim=-1)
    entropy = -(p * p.log()).sum(-1)
    return ((entropy * mb.loss_mask).sum() / mb.loss_mask.sum()).item()


def test_train_entropy_is_the_mean_entropy_of_the_loss_tokens_and_the_bonus_enters_the_loss():
    batches, off, weights_off = backend_step("0")
    assert off.entropy == pytest.approx(direct_entropy(batches), rel=1e-6)
    assert off.loss == off.policy_loss  # no bonus: the loss is untouched
    _, on, weights_on = backend_step("0.5")
    assert on.entropy == pytest.approx(off.entropy, rel=1e-6)  # the same weights before
    assert on.policy_loss == pytest.approx(off.policy_loss, rel=1e-6)
    assert on.loss == pytest.approx(on.policy_loss - 0.5 * on.entropy, rel=1e-6)
    assert any(not torch.equal(weights_on[n], weights_off[n]) for n in weights_off)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"algorithm.entropy_coef": "-0.1"}, "algorithm.entropy_coef=-0.1 must be >= 0"),
        ({"train.log_prob_chunk_tokens": "-2"}, "train.log_prob_chunk_tokens=-2 must be >= -1"),
    ],
)
def test_bad_values_are_refused_by_name(overrides, message):
    from config import UserError, load_config

    with pytest.raises(UserError, match=message):
        load_config(None, overrides)
