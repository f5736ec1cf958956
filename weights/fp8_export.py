"""The trainer's weights as an FP8 rollout checkpoint holds them: the sync's fp8 stream.

`Fp8Export(format)` maps the trainer's (name, bf16 tensor) stream, lazily and in order, to the
engines' stream: every weight the format stores in fp8 becomes two tensors, the fp8 weight
under its own name and its fp32 block scales under `<name>_scale_inv`; every other tensor
passes through untouched. `specs` does the same to the specs, so the bucket plan (and with it
every engine's manifest check, and SGLang's request bodies) carries the fp8 dtypes and the
scale tensors before any byte moves.

Quantization happens as the sender pulls tensors into a bucket (`WeightSender.send` packs
each bucket from the stream), never on a second copy of the model: a run of consecutive
weights of one shape (an MoE layer's experts) is quantized together, up to `BATCH_BYTES` of
input at a time, because one by one its small matrices are bound by kernel launches; any
other weight is quantized alone. Both give the same bits.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from models.fp8_checkpoint import Fp8Format, scale_name
from weights.fp8 import (
    FP8_DTYPE,
    SCALE_DTYPE,
    quantize_blockwise,
    quantize_blockwise_batch,
    scale_shape,
)
from weights.manifest import TensorSpec, dtype_name

FP8_DTYPE_NAME = dtype_name(FP8_DTYPE)
"""`float8_e4m3fn`, as manifests and SGLang's request bodies spell it."""

BATCH_BYTES = 64 << 20
"""The most input quantized in one batch (weight_sync.bucket_size_mb's default): the batch's
stacked copy and fp32 intermediate stay a few buckets' worth."""


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
        batch: list[tuple[str, torch.Tensor]] = []
        for name, tensor in named_tensors:
            quantized = self.format.quantizes(name)
            if batch and not (quantized and self._joins(batch, tensor)):
                yield from self._quantized(batch)  # before `tensor`: the specs' order
                batch = []
            if quantized:
                batch.append((name, tensor))
            else:
                yield name, tensor
        yield from self._quantized(batch)

    def _joins(self, batch: list[tuple[str, torch.Tensor]], tensor: torch.Tensor) -> bool:
        """Whether `tensor` can be quantized with `batch` (same shape, dtype and device, whole
        blocks, the batch under `BATCH_BYTES`)."""
        first = batch[0][1]
        rows, cols = self.format.block_size
        return (
            tensor.shape == first.shape
            and tensor.dtype == first.dtype
            and tensor.device == first.device
            and tensor.dim() == 2
            and tensor.shape[0] % rows == 0
            and tensor.shape[1] % cols == 0
            and (len(batch) + 1) * first.nbytes <= BATCH_BYTES
        )

    def _quantized(
        self, batch: list[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        if not batch:
            return
        block = self.format.block_size
        with torch.no_grad():
            if len(batch) == 1:
                results = [quantize_blockwise(batch[0][1], block)]
            else:
                results = quantize_blockwise_batch([t for _, t in batch], block)
        for (name, _), (q, scale_inv) in zip(batch, results, strict=True):
            yield name, q
            yield scale_name(name), scale_inv


def export_for(fp8: Fp8Format | None) -> Fp8Export | None:
    """The transform for a rollout format (None: the engines take the trainer's tensors)."""
    return Fp8Export(fp8) if fp8 is not None else None
