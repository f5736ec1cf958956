"""Block-wise FP8 (e4m3) quantization of weight matrices, as pure tensor functions.

The format is the one of DeepSeek-V3 and the Qwen3 FP8 checkpoints, which SGLang and
transformers' FineGrainedFP8 load: a matrix W [rows, cols] is cut into blocks of
`block = (block_rows, block_cols)` (128 x 128 by default; the last row and column of blocks
may be partial), and each block b is stored as

    q_b = round_to_e4m3(W_b / s_b),   s_b = amax(|W_b|) / 448     (448: e4m3's largest value)

with `q` in `torch.float8_e4m3fn` and the fp32 scales `s` [ceil(rows / block_rows),
ceil(cols / block_cols)] stored beside it as `<name>_scale_inv`: the value that MULTIPLIES the
fp8 numbers to give the weight back (the name says "inverse" of the quantization scale
448 / amax). A block of zeros has amax 0; it gets the scale 1.0, so it quantizes to zeros and
dequantizes to zeros instead of dividing by zero.

Error: e4m3 keeps 3 mantissa bits, so every value of a block is rounded to within half a step
of it, at most 2^-4 of its own magnitude (the largest values, near amax, within 16/448 of
amax); numbers below e4m3's normal range (2^-6 x s_b) lose at most 2^-10 x s_b. Hence
max |W - dequantize(quantize(W))| / amax <= 2^-4 per block (tests check it on real weights).

Non-finite weights are not checked for (that would cost a host sync per tensor): a block with
an inf or NaN gives NaN scales, as the model it came from would give NaN outputs.
"""

from collections.abc import Sequence

import torch

from models.fp8_checkpoint import DEFAULT_BLOCK

FP8_DTYPE = torch.float8_e4m3fn
"""The fp8 format of the weights: 4 exponent bits, 3 mantissa bits, no infinities."""

FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
"""448.0: the largest e4m3 value; a block's amax maps onto it."""

SCALE_DTYPE = torch.float32
"""The dtype of `weight_scale_inv` (one scale per block)."""


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The shape of the scales of a [rows, cols] matrix: one per (partial) block."""
    rows, cols = _matrix_shape(shape)
    block_rows, block_cols = _check_block(block)
    return -(-rows // block_rows), -(-cols // block_cols)


def quantize_blockwise(
    weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(q, scale_inv)`: `weight` [rows, cols] (any float dtype, any device) as e4m3 values
    and one fp32 scale per block, on the weight's device. The division runs in fp32."""
    rows, cols = _matrix_shape(tuple(weight.shape))
    if not weight.is_floating_point():
        raise ValueError(f"block-wise FP8 quantizes float weights, not {weight.dtype}")
    # amax in the weight's own dtype is exact (|x| and max round nothing), and the division
    # promotes to fp32 inside one kernel: no fp32 copy of the weight is made first.
    blocks = _blocked(weight.detach(), block)  # [R, br, C, bc]
    amax = blocks.abs().amax(dim=(1, 3)).to(torch.float32)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = torch.div(blocks, scale[:, None, :, None])  # fp32 (or fp64 for an fp64 weight)
    q = scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(q.shape[0] * q.shape[1], q.shape[2] * q.shape[3])
    if q.shape != (rows, cols):  # drop the zero padding of partial edge blocks
        q = q[:rows, :cols].contiguous()
    return q, scale


def quantize_blockwise_batch(
    weights: Sequence[torch.Tensor], block: tuple[int, int] = DEFAULT_BLOCK
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`quantize_blockwise` of each of `weights` (same shape, dtype and device, whole blocks),
    bit for bit, in one pass: a fixed number of kernels for the whole batch instead of one
    set per matrix. An MoE layer's 384 expert matrices are each too small to keep a GPU busy,
    so quantizing them one by one is bound by kernel launches (bench/RESULTS.md)."""
    first = weights[0]
    rows, cols = _matrix_shape(tuple(first.shape))
    block_rows, block_cols = _check_block(block)
    if rows % block_rows or cols % block_cols:
        raise ValueError(f"a batch needs whole blocks: {rows} x {cols} in {block} blocks")
    if any(w.shape != first.shape or w.dtype != first.dtype for w in weights):
        raise ValueError("a batch of weights must share one shape and dtype")
    stacked = torch.stack([w.detach() for w in weights])
    blocks = stacked.view(len(weights), rows // block_rows, block_rows, -1, block_cols)
    amax = blocks.abs().amax(dim=(2, 4)).to(torch.float32)  # exact, as in quantize_blockwise
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = torch.div(blocks, scale[:, :, None, :, None])
    q = scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(len(weights), rows, cols)
    return list(zip(q.unbind(0), scale.unbind(0), strict=True))


def dequantize_blockwise(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The weight back from `quantize_blockwise`'s output, in `dtype`: q x its block's scale."""
    rows, cols = _matrix_shape(tuple(q.shape))
    expected = scale_shape((rows, cols), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv of shape {tuple(scale_inv.shape)} does not fit a {rows} x {cols} matrix "
            f"in {block[0]} x {block[1]} blocks (expected {expected})"
        )
    blocks = _blocked(q.to(torch.float32), block)
    weight = blocks * scale_inv.to(device=q.device, dtype=torch.float32)[:, None, :, None]
    weight = weight.reshape(weight.shape[0] * weight.shape[1], -1)[:rows, :cols]
    return weight.to(dtype).contiguous()


def block_errors(
    weight: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """max |weight - dequantized| / amax of each block [R, C] (0 for an all-zero block): the
    relative error the format promises to keep under 2^-4."""
    error = (weight.to(torch.float32) - dequantize_blockwise(q, scale_inv, block)).abs()
    err_blocks = _blocked(error, block).amax(dim=(1, 3))
    amax = _blocked(weight.to(torch.float32).abs(), block).amax(dim=(1, 3))
    return torch.where(amax > 0, err_blocks / amax.clamp(min=torch.finfo(torch.float32).tiny), 0)


def _blocked(matrix: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[rows, cols] -> [R, block_rows, C, block_cols] (a view when the blocks divide the
    matrix; else a zero-padded copy: zeros change no block's amax)."""
    block_rows, block_cols = _check_block(block)
    rows, cols = matrix.shape
    pad_rows, pad_cols = -rows % block_rows, -cols % block_cols
    if pad_rows or pad_cols:
        matrix = torch.nn.functional.pad(matrix, (0, pad_cols, 0, pad_rows))
    return matrix.reshape(
        matrix.shape[0] // block_rows, block_rows, matrix.shape[1] // block_cols, block_cols
    )


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"block-wise FP8 quantizes non-empty matrices, got shape {shape}")
    return shape[0], shape[1]


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    if len(block) != 2 or any(not isinstance(b, int) or b < 1 for b in block):
        raise ValueError(f"block must be two positive integers, got {block}")
    return block[0], block[1]
