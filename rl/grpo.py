"""GRPO-family RL math as pure tensor functions.

No distributed state and no config objects: every function takes tensors and plain numbers,
so the CPU backend, the Megatron backend and the tests share one implementation. Parallelism
lives in the training backend; the one number it must supply from outside a micro-batch is the
`normalizer` of `aggregate` (see there).

Shapes: B sequences, T token positions, V vocabulary. Per-token tensors are [B, T], aligned
with a `loss_mask` [B, T] that is 1 on response tokens that count in the loss and 0 elsewhere
(prompt, padding).
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

KLKind = Literal["k1", "k2", "k3", "low_var_kl"]
AggregationMode = Literal["token_mean", "sequence_mean"]
RatioLevel = Literal["token", "sequence", "geometric"]
"""Whose trainer/engine ratio a token's TIS weight or MIS decision uses: its own (`token`); its
sequence's product of token ratios (`sequence`: the importance weight of the whole sample,
unbiased, but a sum of log-ratios that grows with the length, so on long responses it leaves
any fixed bounds); or its sequence's geometric mean of token ratios (`geometric`: the product's
|y|-th root, a per-token average that stays near 1 on long responses, as GSPO's ratio)."""

_MAX_LOG_RATIO = 20.0
"""Log-ratios are clamped to +-20 before `exp` where a ratio could overflow: e^20 ~ 5e8 is far
outside any clip range, and an inf ratio turns masked-out gradients into NaN (0 * inf)."""


def group_advantages(rewards: Tensor, normalize_std: bool, eps: float = 1e-6) -> Tensor:
    """Advantages of the samples of prompt groups: rewards [num_groups, group_size] -> same.

    GRPO: (r - mean) / (std + eps). Dr.GRPO (`normalize_std=False`): r - mean, which drops the
    division that over-weights groups whose rewards barely differ (too easy or too hard).

    `std` is the biased (population, divide by n) std of the group: we standardize the group we
    sampled, we do not estimate an unseen population's spread. It gives every group unit RMS
    advantage whatever the group size; the unbiased std (torch's default, used by TRL and verl)
    shrinks advantages by sqrt((n - 1) / n), i.e. 0.71 for n = 2 and 0.94 for n = 8.
    A group whose rewards are all equal gets zero advantages: it carries no learning signal.
    Computed in float64 (rewards are few) so equal rewards centre to exactly zero; returns float32.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got {tuple(rewards.shape)}")
    rewards = rewards.double()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (rewards.std(dim=1, keepdim=True, correction=0) + eps)
    return centred.float()


def rewards_differ(group_rewards: list[float]) -> bool:
    """DAPO's dynamic-sampling filter (slime's check_reward_nonzero_std): a prompt group is
    kept only if its rewards are not all equal; an all-equal group has zero advantages under
    any group baseline, so it adds no gradient, only noise to the normalizer."""
    return max(group_rewards) > min(group_rewards)


def batch_shift_scale(
    count: int, total: float, square_total: float, eps: float = 1e-6
) -> tuple[float, float]:
    """(shift, scale) so that (a - shift) * scale has mean 0 and std 1 over a batch of `count`
    advantages with sum `total` and sum of squares `square_total` (population std, + eps):
    REINFORCE++'s global batch normalization, from sums each engine computes over its share."""
    if count <= 0:
        raise ValueError(f"count must be > 0, got {count}")
    mean = total / count
    variance = max(square_total / count - mean * mean, 0.0)  # rounding can dip below 0
    return mean, 1.0 / (math.sqrt(variance) + eps)


def log_probs_from_logits(
    logits: Tensor, targets: Tensor, temperature: float, *, chunk_elements: int = 1 << 25
) -> Tensor:
    """Log-probability of each target token under softmax(logits / temperature): [B, T].

    Computed as gathered logit - logsumexp, in float32 (float64 if the logits are), on chunks
    of at most `chunk_elements` logits at a time. Only the logits (any dtype, any strides: a
    `logits[:, :-1]` view is fine) are kept for backward, which recomputes the softmax chunk by
    chunk; so neither pass holds a float32 copy of the full [B, T, V] tensor (for bf16 logits of
    a 150k vocabulary that copy would be twice the logits). `targets` [B, T] must be valid ids
    everywhere; put any id (e.g. the pad id) at positions the loss mask drops.
    The sampler must use the same temperature, or the ratio to rollout log-probs is meaningless.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B, T, V] and targets [B, T], got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows = max(1, chunk_elements // logits.shape[-1])
    return _TokenLogProb.apply(logits, targets.long(), float(temperature), rows)


def _pieces(logits: Tensor, rows: int):
    """Row blocks of at most `rows` positions of logits [B, T, V], each with its slice of the
    flattened [B * T] positions. Views only: a contiguous tensor is cut as one [B * T, V]
    matrix (few, large pieces); one that is not (`logits[:, :-1]`) sequence by sequence."""
    length, vocab = logits.shape[1:]
    try:
        blocks = [(logits.view(-1, vocab), 0)]
    except RuntimeError:
        blocks = [(logits[b], b * length) for b in range(logits.shape[0])]
    for block, offset in blocks:
        for start in range(0, block.shape[0], rows):
            stop = min(start + rows, block.shape[0])
            yield block[start:stop], slice(offset + start, offset + stop)


class _TokenLogProb(torch.autograd.Function):
    """Chunked log_softmax + gather whose backward recomputes the softmax from the logits."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float, rows: int) -> Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        flat_targets = targets.reshape(-1, 1)
        out = torch.empty(flat_targets.shape[0], dtype=dtype, device=logits.device)
        lse = torch.empty_like(out)
        for piece, s in _pieces(logits, rows):
            x = piece.to(dtype) / temperature
            lse[s] = torch.logsumexp(x, dim=-1)
            out[s] = x.gather(-1, flat_targets[s]).squeeze(-1) - lse[s]
        ctx.save_for_backward(logits, flat_targets, lse)
        ctx.temperature, ctx.rows = temperature, rows
        return out.view(targets.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        # d out / d x_j = (onehot(target)_j - softmax(x / T)_j) / T
        logits, flat_targets, lse = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        flat_grad, flat_grad_out = grad.view(-1, logits.shape[-1]), grad_out.reshape(-1, 1)
        for piece, s in _pieces(logits, ctx.rows):
            x = piece.to(lse.dtype) / ctx.temperature
            g = torch.exp(x - lse[s, None]).neg_()
            g.scatter_add_(-1, flat_targets[s], torch.ones_like(g[:, :1]))
            flat_grad[s] = g.mul_(flat_grad_out[s] / ctx.temperature)
        return grad, None, None, None


@dataclass(frozen=True)
class PolicyLossStats:
    """Per-token diagnostics of `policy_loss`, detached; aggregate them under the loss mask
    (e.g. `aggregate(stats.clipped.float(), mask, "token_mean")` is the clip fraction)."""

    ratio: Tensor
    """Importance ratio pi / pi_old [B, T]."""

    clipped_low: Tensor
    """bool [B, T]: advantage < 0 and ratio < 1 - clip_low, so the token has no gradient."""

    clipped_high: Tensor
    """bool [B, T]: advantage > 0 and ratio > 1 + clip_high, so the token has no gradient."""

    @property
    def clipped(self) -> Tensor:
        """bool [B, T]: tokens whose clipped branch is active (either side)."""
        return self.clipped_low | self.clipped_high


def policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """PPO clipped surrogate with asymmetric clip (DAPO's clip-higher): per-token loss [B, T].

    loss = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A), ratio =
    exp(log_probs - old_log_probs). Minimizing it raises the probability of tokens with A > 0
    until the ratio passes 1 + clip_high, and lowers those with A < 0 until it falls below
    1 - clip_low; past those bounds the token has exactly zero gradient. On the other side of
    each bound (A > 0 and ratio small, A < 0 and ratio large) the unclipped term is the minimum
    and keeps its gradient, as in PPO. `advantages` is [B, T] or broadcastable ([B, 1]).
    The log-ratio is clamped to +-20 before exp, so a token whose ratio passes e^20 (~5e8, a
    broken sample, not a policy update) gives a finite loss and no gradient instead of NaN.
    `token_weights` [B, T] (no gradient), e.g. TIS weights, multiply each token's loss.
    The loss is not masked; pass it to `aggregate` with the loss mask.
    """
    log_ratio = (log_probs - old_log_probs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    advantages = advantages.to(ratio.dtype).expand_as(ratio)
    with torch.no_grad():
        clipped_low = (advantages < 0) & (ratio < 1 - clip_low)
        clipped_high = (advantages > 0) & (ratio > 1 + clip_high)
        bound = ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.where(clipped_low | clipped_high, -bound * advantages, -ratio * advantages)
    if token_weights is not None:
        loss = loss * token_weights.detach().to(loss.dtype)
    return loss, PolicyLossStats(ratio.detach(), clipped_low, clipped_high)


def gspo_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    clip_low: float,
    clip_high: float,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """GSPO (Group Sequence Policy Optimization, Zheng et al. 2025): per-token loss [B, T] in
    which every token of sequence i carries its sequence's clipped surrogate

        -min(s_i * A_i, clip(s_i, 1 - clip_low, 1 + clip_high) * A_i),
        s_i = exp(mean over i's loss tokens of (log_probs - old_log_probs)),

    the geometric mean of its token ratios. The gradient reaches each token's log-prob as
    s_i * A_i / |y_i| (GSPO's), and a clipped sequence gives none at all. `advantages` [B, 1]
    (one per sample) or [B, T] (its mean over the loss tokens is the sequence's). Aggregated
    with `sequence_mean` this is GSPO's objective exactly; `token_mean` weighs each sequence
    by its length. A sequence without loss tokens has s = 1 and no gradient. `token_weights`
    (no gradient) multiply each token's loss, as in `policy_loss`. Stats are per sequence,
    broadcast over its tokens.
    """
    mask = loss_mask.to(log_probs.dtype)
    lengths = mask.sum(dim=-1).clamp(min=1)
    mean_log_ratio = ((log_probs - old_log_probs) * mask).sum(dim=-1) / lengths
    ratio = torch.exp(mean_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    advantages = advantages.to(ratio.dtype)
    if advantages.dim() == 2 and advantages.shape[-1] == 1:
        advantages = advantages[:, 0]
    elif advantages.dim() == 2:
        advantages = (advantages * mask).sum(dim=-1) / lengths
    with torch.no_grad():
        clipped_low = (advantages < 0) & (ratio < 1 - clip_low)
        clipped_high = (advantages > 0) & (ratio > 1 + clip_high)
        bound = ratio.clamp(1 - clip_low, 1 + clip_high)
    per_sequence = torch.where(clipped_low | clipped_high, -bound * advantages, -ratio * advantages)
    loss = per_sequence[:, None].expand_as(log_probs)
    if token_weights is not None:
        loss = loss * token_weights.detach().to(loss.dtype)

    def tokens(x: Tensor) -> Tensor:
        return x[:, None].expand(log_probs.shape)

    return loss, PolicyLossStats(tokens(ratio.detach()), tokens(clipped_low), tokens(clipped_high))


def _trainer_rollout_log_ratio(
    old_log_probs: Tensor, rollout_log_probs: Tensor, loss_mask: Tensor | None, level: RatioLevel
) -> Tensor:
    """log(pi_trainer / pi_rollout) per token [B, T]; with `level` sequence, the sum over the
    sequence's loss tokens (the log of the product of its token ratios), with `geometric` their
    mean (the log of the geometric mean), given to each token. A sequence without loss tokens
    gets 0 (a ratio of 1)."""
    log_ratio = old_log_probs.float() - rollout_log_probs.float()
    if level == "token":
        return log_ratio
    if level not in ("sequence", "geometric"):
        raise ValueError(f"unknown level {level!r}; use token, sequence or geometric")
    if loss_mask is None:
        raise ValueError(f"{level}-level weights need the loss mask")
    mask = loss_mask.float()
    total = (log_ratio * mask).sum(dim=-1, keepdim=True)
    if level == "geometric":
        total = total / mask.sum(dim=-1, keepdim=True).clamp(min=1)
    return total.expand_as(log_ratio)


@dataclass(frozen=True)
class TisWeights:
    """Truncated importance-sampling weights of the tokens, detached."""

    weights: Tensor
    """clamp(exp(old_log_probs - rollout_log_probs), floor, cap) [B, T]."""

    truncated: Tensor
    """bool [B, T]: the ratio was outside [floor, cap] (its weight is the bound); under the
    loss mask, their fraction is the TIS clip fraction."""


def truncated_importance_weights(
    old_log_probs: Tensor,
    rollout_log_probs: Tensor,
    cap: float,
    floor: float = 0.0,
    loss_mask: Tensor | None = None,
    level: RatioLevel = "token",
) -> TisWeights:
    """TIS: w = clamp(pi_old_trainer(x) / pi_rollout(x), floor, cap) per sampled token [B, T].

    The engines sample from pi_rollout, which differs from the trainer's pi_old (the same
    weights, but fp8-quantized in the engines, or other kernels); w reweights each token's
    policy-gradient term towards the trainer's distribution, and the cap bounds the variance a
    few tokens the engine found much less likely could add; a floor above 0 (slime's
    --tis-clip-low) keeps tokens the engine over-sampled from vanishing. No gradient flows
    through w. The log-ratio is clamped to +-20 before exp, as in `policy_loss`.
    `level="sequence"`: every token of a sequence gets the clamped ratio of the whole sequence
    (the product of its loss tokens' ratios; needs `loss_mask`); `level="geometric"`: the
    clamped geometric mean of those ratios (see `RatioLevel`).
    """
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    if not 0 <= floor <= 1:
        raise ValueError(f"floor must be in [0, 1], got {floor}")
    with torch.no_grad():
        log_ratio = _trainer_rollout_log_ratio(old_log_probs, rollout_log_probs, loss_mask, level)
        ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
        return TisWeights(ratio.clamp(min=floor, max=cap), (ratio > cap) | (ratio < floor))


def masked_importance_sampling(
    old_log_probs: Tensor,
    rollout_log_probs: Tensor,
    loss_mask: Tensor,
    low: float,
    high: float,
    level: RatioLevel = "token",
) -> Tensor:
    """MIS: bool [B, T], True for the tokens to keep: those whose trainer/rollout ratio
    pi_trainer(x) / pi_rollout(x) lies in [low, high] (`level="sequence"`: the ratio of the whole
    sequence, the product of its loss tokens' ratios, so a sequence is kept or dropped whole;
    `level="geometric"`: the geometric mean of those ratios, also kept or dropped whole).
    Where TIS bounds the weight of a token the two sides disagree on, MIS drops it: its
    gradient, not just its weight, is untrustworthy. Compared in log space (no overflow)."""
    if not 0 < low <= 1 <= high:
        raise ValueError(f"need 0 < low <= 1 <= high, got low={low}, high={high}")
    with torch.no_grad():
        log_ratio = _trainer_rollout_log_ratio(old_log_probs, rollout_log_probs, loss_mask, level)
        return (log_ratio >= math.log(low)) & (log_ratio <= math.log(high))


def kl_penalty(log_probs: Tensor, ref_log_probs: Tensor, kind: KLKind) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi: [B, T].

    With d = log pi(x) - log pi_ref(x) (Schulman, "Approximating KL Divergence", 2020):
      k1 = d                                  unbiased, high variance, can be negative
      k2 = d^2 / 2                            biased, low variance, >= 0
      k3 = exp(-d) - 1 + d                    unbiased, low variance, >= 0 (since e^y >= 1 + y)
      low_var_kl = clamp(k3, -10, 10)         k3 with d clamped to +-20 first, so exp stays
                                              finite; bounds the gradient from outlier tokens
    Each is zero where the two log-probs are equal.
    """
    d = log_probs - ref_log_probs
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d.square()
    if kind == "k3":
        return torch.exp(-d) - 1 + d
    if kind == "low_var_kl":
        d = d.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return (torch.exp(-d) - 1 + d).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL kind {kind!r}; use one of k1, k2, k3, low_var_kl")


def normalizer_count(loss_mask: Tensor, mode: AggregationMode) -> int:
    """This micro-batch's share of `aggregate`'s normalizer: its loss tokens (`token_mean`) or
    its sequences with at least one loss token (`sequence_mean`). Sum it over the step's
    micro-batches and all-reduce it over data-parallel ranks to get the global normalizer."""
    if mode == "token_mean":
        return int(loss_mask.sum().item())
    if mode == "sequence_mean":
        return int((loss_mask.sum(dim=-1) > 0).sum().item())
    raise ValueError(f"unknown aggregation mode {mode!r}; use token_mean or sequence_mean")


def aggregate(
    per_token: Tensor,
    loss_mask: Tensor,
    mode: AggregationMode,
    normalizer: float | None = None,
) -> Tensor:
    """Reduce a per-token quantity [B, T] under the loss mask to a scalar: a SUM over this
    micro-batch divided by a normalizer that may cover more than this micro-batch.

    token_mean:    sum(x * mask) / normalizer; normalizer = loss tokens.
    sequence_mean: sum over sequences of (their masked token mean) / normalizer;
                   normalizer = sequences with at least one loss token.

    Data parallelism: pass the GLOBAL normalizer of the whole optimizer step, the sum of
    `normalizer_count` over every micro-batch on every rank. Then the per-micro-batch results,
    summed over micro-batches and ranks, equal the mean over the whole step exactly, however
    the tokens were split: gradients must be accumulated and all-reduced as a SUM (a DDP that
    averages over W ranks needs the loss multiplied by W). `normalizer=None` uses this
    micro-batch's own count: a plain local mean, for metrics and single-batch use.
    An empty mask gives 0.
    """
    mask = loss_mask.to(per_token.dtype)
    if mode == "token_mean":
        total = (per_token * mask).sum()
    elif mode == "sequence_mean":
        tokens = mask.sum(dim=-1)
        total = ((per_token * mask).sum(dim=-1) / tokens.clamp(min=1)).sum()
    else:
        raise ValueError(f"unknown aggregation mode {mode!r}; use token_mean or sequence_mean")
    if normalizer is None:
        return total / max(normalizer_count(loss_mask, mode), 1)
    if normalizer <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return total / normalizer


def log_prob_mismatch(
    train_log_probs: Tensor, rollout_log_probs: Tensor, loss_mask: Tensor
) -> dict[str, Tensor]:
    """How far the trainer's log-probs of the sampled tokens are from the engine's: float32
    scalars over the masked tokens, reported every step (a jump means the weights did not
    arrive, or the two sides compute the model differently).

    logprob_abs_diff_mean, logprob_abs_diff_max: |train - rollout|.
    importance_ratio_mean: mean of exp(train - rollout); 1 when the two agree.
    kl_k3: k3 estimate of KL(pi_rollout || pi_train) (the tokens were sampled by the engine).
    num_tokens: masked tokens, to weight these means when reducing over micro-batches.
    No sync with the device (no boolean indexing); all zeros for an empty mask.
    """
    with torch.no_grad():
        mask = loss_mask.bool()
        count = mask.sum().float()
        diff = torch.where(mask, train_log_probs.float() - rollout_log_probs.float(), 0.0)
        ratio = torch.where(mask, diff.exp(), 0.0)
        k3 = diff.exp() - 1 - diff  # kl_penalty(rollout, train, "k3"); 0 where masked out
        denominator = count.clamp(min=1)
        return {
            "logprob_abs_diff_mean": diff.abs().sum() / denominator,
            "logprob_abs_diff_max": diff.abs().max(),
            "importance_ratio_mean": ratio.sum() / denominator,
            "kl_k3": k3.sum() / denominator,
            "num_tokens": count,
        }
