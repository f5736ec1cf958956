"""MoE experts as two grouped GEMMs (gate/up, then down) over all local experts, without
Transformer Engine.

megatron-core's token dispatcher hands this module the tokens of its local experts sorted by
expert (`tokens_per_expert` rows each) and takes back one output row per input row; the
dispatcher does every exchange (alltoall over EP, gathers over ETP), so nothing here talks to
other ranks.

The weights of all local experts live in one 3-D parameter each, so a forward is one
`grouped_mm` per projection with no stacking copy:
    gate_up_weight [local experts, 2 x moe_ffn / ETP, hidden]  (gate rows, then up rows)
    down_weight    [local experts, hidden, moe_ffn / ETP]
the per-expert layouts of megatron-core's SequentialMLP (`linear_fc1` / `linear_fc2`), stacked.
On CUDA in bf16 the products are torch's grouped GEMM; elsewhere (the CPU tests, fp32) a loop
over experts does the same arithmetic one expert at a time.

Checkpoints: `sharded_state_dict` describes the same global tensors under the same keys as
SequentialMLP's (`...mlp.experts.linear_fc1.weight` of shape [experts, 2 x ffn, hidden], gate
then up), so a torch_dist checkpoint saved with either expert module loads into the other.
"""

from typing import Any

import torch
import torch.nn.functional as F

from training.megatron.fused import fused_weighted_swiglu


class GroupedExperts(torch.nn.Module):
    """Drop-in for megatron-core's SequentialMLP in an MoE layer spec (SwiGLU, no bias)."""

    def __init__(
        self, num_local_experts: int, config: Any, pg_collection: Any = None, name: Any = None
    ):
        super().__init__()
        from megatron.core.transformer.moe.moe_utils import ProcessGroupCollection

        if config.add_bias_linear or not config.gated_linear_unit:
            raise ValueError("GroupedExperts implements bias-free SwiGLU experts only")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.config = config
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        etp = self.tp_group.size()
        ffn = config.moe_ffn_hidden_size // etp
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.gate_up_weight = _expert_parameter(
            (num_local_experts, 2 * ffn, config.hidden_size), 1, config, device, self._expert_pgs
        )
        self.down_weight = _expert_parameter(
            (num_local_experts, config.hidden_size, ffn), 2, config, device, self._expert_pgs
        )
        if config.perform_initialization:
            self._initialize(config)

    @property
    def _expert_pgs(self) -> bool:
        # As megatron-core's expert linears: gradients reduced over the expert-data-parallel
        # group, not the data-parallel one, when experts are split differently from attention.
        c = self.config
        return c.expert_model_parallel_size > 1 or (
            c.expert_tensor_parallel_size != c.tensor_model_parallel_size
        )

    @torch.no_grad()
    def _initialize(self, config: Any) -> None:
        from megatron.core.tensor_parallel.random import (
            get_cuda_rng_tracker,
            get_expert_parallel_rng_tracker_name,
        )

        with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
            for e in range(self.num_local_experts):
                config.init_method(self.gate_up_weight[e])
                config.output_layer_init_method(self.down_weight[e])

    def forward(
        self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        """hidden [tokens, hidden] sorted by local expert; probs [tokens] routing weights.
        Returns (output [tokens, hidden], no bias), as megatron-core's expert modules do."""
        if grouped_mm_supported(hidden):
            # grouped_mm reads the group ends from the device: no host sync.
            ends = torch.cumsum(tokens_per_expert.to(hidden.device), 0, dtype=torch.int32)
            gate_up = grouped_mm(hidden, self.gate_up_weight.transpose(1, 2), ends)
            act = fused_weighted_swiglu(gate_up, probs)
            return grouped_mm(act, self.down_weight.transpose(1, 2), ends), None
        counts = tokens_per_expert.tolist()
        outputs = []
        experts = zip(
            hidden.split(counts),
            probs.split(counts),
            self.gate_up_weight.unbind(0),  # one backward for all experts' slices
            self.down_weight.unbind(0),
            strict=True,
        )
        for x, p, gate_up, down in experts:
            outputs.append(F.linear(fused_weighted_swiglu(F.linear(x, gate_up), p), down))
        return torch.cat(outputs), None

    def backward_dw(self) -> None:
        """Nothing is deferred: weight gradients are computed in the ordinary backward."""

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict[str, Any]:
        """SequentialMLP's checkpoint entries for our stacked parameters: the same keys, global
        shapes and offsets, and its (empty) per-expert `_extra_state` objects."""
        from megatron.core.dist_checkpointing.mapping import (
            ShardedObject,
            ShardedTensor,
            ShardedTensorFactory,
        )

        if (metadata or {}).get("singleton_local_shards"):
            raise NotImplementedError("GroupedExperts saves with singleton_local_shards=False")
        # `prefix` is this module's ("...mlp.experts."); SequentialMLP's keys add "experts."
        # and put the global expert index on a leading axis.
        key = f"{prefix}experts."
        ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
        etp_rank, etp_size = self.tp_group.rank(), self.tp_group.size()
        prepended = len(sharded_offsets)
        replica_id = (0, 0, self.dp_group.rank())
        expert_axis = (prepended, ep_rank, ep_size)

        def tensor(name, data, *axes):
            return ShardedTensor.from_rank_offsets(
                name,
                data,
                *sharded_offsets,
                expert_axis,
                *axes,
                replica_id=replica_id,
                prepend_axis_num=prepended,
            )

        def build_fc1(name, data, replica, flattened_range):
            # Gate rows of ETP rank r sit at fragment r of 2 x ETP, up rows at ETP + r.
            gate, up = data.chunk(2, dim=1)
            row_axis = prepended + 1
            return [
                tensor(name, gate, (row_axis, etp_rank, 2 * etp_size)),
                tensor(name, up, (row_axis, etp_size + etp_rank, 2 * etp_size)),
            ]

        def merge_fc1(parts):
            return torch.cat(parts, dim=1)

        state: dict[str, Any] = {
            f"{prefix}gate_up_weight": ShardedTensorFactory(
                f"{key}linear_fc1.weight", self.gate_up_weight, build_fc1, merge_fc1, replica_id
            ),
            f"{prefix}down_weight": tensor(
                f"{key}linear_fc2.weight", self.down_weight, (prepended + 2, etp_rank, etp_size)
            ),
        }
        experts = ep_size * self.num_local_experts
        for local in range(self.num_local_experts):
            offset = (ep_rank * self.num_local_experts + local,)
            for linear in ("linear_fc1", "linear_fc2"):
                state[f"{prefix}{EXTRA_STATE}{linear}.{local}"] = ShardedObject(
                    f"{key}{linear}._extra_state", None, (experts,), offset, replica_id
                )
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The `_extra_state` placeholders above come back from a load; they hold nothing.
        for name in [k for k in state_dict if k.startswith(prefix + EXTRA_STATE)]:
            del state_dict[name]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


EXTRA_STATE = "extra_state_of_"
"""Prefix of the state-dict keys of SequentialMLP's per-expert `_extra_state` entries."""


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """torch's grouped GEMM runs bf16 on CUDA cards of compute capability 9.0 (Hopper) and up."""
    return x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] >= 9


def grouped_mm(x: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows [ends[e-1], ends[e]) of x times weights[e], for every e, in one kernel."""
    # Public since torch 2.10; the private name before.
    gmm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return gmm(x, weights, offs=ends)


def _expert_parameter(shape, split_dim, config, device, expert_pgs) -> torch.nn.Parameter:
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    param = torch.nn.Parameter(torch.empty(shape, dtype=config.params_dtype, device=device))
    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=split_dim, stride=1)
    param.allreduce = not expert_pgs
    return param
