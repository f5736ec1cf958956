"""A transformers model's weights under the names and shapes of its safetensors checkpoint.

This is the wire format of weight sync and of every exported model: what `save_pretrained`
writes and what SGLang loads. transformers 5 fuses the experts of an MoE layer into
`experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]; the checkpoint keeps one
`experts.{e}.gate_proj / up_proj / down_proj.weight` per expert. The tensors yielded here are
views of the model's parameters, so a receiver writes into them in place.
"""

from collections.abc import Iterator

import torch

FUSED_GATE_UP = "experts.gate_up_proj"
FUSED_DOWN = "experts.down_proj"


def checkpoint_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, view) for every parameter, in the model's parameter order."""
    for name, param in model.named_parameters():
        tensor = param.detach()
        if name.endswith(FUSED_GATE_UP) and tensor.dim() == 3:
            prefix = name[: -len("gate_up_proj")]
            half = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                yield f"{prefix}{e}.gate_proj.weight", tensor[e, :half]
                yield f"{prefix}{e}.up_proj.weight", tensor[e, half:]
        elif name.endswith(FUSED_DOWN) and tensor.dim() == 3:
            prefix = name[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                yield f"{prefix}{e}.down_proj.weight", tensor[e]
        else:
            yield name, tensor
