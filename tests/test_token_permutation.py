"""The gather-only token permutation (training/megatron/token_permutation.py) against
megatron-core's own `permute` / `unpermute`, forward and backward, on hand-made routings."""

import pytest
import torch

from training.megatron.token_permutation import permute, unpermute

pytestmark = pytest.mark.megatron


def routing(tokens: int, experts: int, top_k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=g, dtype=torch.float64)
    chosen = scores.topk(top_k, dim=-1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter_(1, chosen, True)
    probs = torch.where(routing_map, scores, 0.0)
    hidden = torch.randn(tokens, 16, generator=g, dtype=torch.float64)
    return hidden, routing_map, probs


@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(1, 4, 2), (13, 8, 2), (64, 16, 8)])
def test_permutation_equals_megatron_cores_forward_and_backward(tokens, experts, top_k):
    from megatron.core.transformer.moe import moe_utils

    hidden, routing_map, probs = routing(tokens, experts, top_k, seed=tokens)
    weight = torch.randn(tokens * top_k, 16, dtype=torch.float64)  # stands in for the experts

    ours_in = hidden.clone().requires_grad_()
    rows, row_probs, plan = permute(ours_in, routing_map, probs, top_k)
    ours_out = unpermute(rows * weight * row_probs[:, None], plan)

    ref_in = hidden.clone().requires_grad_()
    ref_rows, ref_probs, order, _, _ = moe_utils.permute(
        ref_in, routing_map, probs=probs, num_out_tokens=tokens * top_k
    )
    ref_out = moe_utils.unpermute(
        ref_rows * weight * ref_probs[:, None], order, ref_in.shape, routing_map=routing_map
    )

    assert torch.equal(rows, ref_rows)  # same rows in the same (expert-major) order
    assert torch.equal(row_probs, ref_probs)
    torch.testing.assert_close(ours_out, ref_out, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ours_out)
    ours_out.backward(grad)
    ref_out.backward(grad)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-12, atol=1e-12)


def test_each_token_comes_back_as_the_sum_of_its_rows():
    hidden, routing_map, probs = routing(5, 4, 2, seed=0)
    rows, _, plan = permute(hidden, routing_map, probs, 2)
    assert rows.shape == (10, 16)
    torch.testing.assert_close(unpermute(rows, plan), 2 * hidden)
