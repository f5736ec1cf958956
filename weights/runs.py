"""Runs: consecutive tensors of a weight stream that lie back to back in one tensor.

A trainer's weight stream is a sequence of (name, tensor) pairs in plan order. An MoE layer's
experts are thousands of small tensors of one shape that the trainer already holds stacked
(`GroupedExperts`' [experts, 2 x ffn, hidden] is gate_0, up_0, gate_1, up_1, ... in memory);
handing them out one by one costs a Python step and a kernel launch each, more than their
copy. A `TensorRun` hands them out as one: a stream may mix runs and pairs, and every consumer
that wants pairs reads it through `pairs()`.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorRun:
    """`names[i]` is `stacked[i]`: len(names) tensors of one shape and dtype, contiguous."""

    names: tuple[str, ...]
    stacked: torch.Tensor

    def __post_init__(self):
        if self.stacked.shape[0] != len(self.names) or not self.stacked.is_contiguous():
            raise ValueError(
                f"a run of {len(self.names)} names needs a contiguous tensor of as many rows, "
                f"got shape {tuple(self.stacked.shape)}"
            )

    def __len__(self) -> int:
        return len(self.names)

    def pairs(self) -> Iterator[tuple[str, torch.Tensor]]:
        return zip(self.names, self.stacked.unbind(0), strict=True)


StreamItem = tuple[str, torch.Tensor] | TensorRun
"""One item of a weight stream."""


def pairs(stream: Iterable[StreamItem]) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream with every run taken apart into (name, tensor) pairs (views, no copies)."""
    for item in stream:
        if isinstance(item, TensorRun):
            yield from item.pairs()
        else:
            yield item
