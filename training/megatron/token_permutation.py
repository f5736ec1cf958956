"""Sorting tokens by expert and back, without atomic adds.

megatron-core's unfused permutation (its fused one needs Transformer Engine) gathers each
token once per chosen expert with `index_select`, whose backward is an `index_add_`, and
restores the order with a `scatter_add`: both add bf16 rows atomically into the same token
rows, top_k (8) of them per token. On an H200 the pair took about an eighth of a Qwen3-30B-A3B
layer shape's step. Here both directions are plain gathers: with dropless routing every token
is chosen exactly top_k times, so "the rows of token t" is the slice [t x top_k, (t+1) x
top_k) of the permuted rows once sorted by token, and a sum over that slice (in fp32) replaces
the atomic adds.

`SortedAlltoAllDispatcher` is megatron-core's alltoall dispatcher with these two steps
swapped in, and without its second sort (by local expert, across ranks) where one rank holds
every expert and the sort is the identity; its all-to-all and ETP gathers are untouched.
`SortedPermuteMoELayer` is megatron-core's MoE layer built with it.
"""

import torch


def expert_order(routing_map: torch.Tensor, num_out: int) -> torch.Tensor:
    """Positions in the [experts, tokens] flattened routing map of the chosen (token, expert)
    pairs, expert-major and by token within an expert: megatron-core's permutation order."""
    flat = routing_map.T.contiguous().reshape(-1)
    return flat.argsort(descending=True, stable=True)[:num_out]


class _Permute(torch.autograd.Function):
    """rows = tokens[by_expert]; backward sums each token's top_k gradient rows."""

    @staticmethod
    def forward(ctx, tokens, by_expert, by_token, top_k):
        ctx.save_for_backward(by_token)
        ctx.top_k = top_k
        return tokens.index_select(0, by_expert)

    @staticmethod
    def backward(ctx, grad):
        (by_token,) = ctx.saved_tensors
        return _sum_per_token(grad, by_token, ctx.top_k), None, None, None


class _Unpermute(torch.autograd.Function):
    """tokens[t] = sum of the rows of token t; backward gathers each row's token gradient."""

    @staticmethod
    def forward(ctx, rows, by_expert, by_token, top_k):
        ctx.save_for_backward(by_expert)
        return _sum_per_token(rows, by_token, top_k)

    @staticmethod
    def backward(ctx, grad):
        (by_expert,) = ctx.saved_tensors
        return grad.index_select(0, by_expert), None, None, None


def _sum_per_token(rows: torch.Tensor, by_token: torch.Tensor, top_k: int) -> torch.Tensor:
    grouped = rows.index_select(0, by_token).view(-1, top_k, rows.shape[-1])
    accumulate = torch.promote_types(rows.dtype, torch.float32)  # bf16 rows add up in fp32
    return grouped.sum(1, dtype=accumulate).to(rows.dtype)


def permute(tokens, routing_map, probs, top_k):
    """(rows sorted by expert, their routing weights, the plan for `unpermute`)."""
    num_tokens = tokens.shape[0]
    order = expert_order(routing_map, num_tokens * top_k)
    by_expert = order % num_tokens
    by_token = by_expert.argsort(stable=True)
    rows = _Permute.apply(tokens, by_expert, by_token, top_k)
    weights = probs.T.contiguous().reshape(-1)[order]
    return rows, weights, (by_expert, by_token, top_k)


def unpermute(rows, plan):
    """The sum, per token, of its rows (back in token order)."""
    return _Unpermute.apply(rows, *plan)


def _dispatcher_class():
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    class SortedAlltoAllDispatcher(MoEAlltoAllTokenDispatcher):
        """megatron-core's alltoall dispatcher with the gather-only permutation, for dropless
        top-k routing (anything else goes through megatron-core's own steps)."""

        def _sortable(self) -> bool:
            c = self.config
            return not (
                self.drop_and_pad
                or c.moe_router_padding_for_quantization
                or c.moe_permute_fusion
                or self.shared_experts is not None
            )

        def dispatch_preprocess(self, hidden_states, routing_map, probs):
            self._plan = None
            if not self._sortable():
                return super().dispatch_preprocess(hidden_states, routing_map, probs)
            # What megatron-core's method records, in its order, then our permutation.
            self.hidden_shape = hidden_states.shape
            self.probs = probs
            self.routing_map = routing_map
            hidden_states = hidden_states.view(-1, self.hidden_shape[-1])
            self.tokens_per_expert = self.preprocess(routing_map)
            self.tokens_per_expert = self._maybe_dtoh_and_synchronize(
                "before_permutation_1", self.tokens_per_expert
            )
            self.hidden_shape_before_permute = hidden_states.shape
            rows, weights, self._plan = permute(
                hidden_states, routing_map, probs, self.config.moe_router_topk
            )
            return rows, weights

        def dispatch_postprocess(self, global_input_tokens, global_probs):
            if self.tp_size * self.ep_size > 1 or self.drop_and_pad:
                return super().dispatch_postprocess(global_input_tokens, global_probs)
            # One rank holds every expert: the tokens are in local-expert order already, and
            # megatron-core's chunk sort would copy them (and their gradients) for nothing.
            self.tokens_per_expert = self._maybe_dtoh_and_synchronize(
                "before_permutation_2", self.tokens_per_expert
            )
            tokens_per_expert = self._maybe_dtoh_and_synchronize(
                "before_finish", self.tokens_per_expert
            )
            self.tokens_per_expert = None
            return global_input_tokens, tokens_per_expert, global_probs

        def combine_preprocess(self, hidden_states):
            if self.tp_size * self.ep_size > 1 or self.drop_and_pad:
                return super().combine_preprocess(hidden_states)
            return hidden_states  # the reverse of the chunk sort skipped above

        def combine_postprocess(self, permutated_local_input_tokens):
            if self._plan is None:
                return super().combine_postprocess(permutated_local_input_tokens)
            output = unpermute(permutated_local_input_tokens, self._plan)
            self._plan = None
            return output.view(self.hidden_shape)

    return SortedAlltoAllDispatcher


def moe_layer_class():
    """megatron-core's MoELayer whose alltoall dispatcher permutes with gathers only."""
    from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    dispatcher = _dispatcher_class()

    class SortedPermuteMoELayer(MoELayer):
        def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, **kw):
            pg_collection = pg_collection or get_default_pg_collection()
            super().__init__(config, submodules, layer_number, pg_collection, **kw)
            if type(self.token_dispatcher) is MoEAlltoAllTokenDispatcher:
                self.token_dispatcher = dispatcher(
                    self.num_local_experts,
                    self.local_expert_indices,
                    config=self.config,
                    pg_collection=pg_collection,
                )
                self._training_token_dispatcher = self.token_dispatcher

    return SortedPermuteMoELayer
