"""Hugging Face checkpoint tensors <-> the shards of a megatron-core GPT model.

One table (`weight_units`) says, for every Megatron parameter of the whole model, which
checkpoint tensors it holds and how it is cut: split along a dim over the tensor-parallel
group, the fused QKV (q, k and v of each query group side by side), the fused SwiGLU fc1
(gate rows then up rows, per rank), or replicated. Experts add an expert-parallel dimension:
local expert j of EP rank k is global expert k x (experts / EP) + j.

`load_hf_weights` copies each rank's shards out of full checkpoint tensors (read lazily, one
at a time). `export_hf_weights` is the reverse and a collective: every rank of the training
world iterates it in the same order (`export_items`); shards are gathered over TP / ETP / EP
and, with pipeline parallelism, broadcast from the owning stage, one unit at a time, so no
rank ever holds more than one full tensor group of the model. An MoE layer's experts are one
such group per linear: gathered with one all-gather per parallel group and handed out as a
`TensorRun` (weights/runs.py), not as thousands of single tensors.

Both work on either layer spec: `GroupedExperts` stacks the experts of a linear in one 3-D
parameter, SequentialMLP keeps one parameter per expert (`local_tensors` gives the per-expert
names for both).
"""

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from training.megatron.model_config import ModelShape
from weights.manifest import TensorSpec
from weights.runs import TensorRun

Cut = Literal["replicated", "rows", "columns", "qkv", "gate_up"]
Group = Literal["none", "tp", "etp"]


@dataclass(frozen=True)
class WeightUnit:
    """One Megatron parameter (of layer `layer`, or model-level when None) and its HF tensors."""

    megatron_name: str
    """Name with the layer index local to its pipeline stage replaced by `{layer}`."""
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    cut: Cut
    group: Group
    layer: int | None = None
    expert_slot: int | None = None
    """Local expert index j for expert weights (the EP gather yields every global expert)."""
    stage: Literal["first", "last", "layer"] = "layer"


def weight_units(shape: ModelShape, expert_parallel: int) -> list[WeightUnit]:
    """Every parameter of the model, in export order (checkpoint order per layer)."""
    s = shape
    h = s.hidden_size
    units = [
        WeightUnit(
            "embedding.word_embeddings.weight",
            ("model.embed_tokens.weight",),
            ((s.vocab_size, h),),
            "rows",
            "tp",
            stage="first",
        )
    ]
    for layer in range(s.num_layers):
        units += _layer_units(s, layer, expert_parallel)
    units.append(
        WeightUnit(
            "decoder.final_layernorm.weight",
            ("model.norm.weight",),
            ((h,),),
            "replicated",
            "none",
            stage="last",
        )
    )
    if not s.tie_word_embeddings:
        units.append(
            WeightUnit(
                "output_layer.weight",
                ("lm_head.weight",),
                ((s.vocab_size, h),),
                "rows",
                "tp",
                stage="last",
            )
        )
    return units


def _layer_units(s: ModelShape, layer: int, expert_parallel: int) -> list[WeightUnit]:
    h, d = s.hidden_size, s.kv_channels
    hf = f"model.layers.{layer}."
    mc = "decoder.layers.{layer}."

    def unit(name, hf_names, shapes, cut, group, slot=None):
        return WeightUnit(
            mc + name, tuple(hf + n for n in hf_names), shapes, cut, group, layer, slot
        )

    units = [
        unit("input_layernorm.weight", ["input_layernorm.weight"], ((h,),), "replicated", "none"),
        unit(
            "self_attention.linear_qkv.weight",
            ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
            (
                (s.num_attention_heads * d, h),
                (s.num_query_groups * d, h),
                (s.num_query_groups * d, h),
            ),
            "qkv",
            "tp",
        ),
        unit(
            "self_attention.linear_proj.weight",
            ["self_attn.o_proj.weight"],
            ((h, s.num_attention_heads * d),),
            "columns",
            "tp",
        ),
        unit(
            "self_attention.q_layernorm.weight",
            ["self_attn.q_norm.weight"],
            ((d,),),
            "replicated",
            "none",
        ),
        unit(
            "self_attention.k_layernorm.weight",
            ["self_attn.k_norm.weight"],
            ((d,),),
            "replicated",
            "none",
        ),
        unit(
            "pre_mlp_layernorm.weight",
            ["post_attention_layernorm.weight"],
            ((h,),),
            "replicated",
            "none",
        ),
    ]
    if s.moe_layer_freq and s.moe_layer_freq[layer]:
        f = s.moe_ffn_hidden_size
        units.append(
            unit(
                "mlp.router.weight",
                ["mlp.gate.weight"],
                ((s.num_experts, h),),
                "replicated",
                "none",
            )
        )
        for slot in range(s.num_experts // expert_parallel):
            units += [
                unit(
                    f"mlp.experts.local_experts.{slot}.linear_fc1.weight",
                    ["mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"],
                    ((f, h), (f, h)),
                    "gate_up",
                    "etp",
                    slot,
                ),
                unit(
                    f"mlp.experts.local_experts.{slot}.linear_fc2.weight",
                    ["mlp.experts.{e}.down_proj.weight"],
                    ((h, f),),
                    "columns",
                    "etp",
                    slot,
                ),
            ]
    else:
        f = s.ffn_hidden_size
        units += [
            unit(
                "mlp.linear_fc1.weight",
                ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
                ((f, h), (f, h)),
                "gate_up",
                "tp",
            ),
            unit("mlp.linear_fc2.weight", ["mlp.down_proj.weight"], ((h, f),), "columns", "tp"),
        ]
    return units


def expert_names(unit: WeightUnit, expert: int) -> tuple[str, ...]:
    return tuple(n.replace("{e}", str(expert)) for n in unit.hf_names)


@dataclass(frozen=True)
class ExpertRun:
    """One MoE layer's experts of one linear, exported as a single `TensorRun`: `fc1` is
    gate_0, up_0, gate_1, up_1, ... (the memory order of `GroupedExperts.gate_up_weight`),
    `fc2` is down_0, down_1, ...; experts in global order."""

    layer: int
    linear: Literal["fc1", "fc2"]
    stage = "layer"  # (for `Ranks`, like a WeightUnit's)
    megatron_name = "decoder.layers.{layer}.mlp.experts."
    """The prefix of the layer's expert parameters."""

    @functools.cache  # noqa: B019 (a handful of runs per model, asked for at every sync)
    def names(self, shape: ModelShape) -> tuple[str, ...]:
        hf = f"model.layers.{self.layer}.mlp.experts."
        parts = ("gate_proj", "up_proj") if self.linear == "fc1" else ("down_proj",)
        return tuple(f"{hf}{e}.{p}.weight" for e in range(shape.num_experts) for p in parts)

    def tensor_shape(self, shape: ModelShape) -> tuple[int, int]:
        f, h = shape.moe_ffn_hidden_size, shape.hidden_size
        return (f, h) if self.linear == "fc1" else (h, f)


ExportItem = WeightUnit | ExpertRun


@functools.cache
def export_items(shape: ModelShape, expert_parallel: int) -> tuple[ExportItem, ...]:
    """`weight_units` in export order, each MoE layer's per-expert units replaced by its two
    `ExpertRun`s (where its first expert unit stood). Cached: building the per-expert units
    (thousands for Qwen3-30B-A3B) at every sync would cost more than a GPU's copies."""
    items: list[ExportItem] = []
    for unit in weight_units(shape, expert_parallel):
        if unit.expert_slot is None:
            items.append(unit)
        elif unit.expert_slot == 0 and unit.megatron_name.endswith("linear_fc1.weight"):
            items += [ExpertRun(unit.layer, "fc1"), ExpertRun(unit.layer, "fc2")]
    return tuple(items)


def hf_weight_specs(
    shape: ModelShape, expert_parallel: int, dtype: torch.dtype
) -> list[TensorSpec]:
    """Name, dtype and shape of every exported tensor, in `export_hf_weights` order."""
    dtype_name = str(dtype).removeprefix("torch.")
    specs = []
    for item in export_items(shape, expert_parallel):
        if isinstance(item, ExpertRun):
            tensor_shape = item.tensor_shape(shape)
            specs += [TensorSpec(n, dtype_name, tensor_shape) for n in item.names(shape)]
        else:
            specs += [
                TensorSpec(n, dtype_name, tuple(sh))
                for n, sh in zip(item.hf_names, item.hf_shapes, strict=True)
            ]
    return specs


# The cuts, both ways.


def shard(unit: WeightUnit, full: list[torch.Tensor], rank: int, size: int, shape: ModelShape):
    """This rank's part of the Megatron parameter, from the full HF tensors."""
    if unit.cut == "replicated":
        return full[0]
    if unit.cut == "rows":
        return full[0].chunk(size, dim=0)[rank]
    if unit.cut == "columns":
        return full[0].chunk(size, dim=1)[rank]
    if unit.cut == "gate_up":
        gate, up = full
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
    q, k, v = full
    groups = shape.num_query_groups
    d, h = shape.kv_channels, q.shape[1]
    fused = torch.cat(
        [q.view(groups, -1, d, h), k.view(groups, 1, d, h), v.view(groups, 1, d, h)], dim=1
    )
    return fused.chunk(size, dim=0)[rank].reshape(-1, h)


def unshard(unit: WeightUnit, shards: list[torch.Tensor], shape: ModelShape) -> list[torch.Tensor]:
    """The full HF tensors from every rank's part (in rank order)."""
    if unit.cut == "replicated":
        return [shards[0]]
    if unit.cut == "rows":
        return [torch.cat(shards, dim=0)]
    if unit.cut == "columns":
        return [torch.cat(shards, dim=1)]
    if unit.cut == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])]
    groups, d = shape.num_query_groups, shape.kv_channels
    fused = torch.cat(shards, dim=0)
    h = fused.shape[1]
    fused = fused.view(groups, -1, d, h)
    q, k, v = fused[:, :-2], fused[:, -2:-1], fused[:, -1:]
    return [t.reshape(-1, h).contiguous() for t in (q, k, v)]


# Ranks and groups, from megatron-core's parallel state.


@dataclass(frozen=True)
class Ranks:
    tp: int
    tp_size: int
    etp: int
    etp_size: int
    ep: int
    ep_size: int
    pp: int
    pp_size: int
    layer_offset: int
    num_local_layers: int

    @staticmethod
    def current(config) -> "Ranks":
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.transformer_block import get_num_layers_to_build
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        return Ranks(
            tp=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            etp=ps.get_expert_tensor_parallel_rank(),
            etp_size=ps.get_expert_tensor_parallel_world_size(),
            ep=ps.get_expert_model_parallel_rank(),
            ep_size=ps.get_expert_model_parallel_world_size(),
            pp=ps.get_pipeline_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            layer_offset=get_transformer_layer_offset(config),
            num_local_layers=get_num_layers_to_build(config),
        )

    def owns(self, unit: WeightUnit) -> bool:
        if unit.stage == "first":
            return self.pp == 0
        if unit.stage == "last":
            return self.pp == self.pp_size - 1
        return self.layer_offset <= unit.layer < self.layer_offset + self.num_local_layers

    def local_name(self, unit: "WeightUnit | ExpertRun") -> str:
        if unit.layer is None:
            return unit.megatron_name
        return unit.megatron_name.format(layer=unit.layer - self.layer_offset)

    def owner_stage(self, unit: "WeightUnit | ExpertRun", num_layers: int) -> int:
        if unit.stage == "first":
            return 0
        if unit.stage == "last":
            return self.pp_size - 1
        # Layers are spread evenly over stages (megatron-core's default, checked at start-up).
        return unit.layer // (num_layers // self.pp_size)


def _split_rank(ranks: Ranks, unit: WeightUnit) -> tuple[int, int]:
    if unit.group == "tp":
        return ranks.tp, ranks.tp_size
    if unit.group == "etp":
        return ranks.etp, ranks.etp_size
    return 0, 1


STACKED_EXPERT_WEIGHTS = {"gate_up_weight": "linear_fc1", "down_weight": "linear_fc2"}
"""`GroupedExperts`' stacked parameters, by the per-expert linear each slice is."""


def local_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters by megatron-core name, the stacked expert parameters of
    `GroupedExperts` as one view per expert under SequentialMLP's names
    (`...experts.local_experts.{j}.linear_fc1.weight`), so one table serves both specs."""
    tensors = {}
    for name, param in model.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        if leaf in STACKED_EXPERT_WEIGHTS and prefix.endswith("experts"):
            linear = STACKED_EXPERT_WEIGHTS[leaf]
            for j, view in enumerate(param.unbind(0)):
                tensors[f"{prefix}.local_experts.{j}.{linear}.weight"] = view
        else:
            tensors[name] = param
    return tensors


def load_hf_weights(
    model: torch.nn.Module, read: Callable[[str], torch.Tensor], shape: ModelShape, config
) -> None:
    """Overwrite this rank's parameters with its shards of the checkpoint tensors `read(name)`."""
    ranks = Ranks.current(config)
    params = local_tensors(model)
    seen = set()
    for unit in weight_units(shape, ranks.ep_size):
        if not ranks.owns(unit):
            continue
        name = ranks.local_name(unit)
        names = unit.hf_names
        if unit.expert_slot is not None:
            names = expert_names(
                unit, ranks.ep * (shape.num_experts // ranks.ep_size) + unit.expert_slot
            )
        rank, size = _split_rank(ranks, unit)
        part = shard(unit, [read(n) for n in names], rank, size, shape)
        param = params[name]
        if part.shape != param.shape:
            raise ValueError(
                f"{name}: checkpoint gives {tuple(part.shape)}, model has {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(part)
        seen.add(name)
    missing = set(params) - seen
    if missing:
        raise ValueError(f"parameters with no checkpoint tensor: {sorted(missing)[:5]}")


def export_hf_weights(
    model: torch.nn.Module, shape: ModelShape, config
) -> Iterator[tuple[str, torch.Tensor] | TensorRun]:
    """Every checkpoint tensor, full, on every rank (a collective: all ranks must iterate).

    Yields (name, tensor) pairs, and for each MoE layer two `TensorRun`s of all its experts
    (`ExpertRun`): those are gathered in one all-gather per group (ETP, then EP) for the whole
    layer, and on one rank they are the parameter itself, no copy.
    """
    from megatron.core import parallel_state as ps

    ranks = Ranks.current(config)
    # No per-expert views here (`local_tensors`): experts leave as whole stacks, and making
    # a view per expert would cost more than the export's copies on one GPU.
    params = {name: param.detach() for name, param in model.named_parameters()}
    groups = {
        "tp": ps.get_tensor_model_parallel_group(),
        "etp": ps.get_expert_tensor_parallel_group(),
        "ep": ps.get_expert_model_parallel_group(),
        "pp": ps.get_pipeline_model_parallel_group(),
    }
    for item in export_items(shape, ranks.ep_size):
        owner = ranks.owner_stage(item, shape.num_layers)
        if isinstance(item, ExpertRun):
            stacked = None
            if ranks.pp == owner:
                local = _local_expert_stack(params, ranks.local_name(item), item.linear)
                stacked = _gather_expert_stack(local, item.linear, ranks, groups)
            if ranks.pp_size > 1:
                stacked = _broadcast_expert_stack(item, stacked, owner, groups, shape, params)
            rows = stacked.shape[0] * (2 if item.linear == "fc1" else 1)
            yield TensorRun(item.names(shape), stacked.view(rows, *item.tensor_shape(shape)))
            continue
        tensors = None
        if ranks.pp == owner:
            tensors = _gather_unit(item, params[ranks.local_name(item)], ranks, groups, shape)
        if ranks.pp_size > 1:
            tensors = _broadcast_from_stage(item, tensors, owner, groups["pp"], params)
        yield from tensors


def _local_expert_stack(params, prefix: str, linear: str) -> torch.Tensor:
    """This rank's experts of one linear as [local experts, out, in]: `GroupedExperts`'
    parameter itself, or SequentialMLP's per-expert weights stacked (a copy)."""
    stacked = params.get(prefix + ("gate_up_weight" if linear == "fc1" else "down_weight"))
    if stacked is not None:
        return stacked
    per_expert = []
    while (name := f"{prefix}local_experts.{len(per_expert)}.linear_{linear}.weight") in params:
        per_expert.append(params[name])
    return torch.stack(per_expert)


def _gather_expert_stack(local: torch.Tensor, linear: str, ranks, groups) -> torch.Tensor:
    """All experts of the layer, full: [experts, 2f, h] (gate then up rows of each expert)
    for fc1, [experts, h, f] for fc2. One all-gather over ETP, then one over EP."""
    full = local
    if ranks.etp_size > 1:
        shards = _all_gather_stacked(local, groups["etp"], ranks.etp_size)  # [etp, E_l, ...]
        if linear == "fc1":  # each shard is [gate rows; up rows] of its slice of f
            gate, up = shards.chunk(2, dim=2)
            full = torch.cat([torch.cat(list(gate), 1), torch.cat(list(up), 1)], 1)
        else:  # split along f (the last dim)
            full = torch.cat(list(shards), dim=2)
    if ranks.ep_size > 1:
        full = _all_gather_stacked(full, groups["ep"], ranks.ep_size).flatten(0, 1)
    return full.contiguous()


def _all_gather_stacked(local: torch.Tensor, group, size: int) -> torch.Tensor:
    # [size x rows, ...], the layout gloo requires (NCCL takes either), seen as [size, rows, ...].
    out = torch.empty(
        (size * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device
    )
    dist.all_gather_into_tensor(out, local.contiguous(), group=group)
    return out.view(size, *local.shape)


def _broadcast_expert_stack(item, stacked, owner, groups, shape, params) -> torch.Tensor:
    if stacked is None:
        sample = next(iter(params.values()))
        out, into = item.tensor_shape(shape)
        rows = (2 * out if item.linear == "fc1" else out, into)
        stacked = torch.empty((shape.num_experts, *rows), dtype=sample.dtype, device=sample.device)
    source = dist.get_process_group_ranks(groups["pp"])[owner]
    dist.broadcast(stacked, src=source, group=groups["pp"])
    return stacked


def _gather_unit(unit, local, ranks, groups, shape) -> list[tuple[str, torch.Tensor]]:
    _, size = _split_rank(ranks, unit)
    shards = [local]
    if size > 1:
        shards = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(shards, local.contiguous(), group=groups[unit.group])
    return list(zip(unit.hf_names, unshard(unit, shards, shape), strict=True))


def _broadcast_from_stage(unit, tensors, owner, pp_group, params):
    sample = next(iter(params.values()))
    source = dist.get_process_group_ranks(pp_group)[owner]
    if tensors is None:
        tensors = [
            (n, torch.empty(s, dtype=sample.dtype, device=sample.device))
            for n, s in zip(unit.hf_names, unit.hf_shapes, strict=True)
        ]
    for _, t in tensors:
        dist.broadcast(t, src=source, group=pp_group)
    return tensors
