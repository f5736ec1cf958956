"""The megatron-core layer spec we build Qwen3 models from, without Transformer Engine.

megatron-core's local spec uses `WrappedTorchNorm`, which refuses sequence parallelism; ours
uses the RMSNorm below, which marks its weight so megatron-core all-reduces its gradient over
the tensor-parallel group (each rank normalised a different slice of the tokens). It also
rounds exactly like the Hugging Face Qwen3 norm (fp32 statistics, cast back, then the weight),
so trainer and engine log-probs agree in bf16 as far as the norm goes.
"""

from typing import Any

import torch


class RMSNorm(torch.nn.Module):
    """RMSNorm over the hidden size, usable under sequence parallelism."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **_: Any):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Read by megatron-core's finalize_model_grads: sum this gradient over TP ranks.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        h = hidden.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class HeadRMSNorm(RMSNorm):
    """The per-head q/k norm: every rank sees all tokens of its heads, so no SP marking
    (megatron-core sums q/k-norm gradients over TP ranks by name)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **_: Any):
        super().__init__(config, hidden_size, eps)
        del self.weight.sequence_parallel


def decoder_block_spec(config: Any) -> Any:
    """megatron-core's local GPT block spec with our norms swapped in."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    for layer in block.layer_specs:
        sub = layer.submodules
        sub.input_layernorm = RMSNorm
        sub.pre_mlp_layernorm = RMSNorm
        sub.self_attention.submodules.q_layernorm = HeadRMSNorm
        sub.self_attention.submodules.k_layernorm = HeadRMSNorm
    block.layer_norm = RMSNorm
    return block
