"""The transformers engine's model for an FP8 rollout checkpoint.

The model is built from the checkpoint's config, then its Linear projections and fused experts
are replaced by `inference/fp8_layers.py`'s `Fp8Linear` / `Fp8Experts`, which hold fp8 weights
and fp32 block scales (`weight_scale_inv`, `gate_up_proj_scale_inv`, ...) and multiply in fp8
with cuBLAS's block-scaled GEMM. Exactly the modules whose weights the checkpoint stores in
fp8 are replaced (`Fp8Format.quantizes`), so the engine's manifest is the FP8 checkpoint's:
the trainer's syncs write fp8 weights and scales straight into these modules
(`models/checkpoint_format.py` names them). The weights are not read from the checkpoint: the
driver's first sync, before any rollout, gives the engine the trainer's (quantized) weights.

Where it runs: a CUDA GPU of compute capability >= 9.0 (Hopper: H100, H200, or later) whose
torch has cuBLAS's block-scaled fp8 GEMM (torch >= 2.9 built with CUDA >= 12.9), with the
checkpoint's blocks 128 x 128 (Qwen3's) and every fp8 matrix 128-aligned. Anything less is a
`UserError` naming the need; the engine never falls back to bf16 silently.
"""

from collections.abc import Iterator

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from config.errors import UserError
from config.schema import ModelConfig
from inference import check_fp8_block_size
from inference.fp8_layers import (
    CUBLAS_BLOCK,
    Fp8Experts,
    Fp8Linear,
    Matmul,
    block_fp8_matmul,
    emulated_block_fp8_matmul,
)
from models.fp8_checkpoint import Fp8Format
from models.loading import DTYPES
from models.model_dir import check_checkpoint_dir
from weights.fp8 import quantize_blockwise

MIN_CAPABILITY = (9, 0)
"""cuBLAS's block-scaled fp8 GEMM runs on Hopper (9.0) and later."""

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
"""The per-expert projections a fused experts module holds."""


def fp8_device_problem(device: torch.device) -> str | None:
    """Why `device` cannot run the block fp8 GEMM, or None when it can."""
    if device.type != "cuda":
        return f"this engine runs on {device}, not on a CUDA GPU"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{name} has compute capability {capability[0]}.{capability[1]}"
    return None


def fp8_kernel_problem(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why this torch's block fp8 GEMM does not work on `device` for activations of `dtype`,
    or None when it does: one small product, checked against the same arithmetic in fp32."""
    block = (CUBLAS_BLOCK, CUBLAS_BLOCK)
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(4, 512, device=device, generator=generator).to(dtype)
    w = torch.randn(256, 512, device=device, generator=generator)
    weight, scales = quantize_blockwise(w, block)
    try:
        got = block_fp8_matmul(x, weight, scales, block).float()
    except (RuntimeError, TypeError) as e:  # an older torch or CUDA: unsupported scaling
        return (
            f"torch {torch.__version__} (CUDA {torch.version.cuda}), {dtype} activations: "
            f"{type(e).__name__}: {e}"
        )
    want = emulated_block_fp8_matmul(x, weight, scales, block).float()
    error = ((got - want).abs().max() / want.abs().max()).item()
    if not error < 0.02:  # bf16 rounding of the output is 2^-8
        return f"torch {torch.__version__}'s block fp8 GEMM is off by {error:.3g} (relative)"
    return None


def check_fp8_engine_support(model: ModelConfig, fp8: Fp8Format, device: torch.device) -> None:
    """UserError unless this engine can serve `model`'s FP8 checkpoint in fp8 on `device`."""
    need = (
        f"model.hf_checkpoint={model.hf_checkpoint} is an FP8 checkpoint; the transformers "
        f"engine serves it in fp8 with cuBLAS's block-scaled fp8 GEMM, which needs a CUDA GPU "
        f"of compute capability >= 9.0 (Hopper: H100, H200) and torch >= 2.9 built with "
        f"CUDA >= 12.9"
    )
    problem = fp8_device_problem(device) or fp8_kernel_problem(device, DTYPES[model.dtype])
    if problem:
        raise UserError(
            f"{need}, but {problem}; run the engines on such GPUs, use rollout.engine sglang, "
            f"or serve a bf16 checkpoint"
        )
    check_fp8_block_size(fp8)


def build_fp8_model(
    model: ModelConfig, fp8: Fp8Format, device: torch.device, matmul: Matmul = block_fp8_matmul
) -> PreTrainedModel:
    """The FP8 engine model of `model.hf_checkpoint`, on `device`, weights uninitialized.

    Built in `model.dtype` from the config (the replaced projections' bf16 weights are
    dropped), so it holds one bf16 copy of the model on the device while it is built.
    `matmul` is the GPU kernel; tests pass `emulated_block_fp8_matmul` to run on a CPU.
    """
    directory = check_checkpoint_dir(model.hf_checkpoint)
    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # built plain, then quantized here, module by module
    with torch.device(device):
        built = AutoModelForCausalLM.from_config(
            config, dtype=DTYPES[model.dtype], attn_implementation="sdpa"
        )
    quantize_modules(built, fp8, matmul)
    if matmul is block_fp8_matmul:
        check_gemm_shapes(built, fp8)
    return built.eval()


def quantize_modules(model: nn.Module, fp8: Fp8Format, matmul: Matmul) -> None:
    """Replace the modules `fp8` stores in fp8 by `Fp8Linear` / `Fp8Experts`, in place, on the
    model's device (their tensors are left uninitialized)."""
    device = next(model.parameters()).device
    block = tuple(fp8.block_size)
    replaced = {}
    for name, module in list(_candidates(model)):
        if type(module) is nn.Linear:
            if not fp8.quantizes(f"{name}.weight"):
                continue
            with torch.device(device):
                new = Fp8Linear(
                    module.in_features, module.out_features, block, module.bias is not None, matmul
                )
        else:
            if not _experts_in_fp8(name, module, fp8):
                continue
            num_experts, hidden = module.down_proj.shape[:2]
            with torch.device(device):
                new = Fp8Experts(
                    num_experts, hidden, module.down_proj.shape[2], module.act_fn, block, matmul
                )
        replaced[name] = new
    for name, new in replaced.items():
        model.set_submodule(name, new)


def check_gemm_shapes(model: nn.Module, fp8: Fp8Format) -> None:
    """UserError unless every fp8 matrix fits cuBLAS's GEMM: 128 x 128 blocks, input width a
    multiple of 128 (whole activation blocks), output height a multiple of 16."""
    check_fp8_block_size(fp8)
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear | Fp8Experts):
            for param_name, param in module.named_parameters():
                if param.dtype.itemsize != 1:
                    continue
                rows, cols = param.shape[-2:]
                if cols % CUBLAS_BLOCK or rows % 16:
                    raise UserError(
                        f"{fp8.source}: {name}.{param_name} is {rows} x {cols}; the transformers "
                        f"engine's fp8 GEMM needs its input width a multiple of 128 and its "
                        f"output height a multiple of 16; keep this module in bf16 "
                        f"(modules_to_not_convert) or use rollout.engine sglang"
                    )


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Plain Linears and fused experts: the modules a checkpoint can store in fp8."""
    for name, module in model.named_modules():
        if type(module) is nn.Linear or name.endswith(".experts"):
            yield name, module


def _experts_in_fp8(name: str, experts: nn.Module, fp8: Fp8Format) -> bool:
    """Whether the fused experts module `name` is stored in fp8 (every expert, or none)."""
    count = getattr(experts, "num_experts", None)
    flags = {
        fp8.quantizes(f"{name}.{e}.{p}.weight") for e in range(count or 1) for p in PROJECTIONS
    }
    if flags == {False}:
        return False
    if len(flags) > 1:
        raise UserError(
            f"{fp8.source} keeps some of {name}'s expert projections in bf16 and others in fp8; "
            f"transformers fuses an MoE layer's experts, so they must all be one or the other"
        )
    gate_up, down = (getattr(experts, p, None) for p in ("gate_up_proj", "down_proj"))
    act_fn = getattr(experts, "act_fn", None)
    if (
        not isinstance(gate_up, torch.Tensor)
        or not isinstance(down, torch.Tensor)
        or act_fn is None
        or gate_up.dim() != 3
        or gate_up.shape[1] != 2 * down.shape[2]
        or getattr(experts, "has_bias", False)
    ):
        raise UserError(
            f"{name} ({type(experts).__name__}) is not a fused gate/up + down experts module "
            f"without biases (transformers' Qwen3-MoE layout); the transformers FP8 engine "
            f"cannot serve it in fp8: use rollout.engine sglang"
        )
    intermediate = down.shape[2]
    rows = fp8.block_size[0]
    if intermediate % rows:
        raise UserError(
            f"{name}: each expert's gate and up projections are fused into one fp8 matrix, "
            f"whose block scales only split back into the checkpoint's when the block rows "
            f"({rows}, {fp8.source} weight_block_size) divide moe_intermediate_size "
            f"({intermediate}); use a block size that divides it"
        )
    return True
