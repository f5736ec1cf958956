"""The transformers engine's model for an FP8 rollout checkpoint: transformers' FineGrainedFP8.

The model is built from the checkpoint's config, then its Linear projections and fused experts
are replaced by transformers' own `FP8Linear` / `FP8Experts` (`replace_with_fp8_linear`, the
function its FP8 quantizer calls), which hold fp8 weights and fp32 block scales
(`weight_scale_inv`, `gate_up_proj_scale_inv`, ...) and multiply in fp8. Exactly the modules
whose weights the checkpoint stores in fp8 are replaced (`Fp8Format.quantizes`), and the
result is checked, so the engine's manifest is the FP8 checkpoint's: the trainer's syncs write
fp8 weights and scales straight into these modules (`models/checkpoint_format.py` names them).
The weights are not read from the checkpoint: the driver's first sync, before any rollout,
gives the engine the trainer's (quantized) weights.

Where it runs: transformers' fp8 matmuls need a CUDA GPU of compute capability >= 8.9 (Ada,
Hopper) and its `finegrained-fp8` kernel (the `kernels` package fetches it from the Hugging
Face Hub, or its cache). Anything less is a `UserError` naming the need; the engine never falls
back to bf16 silently.
"""

import re

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, FineGrainedFP8Config, PreTrainedModel

from config.errors import UserError
from config.schema import ModelConfig
from models.fp8_checkpoint import Fp8Format
from models.loading import DTYPES, check_checkpoint_dir

MIN_CAPABILITY = (8, 9)
"""The compute capability transformers' FP8 kernels need (Ada: 8.9, Hopper: 9.0)."""

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
"""The per-expert projections a fused experts module holds."""


def fp8_device_problem(device: torch.device) -> str | None:
    """Why `device` cannot run transformers' fp8 matmuls, or None when it can."""
    if device.type != "cuda":
        return f"this engine runs on {device}, not on a CUDA GPU"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{name} has compute capability {capability[0]}.{capability[1]}"
    return None


def fp8_kernel_problem() -> str | None:
    """Why transformers' fp8 matmul kernel cannot be loaded here, or None when it can."""
    from transformers.integrations.finegrained_fp8 import load_finegrained_fp8_kernel

    try:
        load_finegrained_fp8_kernel()
    except Exception as e:  # ImportError, or the Hub download's own error
        return f"{type(e).__name__}: {e}"
    return None


def check_fp8_engine_support(model: ModelConfig, device: torch.device) -> None:
    """UserError unless this engine can serve `model`'s FP8 checkpoint in fp8."""
    need = (
        f"model.hf_checkpoint={model.hf_checkpoint} is an FP8 checkpoint; the transformers "
        f"engine serves it with transformers' FineGrainedFP8 (fp8 weights and matmuls), which "
        f"needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper: H100, H200) and "
        f"transformers' finegrained-fp8 kernel (the `kernels` package, which fetches it from "
        f"the Hugging Face Hub or its cache)"
    )
    problem = fp8_device_problem(device) or fp8_kernel_problem()
    if problem:
        raise UserError(
            f"{need}, but {problem}; run the engines on such GPUs, use rollout.engine sglang, "
            f"or serve a bf16 checkpoint"
        )


def build_fp8_model(model: ModelConfig, fp8: Fp8Format, device: torch.device) -> PreTrainedModel:
    """The FP8 engine model of `model.hf_checkpoint`, on `device`, weights uninitialized.

    Built in `model.dtype` from the config (the replaced projections' bf16 weights are
    dropped), so it holds one bf16 copy of the model on the device while it is built.
    """
    directory = check_checkpoint_dir(model.hf_checkpoint)
    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # built plain, then quantized here, module by module
    with torch.device(device):
        built = AutoModelForCausalLM.from_config(
            config, dtype=DTYPES[model.dtype], attn_implementation="sdpa"
        )
    quantize_modules(built, fp8)
    return built.eval()


def quantize_modules(model: nn.Module, fp8: Fp8Format) -> None:
    """Replace the modules `fp8` stores in fp8 by transformers' FP8 modules, in place, on the
    device of the model (their tensors are left uninitialized)."""
    from transformers.integrations.finegrained_fp8 import (
        FP8Experts,
        FP8Linear,
        replace_with_fp8_linear,
    )

    expected = _modules_in_fp8(model, fp8)
    device = next(model.parameters()).device
    skip = [re.escape(name) + "$" for name in _candidates(model) if name not in expected]
    settings = FineGrainedFP8Config(
        weight_block_size=fp8.block_size, modules_to_not_convert=skip, activation_scheme="dynamic"
    )
    replace_with_fp8_linear(
        model, modules_to_not_convert=skip, quantization_config=settings, pre_quantized=True
    )
    replaced = {n for n, m in model.named_modules() if isinstance(m, FP8Linear | FP8Experts)}
    if replaced != expected:
        wrong = sorted(replaced ^ expected)
        raise UserError(
            f"transformers' FP8 conversion replaced other modules than {fp8.source} stores in "
            f"fp8 (differing: {', '.join(wrong[:5])}); this model type is not supported by the "
            f"transformers FP8 engine"
        )
    for name in replaced:
        model.get_submodule(name).to_empty(device=device)


def _candidates(model: nn.Module) -> list[str]:
    """The modules transformers' conversion considers: plain Linears and fused experts."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear or name.endswith(".experts")
    ]


def _modules_in_fp8(model: nn.Module, fp8: Fp8Format) -> set[str]:
    """The Linear and experts modules whose checkpoint weights are fp8 (a fused experts
    module must be fp8 for every expert, or for none)."""
    out = set()
    for name in _candidates(model):
        module = model.get_submodule(name)
        if type(module) is nn.Linear:
            if fp8.quantizes(f"{name}.weight"):
                out.add(name)
            continue
        _check_fusable(name, module, fp8)
        if fp8.quantizes(f"{name}.0.gate_proj.weight"):
            out.add(name)
    return out


def _check_fusable(name: str, experts: nn.Module, fp8: Fp8Format) -> None:
    count = getattr(experts, "num_experts", None)
    flags = {
        fp8.quantizes(f"{name}.{e}.{p}.weight") for e in range(count or 1) for p in PROJECTIONS
    }
    if len(flags) > 1:
        raise UserError(
            f"{fp8.source} keeps some of {name}'s expert projections in bf16 and others in fp8; "
            f"transformers fuses an MoE layer's experts, so they must all be one or the other"
        )
    intermediate = getattr(experts, "intermediate_dim", None)
    rows = fp8.block_size[0]
    if True in flags and intermediate is not None and intermediate % rows:
        raise UserError(
            f"{name}: transformers fuses each expert's gate and up projections into one fp8 "
            f"matrix, whose block scales only split back into the checkpoint's when the block "
            f"rows ({rows}, {fp8.source} weight_block_size) divide moe_intermediate_size "
            f"({intermediate}); use a block size that divides it"
        )
