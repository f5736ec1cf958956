"""Core attention through torch's `scaled_dot_product_attention`, without Transformer Engine.

A drop-in for megatron-core's `DotProductAttention` (the local spec's unfused attention, which
materialises [batch, heads, seq, seq] scores and repeats K/V for GQA). SDPA picks flash
attention on Hopper for bf16, causal masking and grouped K/V heads without copies; on the CPU
it runs its math kernel (see `_kernel_for`): the CPU tests run this module, not a stand-in.

Layouts are megatron-core's: query [sq, b, heads, d], key/value [sk, b, groups, d] with this
rank's heads under tensor parallelism (sequence parallelism has already gathered the full
sequence before the QKV projection); the output is [sq, b, heads x d].

Rows are right-padded by the trainer and attention is causal, so padding never reaches a real
token and no mask tensor is needed; any other mask is refused rather than ignored. Packed rows
(`train.pack_sequences`) come in megatron-core's THD layout, query [t, heads, d] with
`PackedSeqParams` (qkv_format `thd`, `cu_seqlens_q`): each sequence attends to itself only,
through `training.varlen_attention` (flash varlen on a GPU in bf16, SDPA per sequence else).
"""

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from training.varlen_attention import causal_varlen_attention


class SdpaAttention(torch.nn.Module):
    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ):
        super().__init__()
        from megatron.core.transformer.enums import AttnMaskType

        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SdpaAttention supports causal masks only, not {attn_mask_type}")
        if config.context_parallel_size != 1:
            raise ValueError("SdpaAttention does not implement context parallelism")
        if config.window_size is not None or config.softmax_type != "vanilla":
            raise ValueError("SdpaAttention supports full-window vanilla softmax attention only")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError("SdpaAttention does not implement attention dropout (RL uses none)")
        self.config = config
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if attention_mask is not None or attention_bias is not None:
            raise ValueError("SdpaAttention takes no attention mask or bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        # [s, b, n, d] -> [b, n, s, d], the layout SDPA reads.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        with _kernel_for(q):
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scale, enable_gqa=k.shape[1] != q.shape[1]
            )
        sq, b = query.shape[:2]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _packed(self, query, key, value, params) -> torch.Tensor:
        """THD: query [t, heads, d], key / value [t, groups, d] -> [t, heads x d]."""
        if params.qkv_format != "thd" or params.cu_seqlens_q_padded is not None:
            raise ValueError("SdpaAttention takes packed sequences in THD without padding only")
        with _kernel_for(query):
            out = causal_varlen_attention(
                query, key, value, params.cu_seqlens_q, params.max_seqlen_q, self.scale
            )
        return out.reshape(out.shape[0], -1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        return {}  # no parameters


def _kernel_for(query: torch.Tensor) -> contextlib.AbstractContextManager:
    """SDPA's own choice on a GPU (flash / cuDNN); its math kernel on the CPU.

    On the CPU, SDPA would pick its flash kernel for bf16. With it, a bf16 run with CPU Adam
    and one with the device optimizer, bit-identical otherwise, parted by one or two bf16 steps
    in 1.4 % of the weights after three steps (tests/test_megatron.py, the CPU-Adam test; not
    understood yet); the math kernel keeps them bit-identical, as megatron-core's unfused
    attention does. The CPU runs the tests, where that matters more than speed."""
    if query.is_cuda:
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)
