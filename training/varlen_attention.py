"""Causal attention over packed rows (`train.pack_sequences`): several sequences back to back
in one row, each attending only to itself; `cu_seqlens` [S + 1] says where each starts.

What runs where:
- a GPU in bf16 / fp16: torch's `varlen_attn`, flash attention over `cu_seqlens` (one kernel,
  cost sum L_s^2, no mask tensor).
- otherwise (the CPU; fp32 anywhere): `scaled_dot_product_attention` once per sequence with
  `is_causal`, which is the computation a right-padded row of that sequence gets, so packed
  and padded agree to fp32 rounding. The caller picks SDPA's kernel (the Megatron backend
  wants the math kernel on the CPU, `sdpa_attention._kernel_for`).

A block-diagonal mask over the whole packed row (what transformers' SDPA path builds from
position ids) would be exact too, but costs [N, N] of mask and N^2 of attention for N packed
tokens, so packing many short rows would make attention slower than padding them.
"""

import functools
import inspect
import itertools

import torch
import torch.nn.functional as F

TRANSFORMERS_NAME = "sluice_varlen"
"""The name of `transformers_attention` in transformers' attention registry."""


def causal_varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
) -> torch.Tensor:
    """query [T, heads, d], key / value [T, groups, d] (grouped-query attention when there are
    fewer groups than heads) -> [T, heads, d]; token t attends to the tokens of its own
    sequence up to itself."""
    gqa = key.shape[1] != query.shape[1]
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        from torch.nn.attention.varlen import varlen_attn

        cu = cu_seqlens.to(query.device, torch.int32)
        # torch 2.14 asks for `enable_gqa` with fewer key/value heads; older releases (the GPU
        # machine has 2.11) have no such argument and hand grouped heads to the flash kernel as
        # they are. tests/test_packing_gpu.py checks the kernel against SDPA per sequence.
        extra = {"enable_gqa": gqa} if _varlen_takes_gqa() else {}
        return varlen_attn(
            query, key, value, cu, cu, max_seqlen, max_seqlen, scale=scale,
            window_size=(-1, 0), **extra,
        )  # fmt: skip
    bounds = cu_seqlens.tolist()
    pieces = []
    for start, end in itertools.pairwise(bounds):
        if end == start:
            continue
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        pieces.append(out.transpose(0, 1))
    return torch.cat(pieces)


@functools.cache
def _varlen_takes_gqa() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


UNSUPPORTED = ("sliding_window", "softcap", "s_aux")
"""Attention options of some transformers models (sliding-window layers, logit soft-capping,
attention sinks) that the packed path does not implement: refused, never dropped."""


def transformers_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`causal_varlen_attention` as a transformers attention function (query [B, heads, S, d]
    -> [B, S, heads, d]), for a model whose forward gets `cu_seq_lens_q` and `max_length_q`
    (flash attention's names) over a [1, N] packed row. Without them each of the B rows is
    one sequence: a right-padded row, whose padding no real token sees under a causal mask
    (transformers passes no padding mask to a registered function)."""
    unsupported = {k: kwargs[k] for k in UNSUPPORTED if kwargs.get(k) is not None}
    if dropout or unsupported:
        what = {"dropout": dropout, **unsupported} if dropout else unsupported
        raise ValueError(
            f"train.pack_sequences: packed attention has no {', '.join(what)} "
            f"({what}); turn train.pack_sequences off for this model"
        )
    b, _, s, _ = query.shape
    if cu_seq_lens_q is None:
        cu_seq_lens_q = torch.arange(0, (b + 1) * s, s, dtype=torch.int32)
        max_length_q = s
    q, k, v = (t.transpose(1, 2).flatten(0, 1) for t in (query, key, value))
    out = causal_varlen_attention(q, k, v, cu_seq_lens_q, max_length_q, scaling)
    return out.view(b, s, *out.shape[1:]), None


def use_in_transformers(model: torch.nn.Module) -> None:
    """Make `model` (a transformers model) attend through `transformers_attention`; its
    forwards then take `cu_seq_lens_q` and `max_length_q` for packed rows."""
    from transformers import AttentionInterface

    AttentionInterface.register(TRANSFORMERS_NAME, transformers_attention)
    model.set_attn_implementation(TRANSFORMERS_NAME)
