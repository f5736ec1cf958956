"""GSPO, sequence-level TIS and masked importance sampling (MIS), each against a direct
re-implementation, written differently (loops over sequences, products of ratios, Python
floats), on hand-made tensors; with the edge cases: clipped sequences, empty masks, ratios on
the bounds.
"""

import math

import pytest
import torch

from config import load_config
from config.errors import UserError
from config.schema import AlgorithmConfig
from rl.grpo import (
    aggregate,
    gspo_loss,
    masked_importance_sampling,
    policy_loss,
    truncated_importance_weights,
)
from training.backend import TrainStats
from training.batch import MicroBatch
from training.loss import LossSettings, policy_term

LOG_PROBS = [[-1.0, -2.0, -0.5, -3.0], [-0.2, -0.4, -9.0, -9.0], [-1.5, -1.0, -2.0, -0.1]]
OLD = [[-1.1, -1.9, -0.5, -3.2], [-0.3, -0.2, -9.0, -9.0], [-1.5, -1.0, -2.0, -0.1]]
MASK = [[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]  # the last sequence has no loss token
ADVANTAGES = [[0.7], [-1.3], [2.0]]


def direct_gspo(log_probs, old, mask, advantages, clip_low, clip_high):
    """The GSPO objective as the paper writes it: one loss per sequence, by hand."""
    losses = []
    for i in range(len(log_probs)):
        tokens = [t for t in range(len(mask[i])) if mask[i][t]]
        if not tokens:
            losses.append(torch.zeros(()))
            continue
        product = torch.ones(())
        for t in tokens:
            product = product * torch.exp(log_probs[i, t] - old[i][t])
        s = product ** (1.0 / len(tokens))  # the geometric mean of the token ratios
        a = advantages[i][0]
        clipped = torch.clamp(s, 1 - clip_low, 1 + clip_high)
        losses.append(-torch.minimum(s * a, clipped * a))
    return losses


@pytest.mark.parametrize("clip", [(0.2, 0.28), (3e-4, 4e-4)], ids=["ppo-range", "gspo-range"])
def test_gspo_loss_and_gradient_equal_the_per_sequence_objective(clip):
    log_probs = torch.tensor(LOG_PROBS, dtype=torch.float64, requires_grad=True)
    old, mask = torch.tensor(OLD, dtype=torch.float64), torch.tensor(MASK)
    advantages = torch.tensor(ADVANTAGES, dtype=torch.float64)
    per_token, stats = gspo_loss(log_probs, old, advantages, mask, *clip)
    ours = aggregate(per_token, mask, "sequence_mean")
    (our_grad,) = torch.autograd.grad(ours, log_probs)

    leaf = torch.tensor(LOG_PROBS, dtype=torch.float64, requires_grad=True)
    losses = direct_gspo(leaf, OLD, MASK, ADVANTAGES, *clip)
    theirs = sum(losses) / 2  # two sequences have loss tokens
    (their_grad,) = torch.autograd.grad(theirs, leaf)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    assert torch.allclose(our_grad, their_grad, rtol=1e-12, atol=1e-15)
    # Each sequence's ratio is the geometric mean of its token ratios, on all its tokens.
    s0 = math.exp(sum(LOG_PROBS[0][t] - OLD[0][t] for t in range(4)) / 4)
    assert stats.ratio[0].tolist() == pytest.approx([s0] * 4, rel=1e-12)
    assert stats.ratio[2].tolist() == [1.0] * 4  # no loss tokens: ratio 1, no gradient
    assert torch.all(our_grad[2] == 0)


def test_a_clipped_sequence_gives_no_gradient_to_any_of_its_tokens():
    log_probs = torch.tensor([[-0.5, -0.5], [-0.5, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])  # every ratio e^0.5 = 1.65
    advantages = torch.tensor([[1.0], [-1.0]])
    per_token, stats = gspo_loss(log_probs, old, advantages, torch.ones(2, 2), 0.2, 0.28)
    (grad,) = torch.autograd.grad(per_token[:, 0].sum(), log_probs)  # each sequence's loss
    assert stats.clipped_high[0].all() and not stats.clipped[1].any()
    assert torch.all(grad[0] == 0)  # A > 0 above 1 + clip_high: clipped
    assert torch.allclose(grad[1], torch.full((2,), math.exp(0.5) / 2))  # -s * A / |y|


def test_gspo_equals_token_level_grpo_when_every_ratio_is_one():
    """On-policy (every ratio 1) GSPO's gradient is GRPO's under either aggregation: a
    sequence's loss sits on its |y| tokens and reaches each log-prob divided by |y|."""
    log_probs = torch.tensor(LOG_PROBS, requires_grad=True)
    mask, advantages = torch.tensor(MASK), torch.tensor(ADVANTAGES)
    gspo, _ = gspo_loss(log_probs, log_probs.detach(), advantages, mask, 3e-4, 4e-4)
    grpo, _ = policy_loss(log_probs, log_probs.detach(), advantages, 0.2, 0.28)
    for mode in ("token_mean", "sequence_mean"):
        (g1,) = torch.autograd.grad(aggregate(gspo, mask, mode), log_probs, retain_graph=True)
        (g2,) = torch.autograd.grad(aggregate(grpo, mask, mode), log_probs, retain_graph=True)
        assert torch.allclose(g1 * mask, g2 * mask), mode


def sequence_ratio(ratios: list[float], mask: list[int], level: str) -> float:
    """A sequence's trainer/engine ratio from its token ratios, by hand: their product, or its
    n-th root over the n loss tokens (1 for a sequence without any)."""
    kept = [r for r, m in zip(ratios, mask, strict=True) if m]
    product = math.prod(kept)
    return product if level == "sequence" or not kept else product ** (1.0 / len(kept))


@pytest.mark.parametrize("level", ["sequence", "geometric"])
def test_sequence_level_tis_gives_each_token_its_sequences_capped_ratio(level):
    old, rollout = torch.tensor(OLD), torch.tensor(LOG_PROBS)  # old = trainer, here
    mask = torch.tensor(MASK)
    tis = truncated_importance_weights(old, rollout, cap=1.1, floor=0.9, loss_mask=mask,
                                       level=level)  # fmt: skip
    for i in range(3):
        token_ratios = [math.exp(OLD[i][t] - LOG_PROBS[i][t]) for t in range(4)]
        ratio = sequence_ratio(token_ratios, MASK[i], level)
        expected = min(max(ratio, 0.9), 1.1)
        assert tis.weights[i].tolist() == pytest.approx([expected] * 4, rel=1e-6)
        assert tis.truncated[i].tolist() == [not 0.9 <= ratio <= 1.1] * 4
    with pytest.raises(ValueError, match="need the loss mask"):
        truncated_importance_weights(old, rollout, cap=2.0, level=level)


def test_the_geometric_mean_stays_near_one_where_the_product_saturates():
    """A long response whose every token the trainer finds 2% likelier than the engine did:
    its product of ratios leaves [0.5, 2] after 36 tokens (sequence MIS drops it, sequence TIS
    caps it), its geometric mean stays 1.02 at any length."""
    length = 400
    trainer = torch.full((1, length), math.log(1.02))
    rollout, mask = torch.zeros(1, length), torch.ones(1, length)
    product = truncated_importance_weights(trainer, rollout, 2.0, 0.0, mask, "sequence")
    geometric = truncated_importance_weights(trainer, rollout, 2.0, 0.0, mask, "geometric")
    assert product.truncated.all() and product.weights[0, 0].item() == 2.0
    assert not geometric.truncated.any()
    assert geometric.weights[0, 0].item() == pytest.approx(1.02, rel=1e-5)
    assert not masked_importance_sampling(trainer, rollout, mask, 0.5, 2.0, "sequence").any()
    assert masked_importance_sampling(trainer, rollout, mask, 0.5, 2.0, "geometric").all()


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_mis_keeps_exactly_the_tokens_or_sequences_whose_ratio_is_within_the_bounds(level):
    trainer = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # Token ratios: 1, 2 (on the bound), 2.5, 0.3 | 1.2, 1.3, e^9, 1 (masked) | no tokens.
    rollout = -torch.log(torch.tensor([[1.0, 2.0, 2.5, 0.3], [1.2, 1.3, math.exp(9), 1.0],
                                       [1.0, 1.0, 1.0, 1.0]]))  # fmt: skip
    mask = torch.tensor(MASK)
    kept = masked_importance_sampling(trainer, rollout, mask, 0.5, 2.0, level)
    ratios = torch.exp(trainer - rollout).tolist()
    for i in range(3):
        if level == "token":
            expected = [0.5 - 1e-6 <= r <= 2.0 + 1e-6 for r in ratios[i]]
        else:
            ratio = sequence_ratio(ratios[i], MASK[i], level)
            expected = [0.5 <= ratio <= 2.0 + 1e-6] * 4
        assert kept[i].tolist() == expected, i
    assert kept[2].all()  # a sequence without loss tokens has ratio 1
    with pytest.raises(ValueError, match="0 < low <= 1 <= high"):
        masked_importance_sampling(trainer, rollout, mask, 1.5, 2.0)


def micro_batch(log_probs: torch.Tensor, rollout: torch.Tensor) -> MicroBatch:
    b, t = log_probs.shape
    return MicroBatch(
        input_ids=torch.zeros(b, t + 1, dtype=torch.long),
        attention_mask=torch.ones(b, t + 1, dtype=torch.long),
        targets=torch.zeros(b, t, dtype=torch.long),
        loss_mask=torch.tensor(MASK),
        rollout_log_probs=rollout,
        advantages=torch.tensor(ADVANTAGES),
    )


def test_policy_term_drops_what_mis_masks_and_reports_the_masked_fraction():
    log_probs = torch.tensor(LOG_PROBS, requires_grad=True)
    rollout = log_probs.detach() + torch.tensor([[0.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0],
                                                 [0.0, 0.0, 0.0, 0.0]])  # fmt: skip
    mb = micro_batch(log_probs, rollout)
    settings = LossSettings.resolve(
        AlgorithmConfig(old_log_probs="recompute", mis="token"), fp8_rollouts=False
    )
    per_token, loss_stats, corrections = policy_term(log_probs, mb, settings)
    loss = aggregate(per_token, mb.loss_mask, "token_mean")
    (grad,) = torch.autograd.grad(loss, log_probs)
    # Tokens (0, 1) and (0, 3) have ratios e^-1 and e^1: outside [0.5, 2], no gradient.
    assert corrections.kept[0].tolist() == [True, False, True, False]
    assert grad[0, 1] == 0 and grad[0, 3] == 0 and grad[0, 0] != 0 and grad[1, 0] != 0
    stats = TrainStats()
    stats.add_micro_batch(loss, loss, log_probs, mb, loss_stats, corrections)
    reduced = TrainStats.reduce([stats.flush()])
    assert reduced["mismatch/mis_masked_fraction"] == pytest.approx(2 / 6)
    plain = LossSettings.resolve(AlgorithmConfig(), fp8_rollouts=False)
    _, _, none = policy_term(log_probs, mb, plain)
    assert none.tis is None and none.kept is None and none.token_weights() is None


def test_gspo_and_mis_settings_reach_the_loss_and_bad_bounds_are_refused():
    settings = LossSettings.resolve(
        AlgorithmConfig(loss="gspo", mis="sequence", mis_low=0.25, mis_high=4.0, tis="on",
                        old_log_probs="recompute", tis_level="sequence"),
        fp8_rollouts=False,
    )  # fmt: skip
    assert (settings.loss, settings.mis, settings.mis_low, settings.mis_high) == (
        "gspo", "sequence", 0.25, 4.0,
    )  # fmt: skip
    assert settings.tis_level == "sequence"
    for bad in ({"algorithm.mis_low": "0"}, {"algorithm.mis_high": "0.9"}):
        with pytest.raises(UserError, match="0 < mis_low <= 1 <= mis_high"):
            load_config(None, bad)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_gspo_gives_a_token_mis_dropped_no_gradient_through_the_sequence_ratio(aggregation):
    """GSPO's ratio is over the tokens MIS keeps: a dropped token's log-prob reaches the loss
    neither through its own term nor through its sequence's ratio (the geometric mean of the
    kept tokens' ratios, the same as GSPO on the kept tokens alone)."""
    log_probs = torch.tensor(LOG_PROBS, dtype=torch.float64, requires_grad=True)
    # Trainer/engine ratios: e^-1 at (0, 1) (dropped), 1 elsewhere; a 2.0 sample advantage.
    shift = torch.zeros(3, 4, dtype=torch.float64)
    shift[0, 1] = 1.0
    mb = micro_batch(log_probs, log_probs.detach() + shift)
    settings = LossSettings.resolve(
        AlgorithmConfig(loss="gspo", mis="token", old_log_probs="rollout", clip_low=0.2,
                        clip_high=0.28), fp8_rollouts=False,
    )  # fmt: skip
    per_token, stats, corrections = policy_term(log_probs, mb, settings)
    (grad,) = torch.autograd.grad(aggregate(per_token, mb.loss_mask, aggregation), log_probs)
    assert corrections.kept[0].tolist() == [True, False, True, True]
    assert grad[0, 1].item() == 0.0  # exactly: the dropped token is in no term of the loss
    assert (grad[0, [0, 2, 3]] != 0).all()
    # The ratio is the kept tokens' geometric mean: here each kept ratio is 1.
    assert stats.ratio[0].tolist() == [1.0] * 4


def test_train_stats_report_the_advantages_the_loss_applied():
    """Mean and std over the samples with loss tokens: the third sample has none (as padding
    rows and empty responses), so its advantage 2.0 reaches no gradient and is not counted."""
    log_probs = torch.tensor(LOG_PROBS)
    mb = micro_batch(log_probs, log_probs)
    settings = LossSettings.resolve(AlgorithmConfig(), fp8_rollouts=False)
    per_token, loss_stats, corrections = policy_term(log_probs, mb, settings)
    loss = aggregate(per_token, mb.loss_mask, "token_mean")
    stats = TrainStats()
    for _ in range(2):  # two micro-batches (or ranks) add up
        stats.add_micro_batch(loss, loss, log_probs, mb, loss_stats, corrections)
    reduced = TrainStats.reduce([stats.flush()])
    assert reduced["train/advantage_mean"] == pytest.approx((0.7 - 1.3) / 2)
    assert reduced["train/advantage_std"] == pytest.approx(1.0)
