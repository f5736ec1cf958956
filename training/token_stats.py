"""Per-token log-probs and entropy straight from the last hidden states, a chunk of tokens at
a time, so that no [tokens, vocab] tensor ever exists (`train.log_prob_chunk_tokens`).

The output layer (logits = hidden @ weight^T / temperature) is applied to `chunk` tokens at a
time; each chunk's log-softmax gives the targets' log-probs and the entropy, then its logits
are dropped. The backward recomputes each chunk's logits from the hidden states and the
weight (one more output-layer matmul per chunk) and writes the chunk's rows of the hidden
states' gradient and adds its part of the weight's. At 8k tokens and a 151k vocabulary the
fp32 logits alone are 5 GB; here a chunk of 1024 tokens holds about 0.6 GB per fp32 copy.

Under Megatron's tensor parallelism `weight` is this rank's slice of the vocabulary
(`VocabShard`): the forward all-reduces the logsumexp's max and sums, and the target's logit,
over the tensor-parallel group (two all-reduces of [chunk] numbers per chunk; none in the
backward), so no rank gathers a full-vocabulary row. The hidden states must then be the same
on every rank of the group and their gradient summed over it (the caller's job: megatron-core's
`copy_to_tensor_model_parallel_region` or `gather_from_sequence_parallel_region`).

The entropy H = logsumexp(x) - sum_j p_j x_j (x the tempered logits, p = softmax(x)) is the
policy's, of the same tempered distribution as the log-probs. Without `entropy_grad` it is
returned detached (no gradient and no memory for one); with it, its gradient
dH/dx_j = -p_j (x_j - sum_k p_k x_k) flows into the same backward.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary: ids [start, start + rows of weight)."""

    start: int = 0
    group: "dist.ProcessGroup | None" = None
    """The ranks holding the other slices; None: the whole vocabulary is here."""


def token_stats(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float,
    chunk_tokens: int,
    entropy_grad: bool = False,
    shard: VocabShard = VocabShard(),
) -> tuple[Tensor, Tensor]:
    """(log-prob of each target, entropy of each position), both [...] like `targets`.

    `hidden` [..., H] (any leading dims matching `targets`, any dtype), `weight` [V, H] (the
    output layer's, or this rank's vocabulary slice of it), `chunk_tokens` tokens per chunk
    (0 or less: all at once). Computed in float32 (float64 if `hidden` is). `targets` must be valid
    ids everywhere (put the pad id where the loss mask drops a position)."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} must share their "
            f"leading dims"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk_tokens if chunk_tokens > 0 else max(flat.shape[0], 1)
    log_probs, entropy = _ChunkedTokenStats.apply(
        flat, weight, targets.reshape(-1).long(), float(temperature), chunk, entropy_grad, shard
    )
    return log_probs.view(targets.shape), entropy.view(targets.shape)


def _all_reduce(tensor: Tensor, op: dist.ReduceOp, shard: VocabShard) -> Tensor:
    if shard.group is not None:
        dist.all_reduce(tensor, op=op, group=shard.group)
    return tensor


def _local_targets(targets: Tensor, vocab: int, start: int) -> tuple[Tensor, Tensor]:
    """Each target's column in this slice (0 where it is another rank's), and whether here."""
    local = targets - start
    here = (local >= 0) & (local < vocab)
    return torch.where(here, local, 0)[:, None], here


class _ChunkedTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk, entropy_grad, shard):
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        count, vocab = hidden.shape[0], weight.shape[0]
        log_probs = torch.empty(count, dtype=dtype, device=hidden.device)
        entropy, lse = torch.empty_like(log_probs), torch.empty_like(log_probs)
        columns, here = _local_targets(targets, vocab, shard.start)
        for s in _chunks(count, chunk):
            x = (hidden[s] @ weight.t()).to(dtype) / temperature
            top = _all_reduce(x.max(dim=-1).values, dist.ReduceOp.MAX, shard)
            e = torch.exp(x - top[:, None])
            target = torch.where(here[s], x.gather(-1, columns[s]).squeeze(-1), 0.0)
            # Sum of exp, sum of exp * x, target logit: one all-reduce for the three.
            sums = _all_reduce(
                torch.stack([e.sum(-1), (e * x).sum(-1), target]), dist.ReduceOp.SUM, shard
            )
            lse[s] = top + torch.log(sums[0])
            entropy[s] = lse[s] - sums[1] / sums[0]
            log_probs[s] = sums[2] - lse[s]
        ctx.save_for_backward(hidden, weight, columns, here, lse, entropy)
        ctx.temperature, ctx.chunk, ctx.entropy_grad = temperature, chunk, entropy_grad
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_log_probs, grad_entropy):
        hidden, weight, columns, here, lse, entropy = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        # Summed over chunks in fp32 and rounded once, as one matmul over every token would be:
        # a bf16 sum would round once per chunk.
        grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, lse.dtype))
        with_entropy = ctx.entropy_grad and grad_entropy is not None
        for s in _chunks(hidden.shape[0], ctx.chunk):
            x = (hidden[s] @ weight.t()).to(lse.dtype) / ctx.temperature
            p = torch.exp(x - lse[s, None])
            # d log_prob / dx_j = onehot(target)_j - p_j (the one-hot only on the target's rank)
            g = p * -grad_log_probs[s, None]
            g.scatter_add_(-1, columns[s], (grad_log_probs[s] * here[s])[:, None].to(g.dtype))
            if with_entropy:  # dH / dx_j = -p_j (x_j - E_p[x]), E_p[x] = lse - H
                mean = (lse[s] - entropy[s])[:, None]
                g -= grad_entropy[s, None] * p * (x - mean)
            g = (g / ctx.temperature).to(weight.dtype)  # x = logits / temperature
            grad_hidden[s] = g @ weight
            grad_weight.addmm_(g.t().to(grad_weight.dtype), hidden[s].to(grad_weight.dtype))
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def _chunks(count: int, chunk: int):
    for start in range(0, count, chunk):
        yield slice(start, min(start + chunk, count))
