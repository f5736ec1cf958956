"""The megatron-core layer spec we build Qwen3 models from, without Transformer Engine.

megatron-core's local spec uses `WrappedTorchNorm`, which refuses sequence parallelism; ours
uses the RMSNorm below, which marks its weight so megatron-core all-reduces its gradient over
the tensor-parallel group (each rank normalised a different slice of the tokens). It also
rounds exactly like the Hugging Face Qwen3 norm (fp32 statistics, cast back, then the weight),
so trainer and engine log-probs agree in bf16 as far as the norm goes.
"""

import functools
from typing import Any

import torch

from training.megatron.fused import fused_rms_norm
from training.megatron.grouped_experts import GroupedExperts
from training.megatron.sdpa_attention import SdpaAttention
from training.megatron.token_permutation import moe_layer_class


class RMSNorm(torch.nn.Module):
    """RMSNorm over the hidden size, usable under sequence parallelism."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **_: Any):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Read by megatron-core's finalize_model_grads: sum this gradient over TP ranks.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return fused_rms_norm(hidden, self.weight, self.eps)


class HeadRMSNorm(RMSNorm):
    """The per-head q/k norm: every rank sees all tokens of its heads, so no SP marking
    (megatron-core sums q/k-norm gradients over TP ranks by name)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **_: Any):
        super().__init__(config, hidden_size, eps)
        del self.weight.sequence_parallel


LAYER_SPECS = ("torch", "local")
"""`torch`: experts as two grouped GEMMs (`GroupedExperts`) and attention through SDPA
(`SdpaAttention`), the fast spec without Transformer Engine. `local`: megatron-core's local
spec as it comes (SequentialMLP, one small GEMM per expert; unfused DotProductAttention), kept
for comparison. Both take our RMSNorms."""


def decoder_block_spec(config: Any, layer_spec: str = "torch") -> Any:
    """megatron-core's local GPT block spec with our norms, and with `layer_spec="torch"` our
    grouped experts and SDPA attention swapped in."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    if layer_spec not in LAYER_SPECS:
        raise ValueError(f"layer_spec={layer_spec!r}; expected one of {LAYER_SPECS}")
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    for layer in block.layer_specs:
        sub = layer.submodules
        sub.input_layernorm = RMSNorm
        sub.pre_mlp_layernorm = RMSNorm
        attention = sub.self_attention.submodules
        attention.q_layernorm = HeadRMSNorm
        attention.k_layernorm = HeadRMSNorm
        if layer_spec == "torch":
            attention.core_attention = SdpaAttention
            _use_grouped_experts(sub)
    block.layer_norm = RMSNorm
    return block


def _use_grouped_experts(layer: Any) -> None:
    """In an MoE layer's spec: GroupedExperts for SequentialMLP, and megatron-core's MoE layer
    with the gather-only token permutation (`token_permutation`); dense MLPs stay."""
    from megatron.core.transformer.moe.moe_layer import MoESubmodules

    mlp = layer.mlp
    submodules = getattr(mlp, "keywords", {}).get("submodules")
    if isinstance(submodules, MoESubmodules):
        submodules.experts = GroupedExperts
        layer.mlp = functools.partial(moe_layer_class(), *mlp.args, **mlp.keywords)
