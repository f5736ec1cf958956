"""The RL math against hand-computed numbers, the reference formulas and their known properties."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.train_actor import normalized_advantages
from rl.grpo import (
    aggregate,
    batch_shift_scale,
    group_advantages,
    kl_penalty,
    log_prob_mismatch,
    log_probs_from_logits,
    normalizer_count,
    policy_loss,
)

# ---------------------------------------------------------------- advantages


def test_grpo_advantages_match_hand_computed_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    advantages = group_advantages(rewards, normalize_std=True, eps=0.0)
    # group 1: mean 0.5, population std 0.5; group 2: mean 0.75, std sqrt(27/16) = 1.299...
    std2 = math.sqrt((3 * 0.75**2 + 2.25**2) / 4)
    expected = torch.tensor(
        [[1.0, -1.0, -1.0, 1.0], [-0.75 / std2, -0.75 / std2, -0.75 / std2, 2.25 / std2]]
    )
    torch.testing.assert_close(advantages, expected)
    assert advantages.dtype == torch.float32


def test_advantages_use_population_std_so_each_group_has_unit_rms():
    # two samples {0, 1}: the unbiased std (0.707) would give +-0.707, the population std +-1
    advantages = group_advantages(torch.tensor([[0.0, 1.0]]), normalize_std=True)
    torch.testing.assert_close(advantages, torch.tensor([[-1.0, 1.0]]), atol=1e-5, rtol=0)
    many = group_advantages(torch.rand(5, 8), normalize_std=True, eps=0.0)
    torch.testing.assert_close(many.square().mean(dim=1), torch.ones(5))


def test_dr_grpo_advantages_are_centred_rewards_only():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [-0.75, -0.75, -0.75, 2.25]])
    torch.testing.assert_close(group_advantages(rewards, normalize_std=False), expected)


def test_a_group_of_equal_rewards_gets_exactly_zero_advantages():
    rewards = torch.full((2, 8), 0.1)
    for normalize in (True, False):
        assert torch.equal(group_advantages(rewards, normalize), torch.zeros(2, 8))


def test_advantages_reject_a_flat_reward_vector():
    with pytest.raises(ValueError, match="num_groups, group_size"):
        group_advantages(torch.zeros(8), normalize_std=True)


# ---------------------------------------------------------------- log-probs


def _reference_log_probs(logits, targets, temperature):
    log_softmax = torch.log_softmax(logits.float() / temperature, dim=-1)
    return log_softmax.gather(-1, targets[..., None]).squeeze(-1)


@pytest.mark.parametrize("chunk_elements", [1 << 25, 3 * 11])  # one chunk / 3 positions a chunk
@pytest.mark.parametrize("contiguous", [False, True])
def test_log_probs_match_log_softmax_gather_in_value_and_gradient(chunk_elements, contiguous):
    torch.manual_seed(0)
    full = torch.randn(3, 8, 11, requires_grad=True)
    logits = full[:, :-1]  # a non-contiguous view, as a trainer slices off the last position
    if contiguous:
        logits = logits.contiguous()
    targets = torch.randint(0, 11, (3, 7))
    weights = torch.randn(3, 7)

    ours = log_probs_from_logits(logits, targets, 0.7, chunk_elements=chunk_elements)
    (grad,) = torch.autograd.grad((ours * weights).sum(), full)
    reference = _reference_log_probs(logits, targets, 0.7)
    (reference_grad,) = torch.autograd.grad((reference * weights).sum(), full)

    assert ours.shape == (3, 7) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grad, reference_grad)


def test_log_probs_of_bf16_logits_are_float32_and_gradient_keeps_logits_dtype():
    torch.manual_seed(0)
    logits = (torch.randn(2, 5, 13) * 4).bfloat16().requires_grad_()
    targets = torch.randint(0, 13, (2, 5))
    ours = log_probs_from_logits(logits, targets, 1.0, chunk_elements=26)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, _reference_log_probs(logits.detach(), targets, 1.0))
    ours.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_log_probs_keep_no_float32_copy_of_the_logits_for_backward():
    logits = torch.randn(2, 64, 1000).bfloat16().requires_grad_()
    targets = torch.randint(0, 1000, (2, 64))
    saved_bytes = []

    def pack(tensor):
        saved_bytes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        log_probs_from_logits(logits, targets, 0.8, chunk_elements=4096)
    # bf16 logits (2 bytes each) + per-token targets and logsumexp; log_softmax would save
    # its float32 output (4 bytes per logit)
    assert sum(saved_bytes) < logits.numel() * 2 + 2 * 64 * 16


def test_log_probs_gradient_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 6, (2, 4))
    assert torch.autograd.gradcheck(
        lambda x: log_probs_from_logits(x, targets, 1.3, chunk_elements=12), (logits,)
    )


# ---------------------------------------------------------------- policy loss


def _loss_and_grad(ratio: float, advantage: float, clip_low=0.2, clip_high=0.28):
    log_probs = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, stats = policy_loss(
        log_probs, torch.zeros(1, 1), torch.tensor([[advantage]]), clip_low, clip_high
    )
    loss.sum().backward()
    return loss.item(), log_probs.grad.item(), stats


@pytest.mark.parametrize(
    "ratio, advantage, clipped",
    [
        (1.30, 1.0, "high"),  # past 1 + clip_high = 1.28 with A > 0: clipped
        (1.25, 1.0, None),  # would be clipped by a symmetric 0.2, not by clip_high 0.28
        (0.50, 1.0, None),  # A > 0 and ratio small: PPO keeps the gradient
        (0.75, -1.0, "low"),  # below 1 - clip_low = 0.8 with A < 0: clipped
        (0.85, -1.0, None),
        (1.50, -1.0, None),  # A < 0 and ratio large: PPO keeps the gradient
    ],
)
def test_clip_low_and_high_act_separately(ratio, advantage, clipped):
    loss, grad, stats = _loss_and_grad(ratio, advantage)
    bound = min(max(ratio, 0.8), 1.28)
    assert loss == pytest.approx(-min(ratio * advantage, bound * advantage))
    assert stats.clipped_high.item() == (clipped == "high")
    assert stats.clipped_low.item() == (clipped == "low")
    assert stats.ratio.item() == pytest.approx(ratio)
    if clipped:
        assert grad == 0.0
    else:
        # d(-ratio * A) / d log_prob = -ratio * A: descent raises log-probs of A > 0 tokens
        assert grad == pytest.approx(-ratio * advantage)
        assert (grad < 0) == (advantage > 0)


def test_policy_loss_broadcasts_sequence_advantages_and_reports_clip_fraction():
    log_probs = torch.log(torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]]))
    advantages = torch.tensor([[1.0], [-1.0]])
    loss, stats = policy_loss(log_probs, torch.zeros(2, 3), advantages, 0.2, 0.2)
    expected_clipped = torch.tensor([[False, True, False], [False, False, True]])
    assert torch.equal(stats.clipped, expected_clipped)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert aggregate(stats.clipped.float(), mask, "token_mean").item() == pytest.approx(1 / 5)
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -1.2, -0.5], [1.0, 1.5, 0.8]]))


def test_policy_loss_gradient_is_finite_for_extreme_ratios():
    log_probs = torch.tensor([[200.0, -200.0]], requires_grad=True)
    loss, _ = policy_loss(log_probs, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), 0.2, 0.2)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(log_probs.grad).all()


# ---------------------------------------------------------------- KL


def test_kl_estimators_follow_their_formulas():
    log_probs = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    d = log_probs - ref
    torch.testing.assert_close(kl_penalty(log_probs, ref, "k1"), d)
    torch.testing.assert_close(kl_penalty(log_probs, ref, "k2"), d**2 / 2)
    torch.testing.assert_close(kl_penalty(log_probs, ref, "k3"), torch.exp(-d) - 1 + d)
    torch.testing.assert_close(kl_penalty(log_probs, ref, "low_var_kl"), torch.exp(-d) - 1 + d)
    assert kl_penalty(log_probs, ref, "k3")[0].item() == pytest.approx(math.exp(-0.5) - 0.5)


def test_k1_and_k3_are_unbiased_for_the_exact_kl():
    # E_{x~pi}[k(x)] over a whole categorical distribution equals KL(pi || ref) exactly
    torch.manual_seed(0)
    log_pi = torch.log_softmax(torch.randn(50, dtype=torch.float64), 0)
    log_ref = torch.log_softmax(torch.randn(50, dtype=torch.float64), 0)
    exact = (log_pi.exp() * (log_pi - log_ref)).sum()
    for kind in ("k1", "k3"):
        expectation = (log_pi.exp() * kl_penalty(log_pi, log_ref, kind)).sum()
        torch.testing.assert_close(expectation, exact)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_is_zero_where_policies_agree(kind):
    log_probs = torch.randn(4, 6)
    assert torch.equal(kl_penalty(log_probs, log_probs.clone(), kind), torch.zeros(4, 6))


def test_k2_and_k3_are_never_negative():
    torch.manual_seed(0)
    log_probs, ref = torch.randn(1000) * 3, torch.randn(1000) * 3
    assert (kl_penalty(log_probs, ref, "k2") >= 0).all()
    assert (kl_penalty(log_probs, ref, "k3") >= 0).all()


def test_low_var_kl_is_clamped_at_ten_with_a_finite_gradient():
    log_probs = torch.tensor([-30.0, -100.0, 0.0], requires_grad=True)
    ref = torch.tensor([0.0, 0.0, 0.0])
    kl = kl_penalty(log_probs, ref, "low_var_kl")
    assert kl.tolist() == [10.0, 10.0, 0.0]
    kl.sum().backward()
    assert torch.isfinite(log_probs.grad).all()


def test_unknown_kl_kind_is_rejected():
    with pytest.raises(ValueError, match="k1, k2, k3, low_var_kl"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


# ---------------------------------------------------------------- aggregation


def _split_step():
    """A step of 2 ranks x 3 micro-batches of ragged masks, and the flat list of sequences."""
    generator = torch.Generator().manual_seed(0)
    ranks = []
    for _ in range(2):
        micro_batches = []
        for batch, length in ((2, 5), (3, 4), (1, 7)):
            values = torch.randn(batch, length, dtype=torch.float64, generator=generator)
            lengths = torch.randint(1, length + 1, (batch,), generator=generator)
            mask = (torch.arange(length)[None] < lengths[:, None]).long()
            micro_batches.append((values, mask))
        ranks.append(micro_batches)
    return ranks


def test_token_mean_split_over_ranks_and_micro_batches_is_the_global_token_mean():
    ranks = _split_step()
    flat_values = torch.cat([v[m.bool()] for mbs in ranks for v, m in mbs])
    global_tokens = sum(normalizer_count(m, "token_mean") for mbs in ranks for _, m in mbs)
    assert global_tokens == flat_values.numel()

    per_rank = [sum(aggregate(v, m, "token_mean", global_tokens) for v, m in mbs) for mbs in ranks]
    torch.testing.assert_close(sum(per_rank), flat_values.mean(), rtol=0, atol=1e-14)
    # the local mean of one micro-batch is not what the step needs
    values, mask = ranks[0][2]
    assert aggregate(values, mask, "token_mean") != aggregate(values, mask, "token_mean", 3.0)


def test_sequence_mean_split_over_ranks_is_the_mean_of_sequence_means():
    ranks = _split_step()
    sequence_means = [
        v[i][m[i].bool()].mean() for mbs in ranks for v, m in mbs for i in range(v.shape[0])
    ]
    num_sequences = sum(normalizer_count(m, "sequence_mean") for mbs in ranks for _, m in mbs)
    assert num_sequences == len(sequence_means) == 12
    total = sum(aggregate(v, m, "sequence_mean", num_sequences) for mbs in ranks for v, m in mbs)
    torch.testing.assert_close(total, torch.stack(sequence_means).mean(), rtol=0, atol=1e-14)


def test_aggregate_local_means_and_empty_masks():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(values, mask, "token_mean").item() == pytest.approx(7 / 3)
    assert aggregate(values, mask, "sequence_mean").item() == pytest.approx((1.5 + 4) / 2)
    padded = torch.tensor([[1, 1, 0], [0, 0, 0]])  # an all-padding row counts as no sequence
    assert normalizer_count(padded, "sequence_mean") == 1
    assert aggregate(values, padded, "sequence_mean").item() == pytest.approx(1.5)
    empty = torch.zeros(2, 3)
    assert aggregate(values, empty, "token_mean").item() == 0.0
    with pytest.raises(ValueError, match="normalizer"):
        aggregate(values, mask, "token_mean", 0.0)
    with pytest.raises(ValueError, match="token_mean or sequence_mean"):
        aggregate(values, mask, "batch_mean")


# ---------------------------------------------------------------- train/rollout mismatch


def test_log_prob_mismatch_statistics_over_masked_tokens():
    train = torch.tensor([[0.0, -1.0, -2.0], [-0.2, 0.0, 0.0]])
    rollout = torch.tensor([[0.0, -1.5, -float("inf")], [-0.1, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # the -inf sits on a masked-out position
    stats = log_prob_mismatch(train, rollout, mask)
    diffs = [0.0, 0.5, -0.1]
    assert stats["num_tokens"].item() == 3
    assert stats["logprob_abs_diff_mean"].item() == pytest.approx(0.6 / 3)
    assert stats["logprob_abs_diff_max"].item() == pytest.approx(0.5)
    assert stats["importance_ratio_mean"].item() == pytest.approx(
        sum(math.exp(d) for d in diffs) / 3
    )
    assert stats["kl_k3"].item() == pytest.approx(sum(math.exp(d) - 1 - d for d in diffs) / 3)


def test_log_prob_mismatch_of_identical_log_probs():
    log_probs = torch.randn(3, 4)
    stats = log_prob_mismatch(log_probs, log_probs.clone(), torch.ones(3, 4))
    assert stats["logprob_abs_diff_max"].item() == 0.0
    assert stats["importance_ratio_mean"].item() == pytest.approx(1.0)
    assert stats["kl_k3"].item() == 0.0
    empty = log_prob_mismatch(log_probs, log_probs + 1, torch.zeros(3, 4))
    assert all(value.item() == 0.0 for value in empty.values())


def test_reinforce_plus_plus_baseline_normalizes_group_centred_rewards_over_the_batch():
    """REINFORCE++ with a baseline: group mean subtracted (no group std), then the step's whole
    batch standardized, from the sums the engines report; against numpy on the samples."""
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.25, 1.0]])
    centred = group_advantages(torch.tensor(rewards), normalize_std=False).double().numpy()
    assert np.allclose(centred, rewards - rewards.mean(axis=1, keepdims=True))
    engines = [centred[:2].ravel(), centred[2:].ravel()]  # two engines' shares
    shift, scale = batch_shift_scale(
        sum(len(e) for e in engines),
        sum(float(e.sum()) for e in engines),
        sum(float((e**2).sum()) for e in engines),
    )
    flat = centred.ravel()
    expected = (flat - flat.mean()) / (flat.std() + 1e-6)
    assert np.allclose((flat - shift) * scale, expected, atol=1e-7)
    batch = pa.RecordBatch.from_pydict(
        {"advantage": pa.array(flat, pa.float32()), "reward": pa.array(rewards.ravel())}
    )
    normalized = normalized_advantages(batch, shift, scale)
    assert normalized.schema == batch.schema
    assert np.allclose(normalized.column("advantage").to_numpy(), expected, atol=1e-6)
    assert normalized.column("reward").equals(batch.column("reward"))
    # A batch whose samples all scored alike: zero advantages, no division by zero.
    assert batch_shift_scale(4, 0.0, 0.0) == (0.0, 1e6)
    with pytest.raises(ValueError, match="count must be > 0"):
        batch_shift_scale(0, 0.0, 0.0)
