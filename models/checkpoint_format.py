"""A transformers model's weights under the names and shapes of its safetensors checkpoint.

This is the wire format of weight sync and of every exported model: what `save_pretrained`
writes and what SGLang loads. transformers 5 fuses the experts of an MoE layer into
`experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]; the checkpoint keeps one
`experts.{e}.gate_proj / up_proj / down_proj.weight` per expert. The tensors yielded here are
views of the model's parameters, so a receiver writes into them in place.

A model of the transformers FP8 engine (`inference/fp8_layers.py`, with transformers' own
FineGrainedFP8 names and layouts) holds fp8 weights and their block scales: `Fp8Linear`
modules keep checkpoint names (`q_proj.weight`, `q_proj.weight_scale_inv`); `Fp8Experts` fuse
the scales as they fuse the weights (`experts.gate_up_proj_scale_inv` [E, 2 x blocks(I),
blocks(H)]), split here per expert into
`experts.{e}.gate_proj.weight_scale_inv` (the first half of the block rows) and
`up_proj.weight_scale_inv` (the second half), which is exact when the block rows divide I.
"""

from collections.abc import Iterator

import torch

FUSED_GATE_UP = "experts.gate_up_proj"
FUSED_DOWN = "experts.down_proj"
SCALE_SUFFIX = "_scale_inv"


def checkpoint_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, view) for every parameter, in the model's parameter order."""
    for name, param in model.named_parameters():
        tensor = param.detach()
        scales = name.endswith(SCALE_SUFFIX)
        fused = name.removesuffix(SCALE_SUFFIX)
        suffix = ".weight" + SCALE_SUFFIX if scales else ".weight"
        if fused.endswith(FUSED_GATE_UP) and tensor.dim() == 3:
            prefix = fused[: -len("gate_up_proj")]
            if tensor.shape[1] % 2:
                raise ValueError(f"{name} {tuple(tensor.shape)} does not split into gate and up")
            half = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                yield f"{prefix}{e}.gate_proj{suffix}", tensor[e, :half]
                yield f"{prefix}{e}.up_proj{suffix}", tensor[e, half:]
        elif fused.endswith(FUSED_DOWN) and tensor.dim() == 3:
            prefix = fused[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                yield f"{prefix}{e}.down_proj{suffix}", tensor[e]
        else:
            yield name, tensor
