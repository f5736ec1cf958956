"""Start-up checks of a Megatron parallel layout against the world size and the model.

Every rule megatron-core would otherwise enforce with a bare assert deep inside model
construction (or not at all) is checked here, before any actor starts, with the numbers.
"""

import importlib.util

from config.errors import UserError
from config.schema import ParallelConfig, TrainConfig
from training.megatron.model_config import ModelShape


def layout_problems(p: ParallelConfig, world: int, s: ModelShape | None) -> list[str]:
    """Every rule the layout breaks, as messages naming the numbers (empty when valid).
    Without the model's shape (`s` None: its config.json is not readable here, as in a dry
    run before the model is copied), the rules that need no model."""
    problems = []
    model_parallel = p.tensor * p.pipeline * p.context
    if world % model_parallel:
        problems.append(
            f"train.num_workers={world} is not divisible by tensor x pipeline x context = "
            f"{p.tensor} x {p.pipeline} x {p.context} = {model_parallel}"
        )
    expert_parallel = p.expert * p.expert_tensor * p.pipeline
    if world % expert_parallel:
        problems.append(
            f"train.num_workers={world} is not divisible by expert x expert_tensor x pipeline "
            f"= {p.expert} x {p.expert_tensor} x {p.pipeline} = {expert_parallel}"
        )
    problems += _model_free_problems(p)
    if s is None:
        return problems
    checks = [
        (s.num_attention_heads, p.tensor, "attention heads", "tensor"),
        (s.num_query_groups, p.tensor, "key/value heads (query groups)", "tensor"),
        (s.vocab_size, p.tensor, "vocab size", "tensor"),
        (s.ffn_hidden_size, p.tensor, "intermediate_size", "tensor"),
        (s.num_layers, p.pipeline, "layers", "pipeline"),
    ]
    if s.num_experts:
        checks += [
            (s.num_experts, p.expert, "experts", "expert"),
            (s.moe_ffn_hidden_size, p.expert_tensor, "moe_intermediate_size", "expert_tensor"),
        ]
    for count, size, what, field in checks:
        if count % size:
            problems.append(
                f"the model's {count} {what} are not divisible by train.parallel.{field}={size}"
            )
    if p.expert > 1 and not s.num_experts:
        problems.append(f"train.parallel.expert={p.expert} needs an MoE model (this one is dense)")
    if s.num_experts and p.tensor > 1 and not p.sequence:
        problems.append(
            f"train.parallel.tensor={p.tensor} with an MoE model needs "
            f"train.parallel.sequence=true (megatron-core trains MoE layers under tensor "
            f"parallelism only with sequence parallelism)"
        )
    return problems


def _model_free_problems(p: ParallelConfig) -> list[str]:
    problems = []
    if p.sequence and p.tensor == 1:
        problems.append("train.parallel.sequence=true needs train.parallel.tensor > 1")
    if p.context > 1:
        problems.append(
            f"train.parallel.context={p.context}: context parallelism needs Transformer "
            f"Engine's attention (pip install transformer-engine[pytorch]), which this backend "
            f"does not use yet; set it to 1"
        )
    return problems


def optimizer_problems(train: TrainConfig, dtype: str) -> list[str]:
    """Optimizer settings megatron-core 0.19.2 cannot run here, named with the fix."""
    problems = []
    if train.use_precision_aware_optimizer and not train.use_distributed_optimizer:
        problems.append(
            "train.use_precision_aware_optimizer needs train.use_distributed_optimizer=true"
        )
    has_te = importlib.util.find_spec("transformer_engine") is not None
    if train.use_precision_aware_optimizer and not train.optimizer_cpu_offload and not has_te:
        problems.append(
            "train.use_precision_aware_optimizer without train.optimizer_cpu_offload needs "
            "Transformer Engine's FusedAdam (pip install transformer-engine[pytorch]); "
            "with CPU Adam it works without"
        )
    if train.overlap_cpu_optimizer_d2h_h2d and not train.optimizer_cpu_offload:
        problems.append(
            "train.overlap_cpu_optimizer_d2h_h2d only applies with train.optimizer_cpu_offload"
        )
    overlap_needs = {
        "optimizer_cpu_offload": train.optimizer_cpu_offload,
        "overlap_cpu_optimizer_d2h_h2d": train.overlap_cpu_optimizer_d2h_h2d,
        "use_distributed_optimizer": train.use_distributed_optimizer,
        "use_precision_aware_optimizer": train.use_precision_aware_optimizer,
    }
    missing = [f"train.{name}=true" for name, on in overlap_needs.items() if not on]
    if train.overlap_cpu_adam_with_forward and missing:
        # It defers megatron-core's per-parameter host optimizers over the distributed
        # optimizer's bf16 shards (training/megatron/host_adam_overlap.py).
        problems.append(
            f"train.overlap_cpu_adam_with_forward needs {', '.join(missing)} (CPU Adam as the "
            f"reference recipe runs it); set them, or turn the overlap off"
        )
    if train.optimizer_cpu_offload and dtype == "float32" and train.use_distributed_optimizer:
        # megatron-core's distributed optimizer shards fp32 parameters as autograd views,
        # which its CPU-offload optimizer cannot hold; bf16 parameters are sharded detached.
        problems.append(
            "train.optimizer_cpu_offload with model.dtype=float32 and the distributed optimizer "
            "is not supported by megatron-core 0.19.2; train in bfloat16 (as on GPUs) or set "
            "train.use_distributed_optimizer=false"
        )
    return problems


def recompute_problems(train: TrainConfig, s: ModelShape) -> list[str]:
    """megatron-core's bound on recompute_num_layers: the layers of one pipeline stage."""
    per_stage = s.num_layers // train.parallel.pipeline
    if train.recompute_granularity == "full" and train.recompute_num_layers > per_stage:
        return [
            f"train.recompute_num_layers={train.recompute_num_layers} is more than the "
            f"{per_stage} layers of a pipeline stage"
        ]
    return []


def packing_problems(train: TrainConfig) -> list[str]:
    """Packed rows run only through this backend's SDPA attention (layer_spec torch):
    megatron-core's local attention takes no THD layout."""
    if train.pack_sequences and train.layer_spec != "torch":
        return [
            f"train.pack_sequences=true needs train.layer_spec=torch (the {train.layer_spec!r} "
            f"spec's attention takes no packed sequences); set one of them differently"
        ]
    return []


def check_layout(p: ParallelConfig, world: int, shape: ModelShape) -> None:
    """The layout checks alone (the checkpoint converters run no optimizer)."""
    problems = layout_problems(p, world, shape)
    if problems:
        raise UserError("invalid Megatron parallel layout: " + "; ".join(problems))


def check_megatron_config(train: TrainConfig, dtype: str, shape: ModelShape | None) -> None:
    """Every start-up check of the Megatron backend; one error listing all problems (those
    needing the model only when its `shape` is given)."""
    problems = layout_problems(train.parallel, train.num_workers, shape)
    problems += optimizer_problems(train, dtype)
    problems += packing_problems(train)
    if shape is not None:
        problems += recompute_problems(train, shape)
    if problems:
        raise UserError("invalid Megatron configuration: " + "; ".join(problems))


def data_parallel_size(p: ParallelConfig, world: int) -> int:
    return world // (p.tensor * p.pipeline * p.context)
