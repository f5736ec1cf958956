"""Start-up checks of a Megatron parallel layout against the world size and the model.

Every rule megatron-core would otherwise enforce with a bare assert deep inside model
construction (or not at all) is checked here, before any actor starts, with the numbers.
"""

from config.errors import UserError
from config.schema import ParallelConfig
from training.megatron.model_config import ModelShape


def layout_problems(p: ParallelConfig, world: int, s: ModelShape) -> list[str]:
    """Every rule the layout breaks, as messages naming the numbers (empty when valid)."""
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
    if p.sequence and p.tensor == 1:
        problems.append("train.parallel.sequence=true needs train.parallel.tensor > 1")
    if p.context > 1:
        problems.append(
            f"train.parallel.context={p.context}: context parallelism needs Transformer "
            f"Engine's attention (pip install transformer-engine[pytorch]), which this backend "
            f"does not use yet; set it to 1"
        )
    return problems


def check_layout(p: ParallelConfig, world: int, shape: ModelShape) -> None:
    problems = layout_problems(p, world, shape)
    if problems:
        raise UserError("invalid Megatron parallel layout: " + "; ".join(problems))


def data_parallel_size(p: ParallelConfig, world: int) -> int:
    return world // (p.tensor * p.pipeline * p.context)
