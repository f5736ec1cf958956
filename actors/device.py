"""Which torch device an actor computes on."""

import ray
import torch


def actor_device() -> torch.device:
    """The GPU Ray gave this actor (Ray sets CUDA_VISIBLE_DEVICES, so it is cuda:0), else CPU."""
    if ray.get_gpu_ids() and torch.cuda.is_available():
        torch.cuda.set_device(0)  # NCCL groups made later bind to the current device
        return torch.device("cuda", 0)
    return torch.device("cpu")
