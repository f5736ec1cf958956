"""Elementwise pieces of the layer, each one fused kernel (forward and backward) on a GPU.

Written out in eager PyTorch, an RMSNorm is eight kernels forward and more backward (casts,
pow, mean, rsqrt, two products), and the experts' SwiGLU with its routing weights five; on the
Qwen3-30B-A3B layer shape they took about a quarter of a training step on an H200 (profile in
bench/RESULTS.md). `torch.compile` turns each function into one generated kernel per
direction. Shapes vary from micro-batch to micro-batch, so the functions are compiled for
dynamic shapes once, on first use.

On the CPU (the test suite) the same functions run eagerly: the arithmetic is identical, and
no compiler is needed there.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's RMSNorm: statistics in fp32, cast back, then times the weight."""
    h = hidden.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(hidden.dtype)


def weighted_swiglu(gate_up: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """silu(gate) x up ([..., 2f] -> [..., f]), times each row's routing weight in the
    weight's precision (fp32), cast back: megatron-core's expert MLP arithmetic."""
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.silu(gate) * up * probs.unsqueeze(-1)).to(gate_up.dtype)


def on_gpu_compiled(fn: Callable) -> Callable:
    """`fn`, compiled for CUDA tensors (on first use), eager for any other."""
    compiled: list[Callable] = []

    def call(first: torch.Tensor, *args):
        if not first.is_cuda:
            return fn(first, *args)
        if not compiled:
            compiled.append(torch.compile(fn, dynamic=True))
        return compiled[0](first, *args)

    call.__doc__ = fn.__doc__
    return call


fused_rms_norm = on_gpu_compiled(rms_norm)
fused_weighted_swiglu = on_gpu_compiled(weighted_swiglu)
