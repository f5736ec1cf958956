"""The trainer's weights as an FP8 rollout checkpoint holds them: the sync's fp8 stream.

`Fp8Export(format)` maps the trainer's (name, bf16 tensor) stream, lazily and in order, to the
engines' stream: every weight the format stores in fp8 becomes two tensors, the fp8 weight
under its own name and its fp32 block scales under `<name>_scale_inv`; every other tensor
passes through untouched. `specs` does the same to the specs, so the bucket plan (and with it
every engine's manifest check, and SGLang's request bodies) carries the fp8 dtypes and the
scale tensors before any byte moves.

Quantization happens per tensor as the sender pulls it into a bucket (`WeightSender.send`
packs each bucket from the stream): at most one bucket's quantized tensors exist at a time,
never a second copy of the model.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from models.fp8_checkpoint import Fp8Format, scale_name
from weights.fp8 import FP8_DTYPE, SCALE_DTYPE, quantize_blockwise, scale_shape
from weights.manifest import TensorSpec, dtype_name

FP8_DTYPE_NAME = dtype_name(FP8_DTYPE)
"""`float8_e4m3fn`, as manifests and SGLang's request bodies spell it."""


@dataclass(frozen=True)
class Fp8Export:
    """The trainer-side transform of one FP8 format."""

    format: Fp8Format

    def specs(self, specs: Iterable[TensorSpec]) -> list[TensorSpec]:
        """The specs of `tensors`' output, from the specs of its input (nothing gathered)."""
        out = []
        for spec in specs:
            if not self.format.quantizes(spec.name):
                out.append(spec)
                continue
            scales = scale_shape(spec.shape, self.format.block_size)
            out.append(TensorSpec(spec.name, FP8_DTYPE_NAME, spec.shape))
            out.append(TensorSpec(scale_name(spec.name), dtype_name(SCALE_DTYPE), scales))
        return out

    def tensors(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Each quantized weight followed by its scales; every other tensor as it comes."""
        for name, tensor in named_tensors:
            if not self.format.quantizes(name):
                yield name, tensor
                continue
            with torch.no_grad():
                q, scale_inv = quantize_blockwise(tensor, self.format.block_size)
            yield name, q
            yield scale_name(name), scale_inv


def export_for(fp8: Fp8Format | None) -> Fp8Export | None:
    """The transform for a rollout format (None: the engines take the trainer's tensors)."""
    return Fp8Export(fp8) if fp8 is not None else None
