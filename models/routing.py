"""Rollout routing replay (R3) for Hugging Face Qwen3-MoE models: record the experts each token
was routed to while generating, and force the same experts in a later forward.

The routing of a sequence is an integer array [positions, moe_layers, top_k]: for every input
position (prompt tokens and response tokens, except the last response token, which is sampled
but never fed back), the top-k expert ids of each MoE layer, in the router's order. That is the
layout SGLang returns with `return_routed_experts` (positions `[0, seqlen - 1)`).

Replay keeps the router differentiable, as the R3 paper (Ma et al. 2025, "Stabilizing MoE
Reinforcement Learning by Aligning Training and Inference Routers") does: the expert *ids* are
forced, their weights are still the trainer's softmax over its own router logits at those ids,
so the gate weights get gradients.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from config.schema import SluiceConfig


@dataclass(frozen=True)
class RoutingShape:
    """How many MoE layers a model has, how many experts each token picks, of how many."""

    layers: int
    top_k: int
    num_experts: int
    moe_layer_ids: tuple[int, ...] | None = None
    """The decoder-layer index of each MoE layer, in order; None: every decoder layer is one."""
    num_hidden_layers: int | None = None
    """Decoder layers, dense ones included; None: `layers`."""

    @property
    def per_position(self) -> int:
        """Expert ids recorded per token position (layers x top_k)."""
        return self.layers * self.top_k

    @property
    def decoder_layers(self) -> int:
        """All decoder layers: SGLang records a slot for each, dense ones included."""
        return self.num_hidden_layers if self.num_hidden_layers is not None else self.layers

    @property
    def moe_layer_index(self) -> list[int]:
        """The decoder-layer index of each MoE layer (to pick them out of SGLang's buffer)."""
        if self.moe_layer_ids is None:
            return list(range(self.layers))
        return list(self.moe_layer_ids)

    @property
    def dtype(self) -> np.dtype:
        """The narrowest unsigned type that holds every expert id: uint8 up to 256 experts
        (Qwen3-30B-A3B's 128 cost 384 bytes a token over 48 layers x top-8), else uint16."""
        return np.dtype(np.uint8 if self.num_experts <= 256 else np.uint16)


def routing_shape(hf_config: Any) -> RoutingShape | None:
    """The routing shape of a Hugging Face MoE config; None for a dense model."""
    num_experts = getattr(hf_config, "num_experts", None)
    if not num_experts:
        return None
    layers = hf_config.num_hidden_layers
    ids = tuple(moe_layer_ids(hf_config))
    return RoutingShape(len(ids), hf_config.num_experts_per_tok, num_experts, ids, layers)


def moe_layer_ids(hf_config: Any) -> list[int]:
    """The decoder layers of a Qwen3-MoE config that are MoE (transformers' rule: not in
    `mlp_only_layers`, and every `decoder_sparse_step`-th layer)."""
    dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    layers = range(hf_config.num_hidden_layers)
    return [i for i in layers if i not in dense and (i + 1) % step == 0]


def replay_routing_shape(config: "SluiceConfig") -> RoutingShape:
    """The routing shape of the policy (routing replay on); UserError for a dense model."""
    from config.errors import UserError
    from models.model_dir import trainer_model
    from training.megatron.model_config import load_hf_config

    shape = routing_shape(load_hf_config(trainer_model(config.model)))
    if shape is None:
        raise UserError(
            f"algorithm.routing_replay=true replays the routing of MoE layers, and "
            f"{config.model.hf_checkpoint} has none (no num_experts in its config); turn it off"
        )
    return shape


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """The model's top-k routers in layer order (transformers' `Qwen3MoeTopKRouter`)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    return [m for m in model.modules() if isinstance(m, Qwen3MoeTopKRouter)]


class RoutingRecorder:
    """Records every router's top-k ids, one tensor per forward call and layer.

    `calls[i][layer]` is the [tokens, top_k] id tensor of forward call i, tokens in the
    router's order (batch-major: row b, position t is b * T + t).
    """

    def __init__(self, model: nn.Module):
        self.routers = moe_routers(model)
        self.calls: list[list[torch.Tensor]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> "RoutingRecorder":
        for layer, router in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int):
        def record(module, inputs, output) -> None:
            if layer == 0:
                self.calls.append([])
            self.calls[-1].append(output[2].detach())

        return record


def generation_routing(
    calls: list[list[torch.Tensor]],
    prompt_lengths: list[int],
    response_lengths: list[int],
    width: int,
    dtype: np.dtype,
) -> list[np.ndarray]:
    """Each row's routing [prompt + response - 1, layers, top_k] from the calls of one
    left-padded `generate`: call 0 is the prefill of [rows, width] prompts (row b's prompt in
    its last prompt_lengths[b] columns), call j >= 1 feeds response token j - 1 of every row."""
    rows = len(prompt_lengths)
    # per call: [rows, tokens of the call, layers, top_k]
    per_call = [
        torch.stack(layers, dim=1).view(rows, -1, len(layers), layers[0].shape[1])
        for layers in calls
    ]
    prefill = per_call[0].cpu().numpy()
    steps = torch.cat(per_call[1:], dim=1).cpu().numpy() if len(per_call) > 1 else None
    out = []
    for b, (p, r) in enumerate(zip(prompt_lengths, response_lengths, strict=True)):
        parts = [prefill[b, width - p :]]
        if r > 1:
            parts.append(steps[b, : r - 1])
        out.append(np.concatenate(parts).astype(dtype))
    return out


@contextlib.contextmanager
def replay_routing(model: nn.Module, routed: torch.Tensor) -> Iterator[None]:
    """Force the experts of `routed` [B, T, layers, top_k] in every forward of `model` over
    [B, T] inputs inside the block; the routing weights are the model's own softmax at those
    experts (renormalized over them when the config says `norm_topk_prob`)."""
    routers = moe_routers(model)
    if routed.shape[2] != len(routers):
        raise ValueError(
            f"routing replay: the routing holds {routed.shape[2]} MoE layers, the model has "
            f"{len(routers)}"
        )
    for layer, router in enumerate(routers):
        router.forward = _replayed_forward(router, routed[:, :, layer].reshape(-1, routed.shape[3]))
    try:
        yield
    finally:
        for router in routers:
            del router.forward  # back to the class's forward


def _replayed_forward(router: nn.Module, experts: torch.Tensor):
    experts = experts.long()

    def forward(hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, router.hidden_dim)
        logits = nn.functional.linear(hidden_states, router.weight)
        if logits.shape[0] != experts.shape[0]:
            raise ValueError(
                f"routing replay: {experts.shape[0]} routed tokens for a forward of "
                f"{logits.shape[0]} tokens"
            )
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        weights = probs.gather(-1, experts.to(logits.device))
        if router.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), experts.to(logits.device)

    return forward
