"""Block-scaled fp8 Linear and fused-experts modules for the transformers engine.

Weights are float8_e4m3fn with one fp32 scale per block (`weight_scale_inv`, the checkpoint's
name and layout); activations are quantized per token in 1 x 128 blocks as they arrive (the
checkpoint's `activation_scheme: dynamic`), and the two meet in cuBLAS's block-scaled fp8 GEMM
(`torch._scaled_mm` with 1x128 and 128x128 scales: Hopper or later, CUDA >= 12.9), which
accumulates in fp32. This is the arithmetic of SGLang's fp8 block GEMM, so a rollout served
here is off-policy in the same way as one served by SGLang.

Why our own modules and not transformers' `FP8Linear` / `FP8Experts`: those call a Triton
kernel that transformers fetches from the Hugging Face Hub at run time (`kernels`), which an
offline cluster, and our GPU machine, cannot reach. The parameter names and shapes here are
the ones transformers uses (`gate_up_proj_scale_inv`, ...), so `models/checkpoint_format.py`
maps them to the checkpoint's names for either.

`emulated_block_fp8_matmul` is the same arithmetic written out in fp32 (quantize, dequantize,
multiply): the reference the GPU kernel is tested against, and the CPU tests' matmul. The
engine never picks it by itself (`inference/fp8_model.py` refuses a device the kernel does not
run on).
"""

from collections.abc import Callable

import torch
from torch import nn

from weights.fp8 import FP8_DTYPE, FP8_MAX, dequantize_blockwise

CUBLAS_BLOCK = 128
"""The only block size cuBLAS's block-scaled fp8 GEMM takes (weights 128 x 128, activations
1 x 128)."""

Matmul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor]
"""(x [M, K], fp8 weight [N, K], its block scales, block size) -> x @ weight.T in x's dtype."""


def quantize_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K a multiple of `block`) -> (fp8 [M, K], fp32 scales [M, K / block]), one
    scale per token and block of `block` columns: amax / 448, so the block's largest value is
    exact. An all-zero block gets scale 1 (its values are zeros either way)."""
    rows, cols = x.shape
    blocks = x.float().view(rows, cols // block, block)
    scales = blocks.abs().amax(dim=-1) / FP8_MAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    quantized = (blocks / scales.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized.view(rows, cols), scales


def emulated_block_fp8_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """The block fp8 product in fp32 on any device: activations quantized as the GPU kernel
    does, both operands dequantized, one fp32 matmul, the result in x's dtype."""
    quantized, scales = quantize_activations(x, block[1])
    rows, cols = x.shape
    activations = quantized.float().view(rows, cols // block[1], block[1]) * scales.unsqueeze(-1)
    weights = dequantize_blockwise(weight, scale_inv, block)
    return (activations.view(rows, cols) @ weights.t()).to(x.dtype)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def block_fp8_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """x [M, K] @ weight.T with cuBLAS's block-scaled fp8 GEMM, in x's dtype.

    cuBLAS reads both scale tensors with a leading dimension that must be a multiple of 4
    (16 bytes): the activations' scales are M-major, so M is padded to a multiple of 4, and the
    weight's are K-major, so K is padded to a multiple of 4 blocks (Qwen3-30B-A3B's experts,
    K = 768, are). Padding is zeros (with scale 1), which add nothing to the product. Without
    it cuBLAS either refuses the shape or, for K, silently returns wrong numbers (measured on
    an H200), so it is not optional.
    """
    if block != (CUBLAS_BLOCK, CUBLAS_BLOCK):
        raise ValueError(f"cuBLAS's block fp8 GEMM needs 128 x 128 blocks, not {block}")
    rows, cols = x.shape
    padded_rows = _round_up(rows, 4)
    padded_cols = _round_up(cols, 4 * CUBLAS_BLOCK)
    if (padded_rows, padded_cols) != (rows, cols):
        x = nn.functional.pad(x, (0, padded_cols - cols, 0, padded_rows - rows))
    if padded_cols != cols:
        wide = torch.zeros(weight.shape[0], padded_cols, dtype=weight.dtype, device=weight.device)
        wide[:, :cols] = weight
        weight = wide
        wide_scales = torch.ones(
            scale_inv.shape[0], padded_cols // CUBLAS_BLOCK, device=scale_inv.device
        )
        wide_scales[:, : scale_inv.shape[1]] = scale_inv
        scale_inv = wide_scales
    quantized, scales = quantize_activations(x, CUBLAS_BLOCK)
    out = torch._scaled_mm(
        quantized,
        weight.t(),  # column-major [K, N], as cuBLAS wants its second operand
        scale_a=scales.t().contiguous().t(),  # M-major
        scale_b=scale_inv.t(),  # [K blocks, N blocks], K-major
        out_dtype=x.dtype,
    )
    return out[:rows]


def _fp8_parameter(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=FP8_DTYPE), requires_grad=False)


def _scale_parameter(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=torch.float32), requires_grad=False)


def _blocks(size: int, block: int) -> int:
    return -(-size // block)


class Fp8Linear(nn.Module):
    """nn.Linear with an fp8 weight [out, in] and its block scales `weight_scale_inv`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block: tuple[int, int],
        bias: bool,
        matmul: Matmul,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.block = block
        self.matmul = matmul
        self.weight = _fp8_parameter(out_features, in_features)
        self.weight_scale_inv = _scale_parameter(
            _blocks(out_features, block[0]), _blocks(in_features, block[1])
        )
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = self.matmul(flat, self.weight, self.weight_scale_inv, self.block)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)


class Fp8Experts(nn.Module):
    """A fused MoE experts module (transformers 5's layout: `gate_up_proj` [E, 2I, H] with the
    gate rows first, `down_proj` [E, H, I]) in fp8, with fused block scales
    `gate_up_proj_scale_inv` [E, 2I / rows, H / cols] and `down_proj_scale_inv`.

    The forward is the one of transformers' eager experts (Qwen3MoeExperts): each expert that
    any token chose runs its tokens, and the outputs are summed with the routing weights in
    fp32.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        block: tuple[int, int],
        matmul: Matmul,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.act_fn = act_fn
        self.block = block
        self.matmul = matmul
        rows, cols = block
        self.gate_up_proj = _fp8_parameter(num_experts, 2 * intermediate_dim, hidden_dim)
        self.gate_up_proj_scale_inv = _scale_parameter(
            num_experts, 2 * _blocks(intermediate_dim, rows), _blocks(hidden_dim, cols)
        )
        self.down_proj = _fp8_parameter(num_experts, hidden_dim, intermediate_dim)
        self.down_proj_scale_inv = _scale_parameter(
            num_experts, _blocks(hidden_dim, rows), _blocks(intermediate_dim, cols)
        )

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states, dtype=torch.float32)
        chosen = nn.functional.one_hot(top_k_index, num_classes=self.num_experts)  # [T, k, E]
        for expert in chosen.sum(dim=(0, 1)).nonzero().flatten().tolist():
            token, slot = torch.where(chosen[..., expert] > 0)
            gate_up = self.matmul(
                hidden_states[token],
                self.gate_up_proj[expert],
                self.gate_up_proj_scale_inv[expert],
                self.block,
            )
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = self.matmul(
                self.act_fn(gate) * up,
                self.down_proj[expert],
                self.down_proj_scale_inv[expert],
                self.block,
            )
            weight = top_k_weights[token, slot, None]
            out.index_add_(0, token, (hidden * weight.to(hidden.dtype)).float())
        return out.to(hidden_states.dtype)
