"""Which transport carries the weights from trainers to engines, for a placement plan.

Kept apart from the weight sync's actors so that the checks before a run (and the dry run)
can ask without importing torch, transformers and Ray.
"""

from typing import Protocol

from config.errors import UserError
from config.schema import WeightSyncConfig


class PlacedOn(Protocol):
    """What the choice reads of a plan (`placement.planner.Layout` has both)."""

    colocate: bool
    use_gpus: bool


def transport_backend(config: WeightSyncConfig, layout: PlacedOn, engine_type: str) -> str:
    """`weight_sync.backend` resolved for this layout.

    NCCL cannot put two ranks of one communicator on the same GPU, which is exactly what a
    colocated trainer and engine are: colocated engines take CUDA IPC handles instead (no
    copy between processes at all). gloo, through host memory, is there for CPUs.
    """
    colocate, use_gpus = layout.colocate, layout.use_gpus
    ipc_possible = colocate and use_gpus
    if config.backend == "auto":
        if ipc_possible:
            return "ipc"
        return "nccl" if use_gpus and not colocate else "gloo"
    if config.backend == "nccl" and (colocate or not use_gpus):
        raise UserError(
            "weight_sync.backend=nccl needs trainers and engines on distinct GPUs "
            "(placement.colocate=false on a GPU cluster); use auto or gloo"
        )
    if config.backend == "ipc" and not ipc_possible:
        raise UserError(
            "weight_sync.backend=ipc hands CUDA IPC handles to engines on the trainers' GPUs: "
            "it needs placement.colocate=true and GPUs; use auto"
        )
    return config.backend
