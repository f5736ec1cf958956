"""Routing replay (R3) in megatron-core 0.19.2: the engines' experts forced in the policy's
forwards through megatron-core's own `RouterReplay` (`moe_enable_routing_replay`).

megatron-core gives each router of a model built with the switch a `RouterReplay`; in
`REPLAY_FORWARD` the router takes its top-k ids from it and computes their weights from its own
scores at those ids, so the gate weights keep their gradients. What megatron-core leaves to us
is which ids each router must get for a micro-batch: its tokens are the micro-batch's [T, B]
positions flattened sequence-first, only this tensor-parallel rank's slice of T under sequence
parallelism, and only the MoE layers of this pipeline stage.
"""

from typing import Any

import torch

from config.errors import UserError
from training.megatron.model_config import ModelShape


def replay_refusals(
    moe_router_fusion: bool, recompute_granularity: str | None, pipeline: int
) -> list[str]:
    """What megatron-core settings R3 cannot replay under, one problem per line (empty if none).

    - `moe_router_fusion`: the fused top-k kernel (Transformer Engine's) returns its own ids
      and never asks the router's `RouterReplay`, so replay would silently not happen.
    - activation recompute under pipeline parallelism: the recomputed forward of micro-batch
      k runs in its backward, after the forwards of later micro-batches have set their own
      ids (`set_micro_batch`), so it would replay another micro-batch's experts. Without
      pipeline parallelism each micro-batch's backward follows its own forward, and the ids
      are still its own.
    """
    problems = []
    if moe_router_fusion:
        problems.append(
            "moe_router_fusion=True: the fused top-k path takes its own experts and bypasses "
            "the replayed ones; turn the router fusion off"
        )
    if recompute_granularity is not None and pipeline > 1:
        problems.append(
            f"train.recompute_granularity={recompute_granularity!r} with train.parallel.pipeline="
            f"{pipeline}: a micro-batch recomputed in its backward would replay a later "
            f"micro-batch's experts; turn activation recompute off, or use pipeline 1"
        )
    return problems


def check_replayable(config: Any) -> None:
    """UserError if megatron-core's `TransformerConfig` `config` has a setting R3 cannot
    replay under (`replay_refusals`); called where a model is built with routing replay, so
    whichever key set it, the model never trains with a replay that does not happen."""
    problems = replay_refusals(
        config.moe_router_fusion,
        config.recompute_granularity,
        config.pipeline_model_parallel_size,
    )
    if problems:
        raise UserError(
            "algorithm.routing_replay=true (R3) cannot be replayed by megatron-core with "
            + "; ".join(problems)
        )


class MegatronRoutingReplay:
    """Feeds each micro-batch's routing to the `RouterReplay`s of one model (built with
    `moe_enable_routing_replay`), before its forward."""

    def __init__(self, replays: list[Any], shape: ModelShape, sequence_parallel: bool):
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        freq = shape.moe_layer_freq or (1,) * shape.num_layers
        moe_index = {n + 1: sum(freq[:n]) for n in range(shape.num_layers) if freq[n]}
        # layer_number is megatron-core's global, 1-based number of the router's layer
        self.targets = [(replay, moe_index[replay.layer_number]) for replay in replays]
        self.tp_rank = ps.get_tensor_model_parallel_rank() if sequence_parallel else 0
        self.tp_size = ps.get_tensor_model_parallel_world_size() if sequence_parallel else 1
        for replay in replays:
            replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def set_micro_batch(self, routed: torch.Tensor) -> None:
        """`routed` [B, T, moe_layers, top_k]: the experts of the forward about to run."""
        tokens = routed.shape[1] // self.tp_size
        local = routed[:, self.tp_rank * tokens : (self.tp_rank + 1) * tokens]
        sequence_first = local.transpose(0, 1).long()  # [T_local, B, layers, top_k]
        for replay, layer in self.targets:
            replay.clear_indices()  # its backward list would grow by one per micro-batch
            replay.set_target_indices(
                sequence_first[:, :, layer].reshape(-1, routed.shape[3]).contiguous()
            )


def take_router_replays() -> list[Any]:
    """The `RouterReplay`s megatron-core registered since the last call, emptying its
    process-wide list: a model built later (another backend in the same process) must not
    find this one's routers there."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    replays = list(RouterReplay.global_router_replay_instances)
    RouterReplay.clear_global_router_replay_instances()
    return replays
